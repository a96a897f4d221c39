"""Check-cost-aware exits: the schedule is learned, never pays more than it saves."""

import numpy as np
import pytest
import torch

from adainfer import AdaptiveEngine
from adainfer.checks import PlannedPolicy, candidate_schedules, plan_checks
from adainfer.offline import Traces, simulate
from adainfer.policies import GapThreshold, NeverExit
from adainfer.prefill import plain_last_logits
from adainfer.timing import measure_check_cost
from conftest import tiny_model
from test_engine import PROMPTS, ExitAt


def settling_traces(Q=40, L=12, settle=(7, 10), seed=0):
    """The answer (token 5) appears at a random layer in `settle` and the gap jumps there."""
    rng = np.random.default_rng(seed)
    at = rng.integers(*settle, size=Q)
    layers = np.arange(1, L + 1)
    right = layers[None] >= at[:, None]
    gap = np.where(right, 0.9, 0.1) + rng.normal(0, 0.01, (Q, L))
    return Traces(
        query_id=np.array([f"q{i}" for i in range(Q)]),
        task=np.array(["t"] * Q),
        features=np.stack([gap, gap + 0.05], -1),
        feature_names=("gap", "top_prob"),
        top1=np.where(right, 5, 1),
        choice_top1=np.full((Q, L), -1),
        gold=np.full(Q, 5),
        seq_len=np.full(Q, 20),
    )


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
    assert (
        plan.expected_cost < (every.exit_layer + 0.1 * every.num_checks).mean()
    )  # beats checking everywhere


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
    policy = PlannedPolicy.from_plans(GapThreshold(0.0), {1: ()})
    calls = []
    original = engine._plain_run
    monkeypatch.setattr(engine, "_plain_run", lambda *a: calls.append(1) or original(*a))
    result = engine.run(PROMPTS, policy)
    assert calls and (result.exit_layer == 4).all() and (result.num_checks == 0).all()
    torch.testing.assert_close(
        result.logits, plain_last_logits(engine, PROMPTS), rtol=1e-5, atol=1e-5
    )


def test_bf16_checks_answer_with_the_exact_head():
    model, tok = tiny_model("qwen2")
    exact = AdaptiveEngine(model, tok).run(PROMPTS, ExitAt([1, 2, 3, 4]))
    cheap = AdaptiveEngine(model, tok, check_dtype=torch.bfloat16).run(
        PROMPTS, ExitAt([1, 2, 3, 4])
    )
    assert cheap.exit_layer.tolist() == [1, 2, 3, 4]
    torch.testing.assert_close(cheap.logits, exact.logits, rtol=1e-5, atol=1e-5)
    assert cheap.top1.tolist() == exact.top1.tolist()
    assert cheap.num_confirms.tolist() == [
        1,
        1,
        1,
        0,
    ]  # each early answer is projected again, exactly
    # the features came from the bf16 head: close, not equal
    np.testing.assert_allclose(cheap.features[:, 0], exact.features[:, 0], atol=0.05)


def test_measured_check_cost_is_positive():
    engine = AdaptiveEngine(*tiny_model("llama"))
    assert measure_check_cost(engine, PROMPTS, repeats=2) > 0
    assert NeverExit().planned_checks() == ()


def test_trained_policies_are_planned_out_of_fold():
    from adainfer.policies import LogisticExit

    traces = settling_traces(Q=60)
    policy = LogisticExit(features=("gap", "top_prob")).fit(
        *traces.training_arrays(("gap", "top_prob"))
    )
    coef = policy.coef_.copy()
    plan = plan_checks(policy, traces, check_cost=0.1)
    assert plan.held_out and plan.check_layers and plan.expected_cost < 12 * 0.95
    np.testing.assert_array_equal(policy.coef_, coef)  # the folds fit clones, not the policy
    assert not plan_checks(policy, traces, check_cost=0.1, folds=1).held_out
    assert not plan_checks(GapThreshold(0.5), traces, check_cost=0.1).held_out  # nothing to fit


