"""Draft vocabulary, confidence stopping and the draft planner: drafting cheaper never changes
greedy output, sampling keeps the model's distribution, and the planner drafts only where its
measured costs say drafting pays."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from adainfer.generation import SelfSpeculativeDecoder
from conftest import ARCHS
from test_generation import PROMPTS, _model, _plain_greedy

# a shortlist of about half the tiny vocabulary: most characters of the prompts are not in it
SHORTLIST = list(range(0, 98, 2))


def _recording(decoder):
    """Wrap the decoder's draft reads; returns the list every drafted token lands in."""
    seen, draft_token = [], decoder._draft_token

    def record(rows, hidden):
        token, q, sure = draft_token(rows, hidden)
        seen.append((token.clone(), None if rows.extra is None else rows.extra.clone()))
        return token, q, sure

    decoder._draft_token = record
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_draft_vocabulary_and_confidence_keep_greedy_output(arch):
    model, tok = _model(arch)
    prompts = PROMPTS[:4]
    expected = _plain_greedy(model, tok, prompts, 12)
    settings = [
        dict(draft_layer=3, draft_tokens=4, draft_vocab=SHORTLIST),
        dict(draft_layer=2, draft_tokens=3, draft_vocab=SHORTLIST, draft_prompt_tokens=True),
        dict(draft_layer=5, draft_tokens=4, draft_confidence=0.3),
        dict(draft_layer=4, draft_tokens=4, draft_vocab=SHORTLIST[:10], draft_confidence=0.5),
    ]
    for s in settings:
        decoder = SelfSpeculativeDecoder(model, tok, **s)
        seen = _recording(decoder)
        result = decoder.generate(prompts, max_new_tokens=12, eos_token_id=[])
        assert result.tokens == expected, s
        assert (result.accepted <= result.drafted).all()
        if s.get("draft_vocab") is not None:  # every draft came from the row's shortlist
            for token, extra in seen:
                allowed = (
                    [set(s["draft_vocab"]) | set(e.tolist()) for e in extra]
                    if (extra is not None)
                    else [set(s["draft_vocab"])] * len(token)
                )
                assert all(t in a for t, a in zip(token.tolist(), allowed))


def test_prompt_tokens_join_each_rows_shortlist():
    model, tok = _model("llama")
    decoder = SelfSpeculativeDecoder(
        model, tok, draft_layer=3, draft_vocab=[5, 6], draft_prompt_tokens=True
    )
    enc = tok(["ab", "xyz5"], return_tensors="pt", padding=True, padding_side="left")
    extra, valid = decoder.draft_head.extra_ids(enc["input_ids"], enc["attention_mask"])
    rows = [set(e[v].tolist()) for e, v in zip(extra, valid)]
    assert rows == [set(tok("ab")["input_ids"]), set(tok("xyz5")["input_ids"]) - {5, 6}]
    assert tok.pad_token_id not in rows[0]  # the padding of the shorter row is not a candidate


@pytest.mark.parametrize("batch", [1, 8])
def test_cheaper_drafts_with_a_row_stopping_early_at_eos(batch):
    model, tok = _model("llama")
    prompts = PROMPTS[:batch]
    free = _plain_greedy(model, tok, prompts, 24)
    row, at = next(
        (r, i) for r in range(batch) for i in range(2, 24) if free[r][i] not in free[r][:i]
    )
    expected = _plain_greedy(model, tok, prompts, 24, eos=free[row][at])
    assert len(expected[row]) == at + 1 < 24
    decoder = SelfSpeculativeDecoder(
        model,
        tok,
        draft_layer=4,
        draft_tokens=3,
        draft_vocab=SHORTLIST,
        draft_prompt_tokens=True,
        draft_confidence=0.2,
    )
    result = decoder.generate(prompts, max_new_tokens=24, eos_token_id=free[row][at])
    assert result.tokens == expected


