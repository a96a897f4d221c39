"""Planning drafts that leave where a token-exit policy says: how many a round, or plain."""

from __future__ import annotations

import json

import numpy as np
import pytest

import adainfer
from adainfer.drafting import ExitDraftPlan, ExitDraftPlanner, load_plan, simulate_exit_drafts
from adainfer.lossy import ExitCosts, ExitTrace
from test_generation import PROMPTS, _model, _plain_greedy
from test_lossy import forced

L = 6


def test_rounds_are_simulated_as_the_decoder_runs_them():
    """One row: drafts leave at layer 3 (or go the full depth, L), a round stops after a
    draft that did not leave early or after 3; the verification keeps the leading agreements
    plus the full model's token, at most the drafts it verified."""
    agree = np.array([1, 1, 1, 0, 1, 1], dtype=bool)  # token 0 comes from the prefill
    depth = np.array([L, 3, 3, 3, L, 3])
    sim = simulate_exit_drafts(
        [agree],
        [depth],
        lambda at: 0.5 * len(at),
        lambda n: 1.0,
        num_layers=L,
        draft_tokens=3,
        max_new_tokens=100,
    )
    # round 1: drafts 1-3 (all leave), 1-2 accepted, 3 replaced: t = 4, cost 3 * 0.5 + 1
    # round 2: draft 4 runs the full depth and stops the round: accepted, t = 5, cost 1.5
    # round 3: draft 5 leaves, the row's end drafts at full depth; 5 accepted: cost 2
    assert sim == {
        "plain_steps": 5.0,
        "cost": 6.0,
        "drafted": 6.0,
        "accepted": 4.0,
        "depth": 3 * 3 + L + 3 + L,
    }


def _trace(agree_at_3: np.ndarray, vocab: np.ndarray, prompts: int = 8) -> ExitTrace:
    """Tokens whose shortlist top-1 at layer 3 agrees as given (every other layer agrees)."""
    n = len(agree_at_3)
    agree = np.ones((n, L), dtype=bool)
    agree[:, 2] = agree_at_3
    features = np.zeros((n, L, 3))
    return ExitTrace(
        vocab, features, agree, np.full(n, 3), np.repeat(np.arange(prompts), n // prompts)
    )


def _verify(cost: float, d: int = 3, sizes=range(1, 5)) -> dict:
    return {"steps": {f"verify{n}@{d}": {"median": cost} for n in sizes}}


def test_the_plan_drafts_where_verification_is_cheap_and_decodes_plainly_where_not():
    model, _ = _model("llama")
    policy = forced(model, 3)  # every draft leaves at layer 3
    free = ExitCosts.layers_only(L)  # a draft step costs its layers: half a step
    trace = _trace(np.ones(104, dtype=bool), policy.vocab_)  # 12 drafts a prompt
    meta = {"batch_size": 1}
    cheap = ExitDraftPlanner(policy).fit_measured(trace, free, _verify(0.01), meta)
    best = cheap.estimates_[0]
    assert cheap.plan_.draft_tokens == 4 and best["acceptance"] == 1.0
    assert best["mean_depth"] == 3.0 and best["speedup"] > 1.5
    # kept where it measured no slower than plain on the clock, else plain (saying why)
    assert cheap.plan_.confirmed(1.2).draft_tokens == 4
    slower = cheap.plan_.confirmed(0.9)
    assert slower.plain and slower.meta["best_drafting"] == best["speedup"]
    assert "measured 0.90x" in slower.describe()
    dear = ExitDraftPlanner(policy).fit_measured(trace, free, _verify(5.0), meta)
    assert dear.plan_.plain and dear.plan_.meta["best_drafting"] < 1
    assert "plain decoding" in dear.plan_.describe()
    # drafts that the full model rejects half the time pay less than ones it accepts
    half = ExitDraftPlanner(policy).fit_measured(
        _trace(np.arange(104) % 2 == 0, policy.vocab_), free, _verify(0.01), meta
    )
    assert half.estimates_[0]["speedup"] < best["speedup"]
    assert half.estimates_[0]["acceptance"] < 1
    # a policy that certified no exit has nothing to draft: plain, nothing to time
    none = forced(model, 3)
    none.layers_, none.coef_, none.intercept_ = [], np.zeros((0, 3)), np.zeros(0)
    assert ExitDraftPlanner(none).fit_measured(trace, free, None, meta).plan_.plain


def test_planned_exit_drafts_keep_plain_greedy_and_plan_files_round_trip(tmp_path):
    model, tok = _model("llama")
    policy = forced(model, 3)
    planner = ExitDraftPlanner(policy, draft_tokens=(1, 3), max_new_tokens=6, repeats=2)
    params = planner.get_params()
    planner.fit(model, tok, PROMPTS[:4], batch_size=2)
    assert planner.policy is policy and planner.get_params() == params  # fit keeps them
    assert {r["draft_tokens"] for r in planner.estimates_} == {1, 3}
    assert planner.costs_["exit"]["rows"] == 2 and "verify3@3" in planner.costs_["verify"]["steps"]
    expected = _plain_greedy(model, tok, PROMPTS[:3], 10)
    for plan in (planner, ExitDraftPlan(policy, 3), ExitDraftPlan(policy, None)):
        got = adainfer.generate(
            model, tok, PROMPTS[:3], plan=plan, max_new_tokens=10, eos_token_id=[]
        )
        assert got.tokens == expected
    drafting = ExitDraftPlan(policy, 3)
    got = adainfer.generate(model, tok, PROMPTS[:3], plan=drafting, max_new_tokens=10)
    assert got.draft_layers and all(3 in layers for layers in got.draft_layers)
    path = planner.save(tmp_path / "plan.json")
    assert json.loads(path.read_text())["params"]["draft_tokens"] == [1, 3]
    loaded = load_plan(path)
    assert loaded.draft_tokens == planner.plan_.draft_tokens
    assert loaded.policy.layers_ == [3] and loaded.batch_size == 2
    data = json.loads(path.read_text())
    data["plan"]["draft_tokens"] = 0
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="damaged exit-draft plan.*draft_tokens"):
        load_plan(path)
    other, _ = _model("llama", layers=4)
    with pytest.raises(ValueError, match="calibrate one for this model"):
        adainfer.generate(other, tok, ["hi"], plan=ExitDraftPlan(policy, None))
    with pytest.raises(ValueError, match="not fitted"):
        adainfer.generate(model, tok, ["hi"], plan=ExitDraftPlanner(policy))