def test_traces_give_the_same_training_arrays_as_collect(tmp_path):
    from adainfer.collect import collect, load_collected, training_arrays
    from adainfer.tasks import task_queries
    from conftest import char_tokenizer

    engine = AdaptiveEngine(*tiny_model("llama"))
    train, _ = task_queries(char_tokenizer(), ["capitalize"], shots=1, n_train=5, n_test=2)
    collect(engine, train, tmp_path, batch_size=4, progress=False)
    table, _ = load_collected(tmp_path)
    names = ("gap", "top_prob")
    for a, b in zip(
        Traces.from_table(table, names).training_arrays(names), training_arrays(table, names)
    ):
        np.testing.assert_array_equal(a, b)
    stored = (
        table.sort_by([("query_id", "ascending"), ("layer", "ascending")])
        .column("label")
        .to_numpy()
    )
    np.testing.assert_array_equal(
        training_arrays(table, names)[1], stored
    )  # gold labels, as collected


def test_final_labels_mark_the_layers_from_which_the_answer_no_longer_changes():
    traces = settling_traces(Q=3, L=6)
    traces.top1[:] = [[1, 2, 5, 5, 5, 5], [5, 5, 1, 5, 5, 5], [1, 1, 1, 1, 1, 2]]
    assert traces.labels("final").astype(int).tolist() == [
        [0, 0, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 0, 0, 1],
    ]
    assert traces.labels("gold").astype(int).tolist() == [
        [0, 0, 1, 1, 1, 1],
        [1, 1, 0, 1, 1, 1],
        [0] * 6,
    ]
    with pytest.raises(ValueError, match="final"):
        traces.labels("silver")


def test_the_plan_tunes_the_stop_threshold_to_keep_the_full_models_answers():
    from adainfer.checks import THRESHOLDS, plan_checks_by_batch
    from adainfer.policies import LogisticExit

    rng = np.random.default_rng(1)
    traces = settling_traces(Q=80)
    # a noisy gap: some rows look sure a few layers before their answer appears
    traces.features[:, :, 0] += rng.normal(0, 0.25, traces.features[:, :, 0].shape)
    policy = LogisticExit(features=("gap",)).fit(*traces.training_arrays(("gap",), "final"))
    final = dict(target="final")
    loose = plan_checks_by_batch(
        policy, traces, {1: 0.05}, min_agreement=0.0, tolerance=1.0, **final
    )[1]
    tuned = plan_checks_by_batch(
        policy, traces, {1: 0.05}, thresholds=THRESHOLDS, min_agreement=0.99, **final
    )[1]
    assert tuned.check_layers and tuned.threshold in THRESHOLDS and tuned.expected_agreement >= 0.99
    assert loose.expected_agreement < 0.99  # without the agreement test it would stop too soon
    planned = PlannedPolicy(
        LogisticExit(features=("gap",)),
        check_costs=0.05,
        thresholds=THRESHOLDS,
        min_agreement=0.99,
        risk=None,  # the agreement test, as the function above
        **final,
    ).fit(traces)
    assert planned.plans_ == {1: tuned}
    assert planned.threshold_ == planned.policy_.threshold == tuned.threshold


def test_one_policy_carries_a_plan_per_batch_size(tmp_path):
    from adainfer.checks import plan_checks_by_batch
    from adainfer.persist import load_policy, save_policy

    traces = settling_traces()
    # a check is dear at batch 1 and cheap at batch 8: only the cheap one is worth making
    plans = plan_checks_by_batch(GapThreshold(0.5), traces, {1: 10.0, 8: 0.1})
    assert plans[1].check_layers == () and plans[8].check_layers
    policy = PlannedPolicy(GapThreshold(0.5), check_costs={8: 0.1, 1: 10.0}, risk=None).fit(traces)
    assert policy.plans_ == plans and list(policy.plans_) == [1, 8]
    assert policy.planned_checks(1) == () and policy.planned_checks(3) == ()
    assert policy.planned_checks(8) == policy.planned_checks(64) == plans[8].check_layers
    assert policy.planned_checks() == ()  # offline replays: the smallest batch size's plan
    loaded = load_policy(save_policy(policy, tmp_path / "p.safetensors"))
    assert loaded.plans_ == policy.plans_ and loaded.threshold_ == 0.5

    engine = AdaptiveEngine(*tiny_model("llama"))
    # stops at its first check
    policy = PlannedPolicy.from_plans(GapThreshold(0.0), {1: (), 2: (2,)})
    assert (engine.run(PROMPTS[:1], policy).exit_layer == 4).all()  # batch 1: plain model
    assert (engine.run(PROMPTS[:2], policy).exit_layer == 2).all()  # batch 2: checks layer 2