def test_confidence_one_stops_every_round_after_one_draft():
    """No draft is certain: every round drafts one token and verifies it (batch 1)."""
    model, tok = _model("llama")
    decoder = SelfSpeculativeDecoder(model, tok, draft_layer=3, draft_tokens=4, draft_confidence=1)
    result = decoder.generate(PROMPTS[:1], max_new_tokens=12, eos_token_id=[])
    assert result.tokens == _plain_greedy(model, tok, PROMPTS[:1], 12)
    assert result.drafted.sum() == result.rounds
    free = SelfSpeculativeDecoder(model, tok, draft_layer=3, draft_tokens=4)
    assert free.generate(PROMPTS[:1], max_new_tokens=12, eos_token_id=[]).drafted.sum() > (
        result.rounds
    )


def test_bad_draft_vocabularies_are_clear_errors():
    model, tok = _model("llama")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SelfSpeculativeDecoder(model, tok, draft_layer=2, draft_vocab=[1, 10_000])
    with pytest.raises(ValueError, match="give draft_vocab too"):
        SelfSpeculativeDecoder(model, tok, draft_layer=2, draft_prompt_tokens=True)
    with pytest.raises(ValueError, match="draft_confidence"):
        SelfSpeculativeDecoder(model, tok, draft_layer=2, draft_confidence=1.5)


def test_sampling_with_a_shortlist_keeps_the_model_distribution():
    """3000 rows sample two tokens at temperature 0.5; the second is drafted from layer 2 over
    a shortlist (zero probability outside it) and accepted or resampled: its frequencies fit
    the full model's own marginal (chi-square), not the shortlist draft's."""
    from scipy.stats import chisquare

    from adainfer.generation import Chooser

    model, tok = _model("llama")
    n, temperature = 3000, 0.5
    chooser = Chooser(
        do_sample=True, temperature=temperature, generator=torch.Generator().manual_seed(0)
    )
    decoder = SelfSpeculativeDecoder(
        model, tok, draft_layer=2, draft_tokens=1, draft_vocab=SHORTLIST, draft_confidence=0.1
    )
    result = decoder.generate(["hello"] * n, max_new_tokens=2, eos_token_id=[], chooser=chooser)
    assert result.drafted.sum() == n
    second = torch.tensor([row[1] for row in result.tokens])

    ids = tok(["hello"], return_tensors="pt")["input_ids"]
    V = model.config.vocab_size
    with torch.inference_mode():
        first = (model(ids).logits[0, -1] / temperature).softmax(-1)
        both = torch.cat([ids.repeat(V, 1), torch.arange(V)[:, None]], 1)
        out = model(both, output_hidden_states=True)
        full = (out.logits[:, -1] / temperature).softmax(-1)
        early = decoder.draft_head.logits(out.hidden_states[2][:, -1])
        draft = torch.zeros(V, V).index_copy(
            1, torch.tensor(SHORTLIST), (early / temperature).softmax(-1)
        )
    expected = (first[:, None] * full).sum(0) * n
    drafted = (first[:, None] * draft).sum(0) * n
    counts = torch.bincount(second, minlength=V).double()
    off_list = torch.ones(V, dtype=torch.bool)
    off_list[SHORTLIST] = False
    assert counts[off_list].sum() > 0.05 * n  # tokens outside the shortlist still come out
    big = expected >= 5
    observed, fit = counts[big], expected[big].double()
    if not big.all():
        observed = torch.cat([observed, counts[~big].sum()[None]])
        fit = torch.cat([fit, expected[~big].sum()[None].double()])
    scaled = fit.numpy() * observed.sum().item() / fit.sum().item()
    assert chisquare(observed.numpy(), scaled).pvalue > 1e-3
    tv_model = (counts / n - expected / n).abs().sum() / 2
    tv_draft = (counts / n - drafted / n).abs().sum() / 2
    assert tv_model < tv_draft


# --------------------------------------------------------------------------- the planner
META = {"model": "tiny-llama", "num_layers": 6, "vocab_size": 98, "batch_size": 2}


def _reads(acceptance: dict, n: int = 40, rows: int = 4, seed: int = 0):
    """Synthetic reads: at depth column j a draft agrees with probability acceptance[j]; its
    confidence is high exactly where it agrees."""
    from adainfer.drafting import Reads

    rng = np.random.default_rng(seed)
    agree = [rng.random((n, len(acceptance))) < np.array(acceptance) for _ in range(rows)]
    conf = [np.where(a, 0.95, 0.2) for a in agree]
    return Reads(agree, conf)


