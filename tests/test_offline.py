"""Replaying policies on collected traces gives exactly what a live engine run gives."""

import dataclasses

import numpy as np
import pytest

from adainfer import AdaptiveEngine
from adainfer.checks import PlannedPolicy
from adainfer.collect import collect, load_collected
from adainfer.features import ALL_FEATURES
from adainfer.offline import Traces, oracle_bounds, simulate
from adainfer.policies import GapThreshold, LogisticExit, NeverExit, OracleExit
from adainfer.tasks import task_queries
from conftest import char_tokenizer, tiny_model
from test_engine import ExitAt


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    model, tok = tiny_model("qwen2", layers=6)
    engine = AdaptiveEngine(model, tok)
    queries, _ = task_queries(
        char_tokenizer(), ["capitalize", "last_item"], shots=2, n_train=6, n_test=4
    )
    out = tmp_path_factory.mktemp("traces")
    collect(engine, queries, out, progress=False)
    table, meta = load_collected(out)
    traces = Traces.from_table(table, ALL_FEATURES)
    order = {q.id: q for q in queries}
    return engine, [order[i] for i in traces.query_id], traces


def _live(engine, queries, policy):
    return engine.run(
        [q.prompt for q in queries], policy, gold=[q.gold for q in queries], features=ALL_FEATURES
    )


def test_replay_matches_live_gap_policy(traced):
    engine, queries, traces = traced
    threshold = float(np.median(traces.features[:, :-1, 0].max(1)))  # some rows stop, some don't
    live = _live(engine, queries, GapThreshold(threshold))
    replay = simulate(GapThreshold(threshold), traces)
    assert replay.exit_layer.tolist() == live.exit_layer.tolist()
    assert replay.num_checks.tolist() == live.num_checks.tolist()
    assert (replay.correct == (live.top1 == traces.gold)).all()
    assert len(set(replay.exit_layer)) > 1


def test_replay_matches_live_trained_policy_with_learned_check_layers(traced):
    engine, queries, traces = traced
    X = traces.features[:, :, :2].reshape(-1, 2)
    y = (X[:, 0] > np.median(X[:, 0])).astype(int)  # stand-in labels: a random model is never right
    policy = PlannedPolicy.from_plans(LogisticExit().fit(X, y), {1: (2, 4)})
    live = _live(engine, queries, policy)
    replay = simulate(policy, traces)
    assert replay.exit_layer.tolist() == live.exit_layer.tolist()
    assert set(replay.exit_layer) <= {2, 4, 6}


def test_replay_uses_the_plan_of_the_batch_size_the_engine_would(traced):
    engine, queries, traces = traced
    # stops at the first layer it checks
    policy = PlannedPolicy.from_plans(GapThreshold(-1.0), {1: (3,), 4: (2,)})
    live = engine.run([q.prompt for q in queries[:4]], policy, features=ALL_FEATURES)
    assert set(live.exit_layer) == {2}  # a batch of 4 uses the batch-4 plan
    assert simulate(policy, traces, batch_size=4).exit_layer.tolist() == [2] * len(traces)
    assert simulate(policy, traces).exit_layer.tolist() == [3] * len(
        traces
    )  # no batch size: the smallest batch size's plan
    narrow = dataclasses.replace(
        traces, features=traces.features[:, :, :2], feature_names=traces.feature_names[:2]
    )
    with pytest.raises(ValueError, match=r"features \['entropy'\] that the traces lack"):
        simulate(LogisticExit(features=("entropy",)), narrow)


def test_oracle_and_never(traced):
    engine, queries, traces = traced
    never = simulate(NeverExit(), traces)
    assert (never.exit_layer == 6).all() and (never.num_checks == 0).all()
    oracle = simulate(OracleExit(), traces)
    bounds = oracle_bounds(traces)
    assert oracle.exit_layer.tolist() == bounds["first_correct"].tolist()
    assert (bounds["settled"] >= 1).all() and (bounds["settled"] <= 6).all()


def test_oracle_bounds_on_a_hand_made_trace():
    t = Traces(
        query_id=np.array(["a", "b"]),
        task=np.array(["t", "t"]),
        features=np.zeros((2, 4, 2)),
        feature_names=("gap", "top_prob"),
        top1=np.array([[1, 7, 1, 7], [3, 3, 3, 3]]),
        choice_top1=np.full((2, 4), -1),
        gold=np.array([7, 5]),
        seq_len=np.array([3, 3]),
    )
    b = oracle_bounds(t)
    assert b["first_correct"].tolist() == [2, 4]  # b is never right: full depth
    assert b["settled"].tolist() == [4, 1]
    stop = simulate(ExitAt([3, 1]), t)
    assert stop.exit_layer.tolist() == [3, 1] and stop.correct.tolist() == [False, False]


def test_a_query_collected_twice_is_refused_not_interleaved(traced):
    import pyarrow as pa

    engine, queries, traces = traced
    table = pa.table(
        {
            "query_id": ["a"] * 12 + ["b"] * 6,
            "task": ["t"] * 18,
            "layer": [*range(1, 7)] * 3,
            "num_layers": [6] * 18,
            "top1": [0] * 18,
            "gold": [0] * 18,
            "seq_len": [5] * 18,
            "gap": [0.5] * 18,
        }
    )
    with pytest.raises(ValueError, match="query 'a' is repeated or lacks layers"):
        Traces.from_table(table, ("gap",))
    assert len(Traces.from_table(table.slice(6), ("gap",))) == 2