def test_check_cost_option_takes_one_cost_or_one_per_batch_size():
    import argparse

    import pytest

    from adainfer.cli import _check_cost, parse_check_cost

    assert parse_check_cost("0.8") == 0.8
    assert parse_check_cost("1:1.2,8:0.2") == {1: 1.2, 8: 0.2}
    for bad in ("x", "1:a", "0:1.0", "1:-1"):
        with pytest.raises(ValueError, match="--check-cost"):
            parse_check_cost(bad)
        with pytest.raises(argparse.ArgumentTypeError, match="--check-cost"):
            _check_cost(bad)  # what argparse needs to show the message


class StopWhenTopProb(GapThreshold):
    """Stops when P(top-1) >= threshold: on a 2-token shortlist that is always true."""

    def __init__(self, threshold=0.45):
        self.threshold = threshold
        self.features = ("top_prob",)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_shortlist_checks_answer_and_decide_on_the_whole_vocabulary(arch):
    model, tok = tiny_model(arch)
    exact = AdaptiveEngine(model, tok).run(PROMPTS, ExitAt([2, 3, 4, 2]))
    short = AdaptiveEngine(model, tok, shortlist=8).run(PROMPTS, ExitAt([2, 3, 4, 2]))
    assert short.exit_layer.tolist() == [2, 3, 4, 2]
    torch.testing.assert_close(
        short.logits, exact.logits, rtol=1e-5, atol=1e-5
    )  # answers: exact head
    assert short.num_checks.tolist() == exact.num_checks.tolist() == [2, 3, 3, 2]
    assert short.num_short_checks.tolist() == [1, 2, 2, 1]  # all but the first check of each row
    assert (
        short.num_confirms.tolist() == [1, 1, 0, 1] and exact.num_confirms.tolist() == [0] * 4
    )  # charged
    # the exit layer's features are the exact ones (confirmed), earlier ones the shortlist's
    np.testing.assert_allclose(
        short.features[[0, 3], 1], exact.features[[0, 3], 1], rtol=1e-5, atol=1e-6
    )

    # a 2-token shortlist makes every row look sure (P >= 0.5), the whole vocabulary does not:
    # the exact confirmation refuses every stop, and each row runs to the end
    engine = AdaptiveEngine(model, tok, shortlist=2)
    policy = StopWhenTopProb(0.45)
    r = engine.run(PROMPTS, policy, check_layers=[1, 2, 3])
    assert (
        (r.exit_layer == 4).all()
        and r.num_checks.tolist() == [3] * 4
        and r.num_short_checks.tolist() == [2] * 4
    )
    assert r.num_confirms.tolist() == [2] * 4  # refused confirmations cost a whole head too
    torch.testing.assert_close(r.logits, plain_last_logits(engine, PROMPTS), rtol=1e-5, atol=1e-5)


def test_shortlist_size_is_checked():
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match="shortlist"):
        AdaptiveEngine(model, tok, shortlist=model.config.vocab_size)


def test_near_free_shortlist_checks_let_the_plan_check_more():
    traces = settling_traces(settle=(3, 11))  # answers settle over a wide range of layers
    dear = plan_checks(GapThreshold(0.5), traces, check_cost=2.0)
    from adainfer.checks import plan_checks_by_batch

    cheap = plan_checks_by_batch(GapThreshold(0.5), traces, {1: 2.0}, shortlist_costs={1: 0.01})[1]
    assert len(cheap.check_layers) > len(dear.check_layers)
    assert cheap.expected_cost < dear.expected_cost


def test_min_agreement_must_be_a_share():
    with pytest.raises(ValueError, match="between 0 and 1"):
        plan_checks(GapThreshold(0.5), settling_traces(), check_cost=0.1, min_agreement=99)


def test_a_plan_that_changes_answers_passes_only_if_its_loss_is_bounded():
    # the last layer turns 20% of the right answers wrong: stopping early changes those answers
    traces = settling_traces(Q=80)
    traces.top1[::5, -1] = 1
    gains = plan_checks(
        GapThreshold(0.5), traces, check_cost=0.1
    )  # default: agreement 97% or 95% bound
    assert (
        gains.check_layers
        and gains.expected_agreement < 0.9
        and gains.expected_accuracy > gains.full_accuracy
    )
    assert (
        plan_checks(GapThreshold(0.5), traces, check_cost=0.1, confidence=0).check_layers == ()
    )  # agreement test only

    # as many answers turn right as wrong: no loss on average, but too noisy to bound within 1 point
    traces = settling_traces(Q=80)
    traces.top1[::5, -1] = 1
    traces.top1[1::5, 6:-1] = 1  # wrong until the last layer
    traces.features[1::5, 6:-1, 0] = 0.9  # ... although the gap looks sure
    plan = plan_checks(GapThreshold(0.5), traces, check_cost=0.1)
    assert plan.check_layers == ()
    with pytest.raises(ValueError, match="below 1"):
        plan_checks(GapThreshold(0.5), traces, check_cost=0.1, confidence=1)