def _costs(draft: tuple[float, float], head: dict, verify: dict) -> dict:
    """measure_costs's layout at depths 3 and 5: draft steps, heads, verify{n} (in steps)."""
    steps = {"draft@3": draft[0], "draft@5": draft[1]}
    steps |= {f"head:{k}": v for k, v in head.items()}
    steps |= {f"verify{n}@{d}": v for n, v in verify.items() for d in (3, 5)}
    return {"depths": [3, 5], "steps": {k: {"median": v} for k, v in steps.items()}}


def test_planner_falls_back_to_plain_when_drafting_cannot_pay():
    from adainfer.drafting import DraftPlanner

    planner = DraftPlanner(draft_tokens=(1, 2, 3), vocab_sizes=(None,), margin=1.03)
    params = dict(planner.get_params())
    # a draft step nearly a plain step, an exact head and verifications above a step
    costs = _costs((0.7, 0.95), {"exact": 0.2}, {1: 0.3, 2: 0.5, 3: 0.7})
    planner.fit_measured({"exact": _reads([0.7, 0.85, 0.95])}, costs, [3, 4, 5], META)
    assert planner.plan_.plain and planner.plan_.decoder_settings(_model("llama")[0]) == {
        "draft_layer": None
    }
    assert planner.estimates_[0]["speedup"] < 1.03
    assert planner.plan_.meta["best_drafting"] == planner.estimates_[0]["speedup"]
    assert planner.get_params() == params  # fit never rewrites the parameters


def test_planner_drafts_where_the_costs_say_it_pays():
    from adainfer.drafting import DraftPlanner

    planner = DraftPlanner(draft_tokens=(1, 2, 3, 4), vocab_sizes=(None, 8), margin=1.03)
    reads = {"exact": _reads([0.5, 0.6, 0.9]), "8": _reads([0.5, 0.6, 0.9], seed=1)}
    # cheap drafts; the shortlist head is much cheaper than the exact one
    costs = _costs((0.3, 0.5), {"exact": 0.2, "8": 0.01}, {n: 0.3 + 0.02 * n for n in (1, 2, 3, 4)})
    planner.fit_measured(reads, costs, [3, 4, 5], META, vocabs={"exact": None, "8": [1, 2, 3]})
    plan = planner.plan_
    assert not plan.plain and plan.estimate >= 1.03
    assert plan.draft_vocab == [1, 2, 3]  # the shortlist: as accurate here, and cheaper
    exact = max(e["speedup"] for e in planner.estimates_ if e["head"] == "exact")
    assert plan.estimate > exact
    # the confidence is high exactly where drafts agree: stopping at the first unsure one pays
    assert plan.draft_confidence > 0.2
    assert planner.estimates_[0]["speedup"] == plan.estimate
    settings = plan.decoder_settings(_model("llama")[0])
    assert settings["draft_layer"] == plan.draft_layer and settings["draft_prompt_tokens"] is True