def test_cli_plans_exit_drafts(saved_tiny, tmp_path, capsys):
    from adainfer.cli import main

    model_dir = saved_tiny("llama")
    model, _ = adainfer.load(model_dir)
    exits = tmp_path / "exits.json"
    forced(model, 3).save(exits)
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["def f(x):\n    return", "hello", "Q: a\nA:", "1, 2, 3,"]))
    plan = tmp_path / "plan.json"
    args = ["plan-drafts", "--model", model_dir, "--prompts-file", str(prompts), "--repeats", "2"]
    args += ["--exits", str(exits), "--max-new-tokens", "5", "--out", str(plan)]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert json.loads(plan.read_text())["format"] == "adainfer.exit-draft-plan"
    gen = ["generate", "--model", model_dir, "--max-new-tokens", "6", "--json"]
    assert main(gen + ["--prompt", "hello", "--draft-plan", str(plan)]) == 0
    assert json.loads(capsys.readouterr().out)["tokens"]


def test_an_exit_draft_plan_decodes_plainly_where_a_sliding_window_blocks_drafting():
    """As a fixed-depth plan: unplanned exit drafts are refused, a plan's decode plainly."""
    from adainfer.generation import DraftingBlocked
    from conftest import tiny_model

    gemma, tok = tiny_model("gemma3")  # sliding window of 8
    policy = forced(gemma, 2)
    plain = adainfer.generate(gemma, tok, ["hello"], max_new_tokens=8, eos_token_id=[])
    blocked = adainfer.generate(
        gemma, tok, ["hello"], plan=ExitDraftPlan(policy, 2), max_new_tokens=8, eos_token_id=[]
    )
    assert blocked.tokens == plain.tokens and blocked.drafted.sum() == 0
    with pytest.raises(DraftingBlocked):
        adainfer.generate(gemma, tok, ["hello"], draft_exits=policy, max_new_tokens=8)


def test_the_planner_refuses_a_trace_of_another_shortlist_and_caps_long_rows():
    model, _ = _model("llama")
    policy = forced(model, 3)
    trace = _trace(np.ones(104, dtype=bool), policy.vocab_)
    free, meta = ExitCosts.layers_only(L), {"batch_size": 1}
    other = ExitTrace(trace.vocab + 1, trace.features, trace.agree, trace.settled, trace.prompt)
    with pytest.raises(ValueError, match="shortlist"):
        ExitDraftPlanner(policy).fit_measured(other, free, _verify(0.01), meta)
    # 13 traced tokens a prompt against 5 new tokens: each row is cut to what it may generate
    short = ExitDraftPlanner(policy, max_new_tokens=5).fit_measured(
        trace, free, _verify(0.01), meta
    )
    assert short.estimates_[0]["draft_tokens"] == 4 and short.estimates_[0]["speedup"] > 1
    with pytest.raises(ValueError, match="at least 1"):
        ExitDraftPlanner(policy, draft_tokens=(0, 2)).fit_measured(trace, free, _verify(0.01), meta)