def test_one_set_of_replays_plans_both_kinds_of_check():
    from adainfer.checks import THRESHOLDS, plan_checks_by_batch, replay_schedules
    from adainfer.policies import LogisticExit

    traces = settling_traces(Q=60, settle=(3, 11))
    policy = LogisticExit(features=("gap",)).fit(*traces.training_arrays(("gap",), "final"))
    replays = replay_schedules(policy, traces, thresholds=THRESHOLDS, target="final")
    costs = {1: 2.0, 8: 0.3}
    for short in (None, {1: 0.01, 8: 0.005}):
        fresh = plan_checks_by_batch(
            policy, traces, costs, shortlist_costs=short, thresholds=THRESHOLDS, target="final"
        )
        reused = plan_checks_by_batch(policy, traces, costs, shortlist_costs=short, replays=replays)
        assert reused == fresh
        planned = PlannedPolicy(
            policy, prefit=True, check_costs=costs, shortlist_costs=short, target="final", risk=None
        )
        assert planned.fit(traces, replays=replays).plans_ == fresh


# ----------------------------------------------------------------------------- PlannedPolicy
def test_planned_policy_is_a_scikit_learn_meta_estimator():
    from sklearn.base import clone
    from sklearn.exceptions import NotFittedError

    from adainfer.checks import THRESHOLDS
    from adainfer.policies import LogisticExit

    planner = PlannedPolicy(
        LogisticExit(features=["gap"]), check_costs={1: 0.1, 8: 0.05}, thresholds=THRESHOLDS
    )
    params = planner.get_params()
    assert params["policy__C"] == 1.0 and params["check_costs"] == {1: 0.1, 8: 0.05}
    assert params["target"] == "gold" and params["prefit"] is False
    twin = clone(planner)
    assert type(twin) is PlannedPolicy and twin.policy is not planner.policy
    assert repr(twin) == repr(planner)
    assert twin.set_params(policy__threshold=0.7).policy.threshold == 0.7
    assert planner.policy.threshold == 0.5
    with pytest.raises(NotFittedError):
        planner.planned_checks(1)


@pytest.mark.parametrize("prefit", [False, True])
def test_planning_learns_its_own_attributes_and_leaves_what_it_was_given(prefit):
    import copy
    import dataclasses

    from adainfer.checks import THRESHOLDS, plan_checks_by_batch
    from adainfer.policies import LogisticExit

    traces = dataclasses.replace(settling_traces(Q=60), model={"model_id": "m"})
    features, costs = ["gap", "top_prob"], {1: 0.5, 8: 0.1}
    given = LogisticExit(features=features)
    if prefit:
        given.fit(*traces.training_arrays(features, "final"))
    state = copy.deepcopy(given.__dict__)
    planner = PlannedPolicy(
        given, check_costs=costs, thresholds=THRESHOLDS, target="final", prefit=prefit, risk=None
    )
    before = planner.get_params()  # deep: the wrapped policy's parameters too
    planner.fit(traces)
    after = planner.get_params()
    assert after == before and all(after[k] is before[k] for k in before)
    # the estimator passed in is untouched: no fitted state, threshold or plan written on it
    assert given.__dict__.keys() == state.keys()
    for k, v in state.items():
        np.testing.assert_array_equal(given.__dict__[k], v)
    assert planner.policy_ is not given and planner.policy_.threshold == planner.threshold_
    assert planner.target_ == "final" and planner.model_ == {"model_id": "m"}
    # the plans are the planner function's, for the same fitted classifier
    fitted = given if prefit else LogisticExit(features=features)
    if not prefit:
        fitted.fit(*traces.training_arrays(features, "final"))
    direct = plan_checks_by_batch(fitted, traces, costs, thresholds=THRESHOLDS, target="final")
    assert planner.plans_ == direct and list(planner.plans_) == [1, 8]
    assert planner.threshold_ == direct[1].threshold


