"""Exit policies: sklearn contract, equality with sklearn, save/load without pickle, model
checks."""

from pathlib import Path

import numpy as np
import pytest

from adainfer import load_policy, save_policy
from adainfer.checks import PlannedPolicy
from adainfer.persist import IncompatiblePolicy, model_signature, policy_header
from adainfer.policies import (
    POLICIES,
    CRFExit,
    GapThreshold,
    LogisticExit,
    NeverExit,
    OracleExit,
    SVMExit,
    make_policy,
)
from conftest import tiny_model


def layered_data(n_examples=60, L=8, seed=0):
    """Synthetic traces: the gap grows with depth; the answer is right once the gap passes 0.5."""
    rng = np.random.default_rng(seed)
    X, y, groups = [], [], []
    for i in range(n_examples):
        gap = np.clip(np.linspace(0, 1, L) + rng.normal(0, 0.15, L), 0, 1)
        top = np.clip(gap + 0.1, 0, 1)
        X.append(np.stack([gap, top], 1))
        y.append((gap > 0.5).astype(int))
        groups += [i] * L
    return np.concatenate(X), np.concatenate(y), np.array(groups)


def test_svm_decision_matches_sklearn_svc():
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    X, y, _ = layered_data()
    ours = SVMExit().fit(X, y)
    scaler = StandardScaler().fit(X)
    ref = SVC().fit(scaler.transform(X), y)
    np.testing.assert_allclose(
        ours.decision_function(X), ref.decision_function(scaler.transform(X)), rtol=1e-6, atol=1e-8
    )
    assert (ours.predict(X) == ref.predict(scaler.transform(X))).all()
    assert ours.score(X, y) > 0.85


def test_logistic_threshold_trades_accuracy_for_depth():
    X, y, _ = layered_data()
    loose = LogisticExit(threshold=0.3).fit(X, y)
    strict = LogisticExit(threshold=0.9).fit(X, y)
    assert strict.predict(X).sum() < loose.predict(X).sum()
    assert 0 <= loose.predict_proba(X).min() and loose.predict_proba(X).max() <= 1


def test_layer_logistic_learns_each_layer_its_own_rule(tmp_path):
    """At depth 0.25 a high gap means nothing (confidently wrong early layers), at 0.75 it means
    settled: one shared linear rule cannot say both, a model per layer can."""
    from adainfer.policies import LayerLogisticExit

    rng = np.random.default_rng(0)
    gap = rng.uniform(0, 1, 400)
    depth = np.repeat([0.25, 0.75], 200)
    X = np.stack([gap, depth], 1)
    y = ((depth == 0.75) & (gap > 0.5)).astype(int)
    per_layer = LayerLogisticExit(features=("gap", "layer_frac")).fit(X, y)
    assert per_layer.score(X, y) > 0.95
    early = per_layer.predict_proba(np.array([[0.99, 0.25], [0.99, 0.26]]))[:, 1]
    assert (
        early < 0.01
    ).all()  # all-negative layer: its (clipped) base rate; 0.26 maps to the nearest layer
    model, _ = tiny_model("llama")
    loaded = load_policy(
        save_policy(per_layer, tmp_path / "p.safetensors", model=model), model=model
    )
    np.testing.assert_allclose(loaded.predict_proba(X), per_layer.predict_proba(X))
    with pytest.raises(ValueError, match="layer_frac"):
        LayerLogisticExit(features=("gap",)).fit(X[:, :1], y)


def test_crf_learns_the_layer_sequence():
    X, y, groups = layered_data()
    crf = CRFExit().fit(X, y, groups)
    seq = X[groups == 0]
    labels = crf.predict_sequence(seq)
    assert labels.shape == (8,) and set(labels) <= {0, 1}
    assert (labels == y[groups == 0]).mean() >= 0.75
    with pytest.raises(ValueError, match="groups"):
        CRFExit().fit(X, y)
    import copy

    twin = copy.deepcopy(crf)  # after use: the open C tagger is not copied, the model is
    assert (twin.predict_sequence(seq) == labels).all()