def test_a_drafting_plan_stays_only_if_it_measures_no_slower_than_plain_on_the_clock():
    from adainfer.drafting import DraftPlanner

    model, tok = _model("llama")
    planner = DraftPlanner(
        draft_tokens=(2,), vocab_sizes=(None,), max_new_tokens=6, confirm_batches=2
    )
    costs = _costs((0.2, 0.3), {"exact": 0.1}, {n: 0.3 for n in (1, 2)})
    planner.fit_measured({"exact": _reads([0.8, 0.9, 0.9])}, costs, [3, 4, 5], META)
    plan = planner.plan_
    assert not plan.plain
    # estimated to pay, measured slower: plain decoding for the same model, saying why
    slower = plan.confirmed(0.94)
    assert slower.plain and slower.meta["best_drafting"] == plan.estimate
    assert (slower.model, slower.num_layers, slower.batch_size) == ("tiny-llama", 6, 2)
    assert "estimated" in slower.describe() and "measured 0.94x" in slower.describe()
    faster = plan.confirmed(1.08)
    assert faster.draft_layer == plan.draft_layer and faster.meta["measured"] == 1.08
    assert "measured 1.08x" in faster.describe()
    # on the clock: both decoders on the calibration batches, in both orders; 2 batches of 2
    # from 3 prompts repeat one, which the check says (it may keep a plan that pays there only)
    with pytest.warns(UserWarning, match="only 3 distinct calibration prompts.*at least 4"):
        planner.confirm(model, tok, PROMPTS[:3])
    timed = planner.confirmation_
    assert timed["pairs"] == 4 and timed["batch_size"] == 2 and timed["median"] > 0
    assert timed["identical"] == 1.0  # lossless: the same tokens as plain decoding
    assert planner.plan_.meta["measured"] == timed["median"]
    assert planner.plan_.plain == (timed["median"] < 1)
    assert planner.confirm(model, tok, PROMPTS[:3]).confirmation_ is timed  # timed once
    # nothing to time: a plain plan, or confirm_batches=0
    unchecked = DraftPlanner(
        draft_tokens=(2,), vocab_sizes=(None,), max_new_tokens=6, confirm_batches=0
    )
    unchecked.fit_measured({"exact": _reads([0.8, 0.9, 0.9])}, costs, [3, 4, 5], META)
    assert unchecked.confirm(model, tok, PROMPTS[:3]).confirmation_ is None
    assert unchecked.plan_ == plan
    # enough distinct prompts: timed without a warning
    enough = DraftPlanner(
        draft_tokens=(2,), vocab_sizes=(None,), max_new_tokens=4, confirm_batches=2
    )
    enough.fit_measured({"exact": _reads([0.8, 0.9, 0.9])}, costs, [3, 4, 5], META)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert enough.confirm(model, tok, PROMPTS[:4]).confirmation_["pairs"] == 4


def test_simulated_rounds_follow_the_decoder():
    from adainfer.drafting import simulate

    one = dict(draft_tokens=4, confidence=0.0, round_cost=float, max_new_tokens=100)
    # every draft agrees: 8 tokens after the first in two rounds of 4
    sim = simulate([np.ones(9, bool)], [np.ones(9)], **one)
    assert (sim["plain_steps"], sim["cost"], sim["drafted"], sim["accepted"]) == (8, 8, 8, 8)
    # a trace longer than max_new_tokens: the row stops where the decoder would stop it
    sim = simulate([np.ones(9, bool)], [np.ones(9)], **{**one, "max_new_tokens": 5})
    assert (sim["plain_steps"], sim["cost"]) == (4, 4)
    # the 2nd draft of every round is wrong: a round gains 2 tokens (1 agreed + correction)
    agree = np.array([True] + [True, False] * 4)
    sim = simulate([agree], [np.ones(9)], **one)
    assert sim["cost"] == 4 * 4 and sim["accepted"] == 4
    # stopping at the first unsure draft: rounds draft 2 (the unsure one is verified too)
    sim = simulate([agree], [np.where(agree, 0.9, 0.1)], **{**one, "confidence": 0.5})
    assert sim["cost"] == 4 * 2 and sim["accepted"] == 4
    # a batch: the round drafts on while one row is sure
    sim = simulate(
        [agree, np.ones(9, bool)],
        [np.where(agree, 0.9, 0.1), np.ones(9)],
        **{**one, "confidence": 0.5},
    )
    assert sim["drafted"] > 8