def test_without_check_costs_the_policy_is_fitted_and_checks_every_layer():
    from adainfer.policies import LogisticExit

    traces = settling_traces()
    planned = PlannedPolicy(LogisticExit(features=("gap",)), target="final").fit(traces)
    assert planned.plans_ == {} and planned.planned_checks(8) is None
    assert planned.target_ == "final" and planned.threshold_ == 0.5 and planned.model_ is None
    every = simulate(planned.policy_, traces, check_layers=range(1, 12))
    replay = simulate(planned, traces)
    assert replay.exit_layer.tolist() == every.exit_layer.tolist()
    assert replay.num_checks.tolist() == every.num_checks.tolist()


# ----------------------------------------------------------------------------- Learn-then-Test
def test_plans_are_tested_by_learn_then_test_on_queries_the_classifier_never_saw():
    from adainfer.checks import THRESHOLDS, plan_checks_by_batch, replay_schedules
    from adainfer.policies import LogisticExit

    traces = settling_traces(Q=400)
    planner = PlannedPolicy(
        LogisticExit(features=("gap",)), check_costs={1: 0.1}, thresholds=THRESHOLDS, target="final"
    )
    assert (planner.risk, planner.epsilon, planner.delta) == ("consistency", 0.05, 0.05)
    planner.fit(traces)
    plan = planner.plans_[1]
    assert plan.check_layers and plan.risk == "consistency" and plan.tested_on == 200
    assert plan.p_value <= 0.05 and plan.expected_agreement >= 0.95 and plan.held_out
    # the classifier saw the fitting share only; the plan is the planner function's on the rest
    fitting, testing = planner.split(traces)
    fitted = LogisticExit(features=("gap",)).fit(*fitting.training_arrays(("gap",), "final"))
    np.testing.assert_allclose(planner.policy_.coef_, fitted.coef_)
    order = replay_schedules(fitted, fitting, thresholds=THRESHOLDS, target="final")
    direct = plan_checks_by_batch(
        fitted, testing, {1: 0.1}, thresholds=THRESHOLDS, order_replays=order, risk="consistency"
    )
    assert direct == planner.plans_


def test_too_few_calibration_queries_for_the_promise_run_the_plain_model():
    from adainfer.risk import min_queries

    traces = settling_traces(Q=80)  # 40 testing queries: (1 - 0.05)^40 > 0.05
    assert min_queries(0.05, 0.05) > 40
    plan = PlannedPolicy(GapThreshold(0.5), check_costs=0.1).fit(traces).plans_[1]
    assert plan.check_layers == () and plan.tested_on == 40 and plan.p_value is None
    # a looser promise is kept on as few queries
    loose = PlannedPolicy(GapThreshold(0.5), check_costs=0.1, epsilon=0.2).fit(traces).plans_[1]
    assert loose.check_layers and loose.epsilon == 0.2
    with pytest.raises(ValueError, match="epsilon"):
        PlannedPolicy(GapThreshold(0.5), check_costs=0.1, epsilon=0).fit(traces)


def test_the_accuracy_risk_counts_answers_lost_not_answers_changed():
    # the last layer turns 20% of the right answers wrong: stopping early changes them but
    # loses none, so the accuracy risk accepts the plan and the consistency risk does not
    traces = settling_traces(Q=400)
    traces.top1[::5, -1] = 1
    kw = dict(check_costs=0.1)
    accuracy = PlannedPolicy(GapThreshold(0.5), risk="accuracy", **kw).fit(traces).plans_[1]
    consistency = PlannedPolicy(GapThreshold(0.5), **kw).fit(traces).plans_[1]
    assert accuracy.check_layers and accuracy.expected_accuracy > accuracy.full_accuracy
    assert consistency.check_layers == ()


def test_the_tool_says_what_a_plan_promises_or_why_the_plain_model_runs():
    from adainfer.checks import promise

    traces = settling_traces(Q=80)
    plain = PlannedPolicy(GapThreshold(0.5), check_costs=0.1).fit(traces).plans_
    assert "the plain model runs" in promise(plain) and "at least 59 testing" in promise(plain)
    kept = PlannedPolicy(GapThreshold(0.5), check_costs=0.1, epsilon=0.2).fit(traces).plans_
    assert promise(kept).startswith("guarantee: consistency risk <= 0.2 with probability >= 0.95")
    assert "new task is not covered" in promise(kept)
    legacy = PlannedPolicy(GapThreshold(0.5), check_costs=0.1, risk=None).fit(traces).plans_
    assert "no risk guarantee" in promise(legacy)