def test_gap_threshold_and_reference_policies():
    X = np.array([[0.79], [0.8], [0.95]])
    assert GapThreshold(0.8).predict(X).tolist() == [0, 1, 1]
    assert NeverExit().trainable is False and NeverExit().planned_checks(8) == ()
    with pytest.raises(ValueError, match="gold"):
        from adainfer.policies import Step

        OracleExit().decide(
            Step(1, 4, (), np.zeros((1, 0)), np.zeros((1, 1, 0)), np.array([3]), np.array([0]))
        )


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_fit_leaves_every_parameter_as_given(name):
    """scikit-learn's contract: fit learns attributes ending in _, it never rewrites a parameter
    (features given as a list stay that very list)."""
    X, y, groups = layered_data()
    X = np.column_stack([X, np.tile(np.linspace(0, 1, 8), len(X) // 8)])  # + layer_frac
    features = ["gap", "top_prob", "layer_frac"]
    policy = make_policy(name, **({} if name == "gap" else {"features": features}))
    before = policy.get_params()
    policy.fit(X[:, : len(policy.features)], y, groups)
    after = policy.get_params()
    assert after == before and all(after[k] is before[k] for k in before)


def test_single_class_labels_are_a_clear_error():
    X, _, _ = layered_data()
    with pytest.raises(ValueError, match="never right"):
        SVMExit().fit(X, np.zeros(len(X)))


def test_wrong_feature_count_is_a_clear_error():
    X, y, _ = layered_data()
    with pytest.raises(ValueError, match="shape"):
        SVMExit().fit(X[:, :1], y)


@pytest.mark.parametrize("name", ["svm", "logistic", "crf", "gap", "never"])
def test_policies_survive_save_and_load(tmp_path, name):
    X, y, groups = layered_data()
    model, _ = tiny_model("llama")
    policy = make_policy(name)
    policy.fit(X[:, : len(policy.features)] if policy.features else X, y, groups)
    path = save_policy(policy, tmp_path / f"{name}.safetensors", model=model)
    loaded = load_policy(path, model=model)
    # the model it was saved for travels with it, on the wrapper that carries it
    assert isinstance(loaded, PlannedPolicy) and loaded.model_ == model_signature(model)
    assert loaded.plans_ == {} and loaded.planned_checks(8) is None
    inner = loaded.policy_
    assert type(inner) is type(policy) and inner.get_params() == policy.get_params()
    bare = load_policy(save_policy(policy, tmp_path / "bare.safetensors"))
    assert type(bare) is type(policy)  # nothing recorded beside the policy: read back as saved
    if name not in ("never",):
        Xf = X[:, : len(policy.features)]
        np.testing.assert_array_equal(loaded.predict(Xf), policy.predict(Xf))
        np.testing.assert_array_equal(bare.predict(Xf), policy.predict(Xf))
    # the file is safetensors: JSON header + raw arrays, nothing executable
    assert path.read_bytes()[8:9] == b"{"


def test_loaded_policy_refuses_another_model(tmp_path):
    X, y, _ = layered_data()
    model, _ = tiny_model("llama", layers=4)
    path = save_policy(SVMExit().fit(X, y), tmp_path / "p.safetensors", model=model)
    other, _ = tiny_model("llama", layers=6)
    with pytest.raises(IncompatiblePolicy, match="num_layers"):
        load_policy(path, model=other)
    assert load_policy(path).model_["num_layers"] == 4  # loads fine without a model to check
    assert (
        load_policy(path, model=other, allow_other_model=True).model_["num_layers"] == 4
    )  # as the error says
    from adainfer.persist import check_compatible

    check_compatible(load_policy(path), other, allow_other_model=True)  # deliberate transfer


def test_not_a_policy_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not an adainfer policy"):
        load_policy(bad)
    with pytest.raises(FileNotFoundError):
        load_policy(tmp_path / "missing.safetensors")


def test_unknown_policy_name():
    with pytest.raises(ValueError, match="svm"):
        make_policy("forest")


def test_a_file_of_an_unknown_policy_kind_says_so(tmp_path):
    import json

    from safetensors.numpy import save_file

    from adainfer.persist import FORMAT

    path = tmp_path / "future.safetensors"
    header = {"format": FORMAT, "policy": "quantum", "params": {}, "features": ["gap"]}
    save_file({"_empty": np.zeros(1)}, str(path), metadata={"adainfer": json.dumps(header)})
    with pytest.raises(ValueError, match=r"'quantum' policy.*known: never"):
        load_policy(path)


def test_learned_check_schedule_survives_save_and_load(tmp_path):
    X, y, _ = layered_data()
    policy = PlannedPolicy.from_plans(SVMExit().fit(X, y), {1: (3, 5)})
    loaded = load_policy(save_policy(policy, tmp_path / "p.safetensors"))
    assert loaded.planned_checks() == loaded.planned_checks(32) == (3, 5)
    policy = PlannedPolicy.from_plans(SVMExit().fit(X, y), {1: ()})  # "never check": plain model
    assert load_policy(save_policy(policy, tmp_path / "q.safetensors")).planned_checks() == ()


COMMITTED = Path(__file__).parents[1] / "results" / "bench" / "policies"


def test_committed_format_1_policy_files_load_as_they_ran():
    """results/bench/policies was written before PlannedPolicy (format 1: plans as lists of
    layers beside the policy's parameters); each reads back with the plans, threshold and
    features its header holds, and its schedule per batch size is the one it ran with."""
    from adainfer.persist import FORMAT_1
    from adainfer.policies import planned_checks

    paths = sorted(COMMITTED.glob("*.safetensors"))
    paths = [p for p in paths if policy_header(p)["format"] == FORMAT_1]
    assert len(paths) == 24  # the three smaller models' grid; later files are today's format
    for path in paths:
        header = policy_header(path)
        assert header["format"] == FORMAT_1
        policy = load_policy(path)
        assert isinstance(policy, PlannedPolicy)
        layers = {str(b): list(p.check_layers) for b, p in policy.plans_.items()}
        assert layers == header["check_plans"]
        assert list(planned_checks(policy)) == header["check_layers"]  # what replays used
        for b in (1, 7, 8, 9, 31, 32, 64):  # the plan of the largest planned size not above b
            size = max(int(s) for s in header["check_plans"] if int(s) <= b)
            assert list(planned_checks(policy, b)) == header["check_plans"][str(size)]
        params = {k: tuple(v) if isinstance(v, list) else v for k, v in header["params"].items()}
        assert policy.policy_.get_params() == params
        assert policy.threshold_ == policy.policy_.threshold == header["params"]["threshold"]
        assert list(policy.features) == header["features"]
        assert policy.target_ == header["target"] and policy.model_ == header["model"]
    model, _ = tiny_model("llama")
    with pytest.raises(IncompatiblePolicy, match="model_id"):
        load_policy(paths[0], model=model)
    assert load_policy(paths[0], model=model, allow_other_model=True).plans_


def test_every_committed_policy_file_holds_the_plans_its_bench_rows_ran_with():
    """Each row of results/bench/bench.json ran with the check layers (and, where it checks,
    the stop threshold) that its task's policy file holds for its batch size: a resumed grid
    re-plans, and must not rewrite the plan of a cell it does not time again."""
    import json

    rows = json.loads((COMMITTED.parent / "bench.json").read_text())["rows"]
    checked = 0
    for path in sorted(COMMITTED.glob("*.safetensors")):
        policy, stem = load_policy(path), path.stem.split("-shortlist")[0]
        prefix = "shortlist_" if "-shortlist" in path.stem else ""
        for row in rows:
            if stem == f"{row['model']}-{row['dtype']}-{row['task']}":
                layers = row[f"{prefix}check_layers"]
                assert list(policy.planned_checks(row["batch_size"])) == layers, (path, row)
                if layers:  # no check: the threshold decides nothing
                    assert policy.threshold_ == row[f"{prefix}threshold"], (path, row)
                checked += 1
    assert checked == 2 * len(rows)  # every row: its exact and its shortlist plan


def test_a_format_1_file_written_by_hand_reads_back_as_it_ran(tmp_path):
    import json

    from safetensors.numpy import save_file

    from adainfer.persist import FORMAT, FORMAT_1

    X, y, _ = layered_data()
    fitted = LogisticExit(threshold=0.9).fit(X, y)
    model, _ = tiny_model("llama", layers=4)
    header = {  # what save_policy wrote before PlannedPolicy
        "format": FORMAT_1,
        "policy": "logistic",
        "params": {"features": ["gap", "top_prob"], "C": 1.0, "threshold": 0.9},
        "features": ["gap", "top_prob"],
        "check_layers": [3],
        "check_plans": {"1": [3], "8": [1, 2, 3]},
        "target": "final",
        "adainfer_version": "0.1.0",
        "model": model_signature(model),
    }

    def write(name, **changes):
        path = tmp_path / name
        meta = json.dumps({**header, **changes})
        save_file(fitted._arrays(), str(path), metadata={"adainfer": meta})
        return path

    policy = load_policy(write("old.safetensors"), model=model)
    assert isinstance(policy, PlannedPolicy) and policy.model_ == model_signature(model)
    assert policy.target_ == "final" and policy.threshold_ == 0.9
    assert policy.planned_checks() == policy.planned_checks(7) == (3,)
    assert policy.planned_checks(8) == policy.planned_checks(100) == (1, 2, 3)
    np.testing.assert_array_equal(policy.predict_proba(X), fitted.predict_proba(X))
    np.testing.assert_array_equal(policy.predict(X), fitted.predict(X))
    other, _ = tiny_model("llama", layers=6)
    with pytest.raises(IncompatiblePolicy, match="num_layers"):
        load_policy(tmp_path / "old.safetensors", model=other)
    # saved again, it is written in today's format with the same schedules
    again = save_policy(policy, tmp_path / "new.safetensors")
    assert policy_header(again)["format"] == FORMAT
    assert {b: p.check_layers for b, p in load_policy(again).plans_.items()} == {
        1: (3,),
        8: (1, 2, 3),
    }
    # one schedule without plans per batch size served every batch size
    one = load_policy(write("one.safetensors", check_plans=None, check_layers=[2]))
    assert one.planned_checks() == one.planned_checks(1) == one.planned_checks(32) == (2,)
    # nothing recorded beside the policy: the bare policy, as it was saved
    nothing = dict(check_plans=None, check_layers=None, target=None, model=None)
    bare = load_policy(write("bare.safetensors", **nothing))
    assert type(bare) is LogisticExit and bare.get_params()["threshold"] == 0.9


def test_a_resumed_bench_keeps_timed_plans_over_a_refit_that_differs_by_rounding_only(tmp_path):
    import dataclasses
    import warnings

    from adainfer.bench import _keep_timed_plans

    X, y, _ = layered_data()
    fitted = LogisticExit(threshold=0.9).fit(X, y)
    timed = PlannedPolicy.from_plans(fitted, {1: (3, 5), 8: (2,)})
    timed.plans_[1] = dataclasses.replace(timed.plans_[1], expected_cost=99.0)
    path = save_policy(timed, tmp_path / "p.safetensors")

    def refit(shift):  # the same fit, its coefficients moved by `shift`
        again = LogisticExit(threshold=0.9).fit(X, y)
        again.coef_ = again.coef_ + shift
        return PlannedPolicy.from_plans(again, {1: (4,), 8: (4,)})

    replanned = refit(1e-15)  # BLAS rounding between runs: the same classifier
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _keep_timed_plans(replanned, path, {1})
    assert replanned.plans_[1].expected_cost == 99.0 and replanned.plans_[1].check_layers == (3, 5)
    assert replanned.plans_[8].check_layers == (4,)  # not timed: the new plan
    replanned = refit(1e-3)
    with pytest.warns(UserWarning, match="another classifier"):
        _keep_timed_plans(replanned, path, {1})
    assert replanned.plans_[1].check_layers == (4,)