def test_plan_files_round_trip_and_bad_files_are_clear_errors(tmp_path):
    import adainfer
    from adainfer.drafting import DraftPlanner, load_plan, save_plan

    model, tok = _model("llama")
    planner = DraftPlanner(draft_tokens=(2,), vocab_sizes=(8,), margin=1.0)
    costs = _costs((0.2, 0.3), {"8": 0.01}, {n: 0.3 for n in (1, 2)})
    planner.fit_measured(
        {"8": _reads([0.8, 0.9, 0.9])}, costs, [3, 4, 5], META, vocabs={"8": SHORTLIST}
    )
    path = planner.save(tmp_path / "plan.json")
    loaded = load_plan(path)
    assert loaded == planner.plan_ and not loaded.plain
    expected = _plain_greedy(model, tok, PROMPTS[:3], 10)
    assert (
        adainfer.generate(
            model, tok, PROMPTS[:3], plan=loaded, max_new_tokens=10, eos_token_id=[]
        ).tokens
        == expected
    )
    assert (
        adainfer.generate(
            model, tok, PROMPTS[:3], plan=planner, max_new_tokens=10, eos_token_id=[]
        ).tokens
        == expected
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "adainfer.draft-plan", "version": 1, "pla')
    with pytest.raises(ValueError, match="not JSON"):
        load_plan(bad)
    bad.write_text(json.dumps({"policy": "svm"}))
    with pytest.raises(ValueError, match="not an adainfer draft plan"):
        load_plan(bad)
    bad.write_text(json.dumps({"format": "adainfer.draft-plan", "version": 1, "plan": {"x": 1}}))
    with pytest.raises(ValueError, match="damaged"):
        load_plan(bad)
    save_plan(loaded, bad)
    other, _ = _model("llama", layers=4)
    with pytest.raises(ValueError, match="made for tiny-llama"):
        adainfer.generate(other, tok, ["hi"], plan=load_plan(bad))
    with pytest.raises(ValueError, match="not fitted"):
        adainfer.generate(model, tok, ["hi"], plan=DraftPlanner())
    with pytest.raises(ValueError, match="not both plan and draft settings"):
        adainfer.generate(model, tok, ["hi"], plan=loaded, draft_layer=2)


def test_planner_fits_on_a_tiny_model():
    """The whole fit (traces, cross-fitted shortlists, costs on the clock) runs and leaves its
    fitted attributes; what it picks depends on the clock, so only its form is checked."""
    from adainfer.drafting import DraftPlanner

    model, tok = _model("llama")
    planner = DraftPlanner(
        depths=[3, 5],
        draft_tokens=(1, 2),
        vocab_sizes=(None, 16),
        confidences=(0, 0.5),
        max_new_tokens=6,
        repeats=2,
    )
    params = dict(planner.get_params())
    planner.fit(model, tok, PROMPTS[:4], batch_size=2)
    assert planner.get_params() == params
    assert planner.depths_ == [3, 5] and set(planner.acceptance_) == {"exact", "16"}
    assert len(planner.estimates_) == 2 * 2 * 2 * 2
    assert len(planner.vocabs_["16"]) == 16 and planner.vocabs_["exact"] is None
    assert planner.plan_.num_layers == 6 and planner.plan_.batch_size == 2
    # the exact head's acceptance at the last layer but one is what the decoder measures
    assert all(0 <= a <= 1 for a in planner.acceptance_["exact"])


def test_cli_plans_drafts_and_generates_with_the_plan(saved_tiny, tmp_path, capsys):
    from adainfer import generate, load
    from adainfer.cli import main

    model_dir = saved_tiny("llama")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["def f(x):\n    return", "hello", "Q: a\nA:", "1, 2, 3,"]))
    plan = tmp_path / "plan.json"
    args = ["plan-drafts", "--model", model_dir, "--prompts-file", str(prompts), "--repeats", "2"]
    assert main(args + ["--batch-size", "2", "--max-new-tokens", "5", "--out", str(plan)]) == 0
    assert "wrote" in capsys.readouterr().out and plan.exists()
    model, tok = load(model_dir)
    expected = generate(model, tok, ["hello", "Q: a\nA:"], max_new_tokens=6, eos_token_id=[])
    gen = ["generate", "--model", model_dir, "--max-new-tokens", "6", "--json"]
    assert main(gen + ["--prompt", "hello", "--prompt", "Q: a\nA:", "--draft-plan", str(plan)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"] == [t[: len(data["tokens"][i])] for i, t in enumerate(expected.tokens)]
    plan.write_text("[1, 2]")
    assert main(gen + ["--prompt", "hello", "--draft-plan", str(plan)]) == 2
    assert "not an adainfer draft plan" in capsys.readouterr().err
