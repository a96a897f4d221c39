"""Check-cost-aware exits: the schedule is learned, never pays more than it saves."""

import numpy as np
import torch
from conftest import tiny_model
from test_engine import PROMPTS, ExitAt

from adainfer import AdaptiveEngine
from adainfer.checks import candidate_schedules, measure_check_cost, plan_checks
from adainfer.engine import plain_last_logits
from adainfer.offline import Traces, simulate
from adainfer.policies import GapThreshold, NeverExit


def settling_traces(Q=40, L=12, settle=(7, 10), seed=0):
    """The answer (token 5) appears at a random layer in `settle` and the gap jumps there."""
    rng = np.random.default_rng(seed)
    at = rng.integers(*settle, size=Q)
    layers = np.arange(1, L + 1)
    right = layers[None] >= at[:, None]
    gap = np.where(right, 0.9, 0.1) + rng.normal(0, 0.01, (Q, L))
    return Traces(
        query_id=np.array([f"q{i}" for i in range(Q)]), task=np.array(["t"] * Q),
        features=np.stack([gap, gap + 0.05], -1), feature_names=("gap", "top_prob"),
        top1=np.where(right, 5, 1), choice_top1=np.full((Q, L), -1), gold=np.full(Q, 5), seq_len=np.full(Q, 20),
    )  # fmt: skip


def test_candidates_never_include_the_last_layer():
    for layers in candidate_schedules(6):
        assert layers and max(layers) < 6 and list(layers) == sorted(layers)


def test_cheap_checks_get_a_schedule_that_saves_layers():
    traces = settling_traces()
    plan = plan_checks(GapThreshold(0.5), traces, check_cost=0.1)
    assert plan.check_layers and min(plan.check_layers) >= 6  # no check where no answer can be
    assert plan.expected_cost < 12 * 0.95
    assert plan.expected_accuracy >= plan.full_accuracy - 0.01
    every = simulate(GapThreshold(0.5), traces, check_layers=range(1, 12))
    assert plan.expected_cost < (every.exit_layer + 0.1 * every.num_checks).mean()  # beats checking everywhere


def test_expensive_checks_fall_back_to_the_plain_model():
    plan = plan_checks(GapThreshold(0.5), settling_traces(), check_cost=10.0)
    assert plan.check_layers == () and plan.expected_cost == 12


def test_no_schedule_when_accuracy_would_drop():
    traces = settling_traces()
    traces.top1[:, -1] = 5
    traces.top1[:, :-1] = 1  # only the last layer is ever right, although the gap says otherwise
    plan = plan_checks(GapThreshold(0.5), traces, check_cost=0.01)
    assert plan.check_layers == ()


def test_an_empty_plan_runs_the_plain_model(monkeypatch):
    engine = AdaptiveEngine(*tiny_model("llama"))
    policy = GapThreshold(0.0)
    policy.check_layers_ = ()
    calls = []
    original = engine._plain_run
    monkeypatch.setattr(engine, "_plain_run", lambda *a: calls.append(1) or original(*a))
    result = engine.run(PROMPTS, policy)
    assert calls and (result.exit_layer == 4).all() and (result.num_checks == 0).all()
    torch.testing.assert_close(result.logits, plain_last_logits(engine, PROMPTS), rtol=1e-5, atol=1e-5)


def test_bf16_checks_answer_with_the_exact_head():
    model, tok = tiny_model("qwen2")
    exact = AdaptiveEngine(model, tok).run(PROMPTS, ExitAt([1, 2, 3, 4]))
    cheap = AdaptiveEngine(model, tok, check_dtype=torch.bfloat16).run(PROMPTS, ExitAt([1, 2, 3, 4]))
    assert cheap.exit_layer.tolist() == [1, 2, 3, 4]
    torch.testing.assert_close(cheap.logits, exact.logits, rtol=1e-5, atol=1e-5)
    assert cheap.top1.tolist() == exact.top1.tolist()
    # the features came from the bf16 head: close, not equal
    np.testing.assert_allclose(cheap.features[:, 0], exact.features[:, 0], atol=0.05)


def test_measured_check_cost_is_positive():
    engine = AdaptiveEngine(*tiny_model("llama"))
    assert measure_check_cost(engine, PROMPTS, repeats=2) > 0
    assert NeverExit().check_layers_ == ()
