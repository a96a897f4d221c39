"""The benchmark's machinery on a tiny model (its numbers belong in results/, not in tests)."""

import numpy as np
import pytest

from adainfer import AdaptiveEngine
from adainfer.bench import VARIANTS, bench_cell
from adainfer.checks import PlannedPolicy
from adainfer.policies import GapThreshold
from adainfer.report import bench_table
from adainfer.tasks import task_queries
from conftest import char_tokenizer, tiny_model


def test_bench_cell_reports_every_variant_on_the_same_queries():
    engine = AdaptiveEngine(*tiny_model("llama"))
    _, queries = task_queries(char_tokenizer(), ["capitalize"], shots=1, n_train=0, n_test=6)
    policy = PlannedPolicy.from_plans(GapThreshold(0.0), {1: (2,)})  # leaves at its 1st check
    row = bench_cell(engine, queries, policy, batch_size=4, repeats=1, device="cpu")
    assert row["n"] == 6 and row["batch_size"] == 4
    for v in VARIANTS:
        assert row[f"time_{v}_s"] > 0
    assert row["policy"]["mean_exit_layer"] == 2 and row["policy"]["mean_checks"] == 1
    assert row["oracle"]["mean_exit_layer"] <= 4
    assert 0 < row["policy"]["flops_ratio"] < 1
    row.update(model="tiny", dtype="float32", task="capitalize")
    table = bench_table([row])
    assert table.count("\n") == 2 and "| tiny | float32 | capitalize | 4 |" in table
    assert np.isfinite(row["policy/plain"])
    assert (
        row["paired_samples"] == 10 and row["repeats"] == 5
    )  # 2 batches: 5 repeats to reach MIN_PAIRED = 9 ratios
    assert row["resident_mb"] > 0
    lo, hi = row["policy/plain_iqr"]
    assert lo <= row["policy/plain"] <= hi


def test_the_grid_saves_one_policy_with_a_plan_per_batch_size_and_resumes(
    saved_tiny, tmp_path, monkeypatch
):
    import json

    from adainfer import bench
    from adainfer.persist import load_policy, save_policy

    model_dir, out = saved_tiny("llama"), tmp_path / "bench"
    save_policy(GapThreshold(0.5), tmp_path / "gap.safetensors")
    kw = dict(
        tasks=("capitalize", "lowercase"),
        batch_sizes=(1, 2),
        dtypes=("float32",),
        n_queries=4,
        n_train=4,
        repeats=1,
        policy_path=str(tmp_path / "gap.safetensors"),
        shortlist=8,
        progress=False,
    )
    result = bench.run_bench((model_dir,), out, **kw)
    assert [r["batch_size"] for r in result["rows"]] == [1, 2, 1, 2]
    table, targets = (out / "bench.md").read_text().split("Targets")
    assert table.strip().count("\n") == 5 and targets.count("\n- ") == 4
    (saved,) = (out / "policies").glob("*tiny-llama*-float32-capitalize.safetensors")
    policy = load_policy(saved)
    assert set(policy.plans_) == {1, 2}
    assert [r["check_layers"] for r in result["rows"][:2]] == [
        list(policy.plans_[b].check_layers) for b in (1, 2)
    ]
    for r in result["rows"]:  # the shortlist engine ran as one more variant, with its own plan
        assert (
            r["shortlist_size"] == 8
            and r["check_cost_shortlist_layers"] > 0
            and r["shortlist/plain"] > 0
        )
        assert 1 <= r["shortlist"]["mean_exit_layer"] <= 4
    assert "shortlist/plain" in (out / "bench.md").read_text()

    def no_more_cells(*a, **k):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(bench, "bench_cell", no_more_cells)
    assert (
        bench.run_bench((model_dir,), out, **kw)["rows"]
        == json.loads((out / "bench.json").read_text())["rows"]
    )

    # another plan test that picks the same plans (2 testing queries bound nothing: the plain
    # model): the cells ran exactly so, keep their timing
    before = json.loads((out / "bench.json").read_text())["rows"]
    assert all(r["risk"] == "consistency" and r["check_layers"] == [] for r in before)
    policies = sorted((out / "policies").iterdir())
    looser = dict(plan_test=dict(epsilon=0.1, delta=0.2))
    rows = bench.run_bench((model_dir,), out, **kw, **looser)["rows"]
    assert (
        sorted((out / "policies").iterdir()) == policies
    )  # re-planned in place, under the model's name
    assert [r["check_layers"] for r in rows] == [r["check_layers"] for r in before]
    assert all(r["epsilon"] == 0.1 and r["timed_with_epsilon"] == bench.EPSILON for r in rows)
    assert all(r["delta"] == 0.2 and r["timed_with_delta"] == bench.DELTA for r in rows)

    # other timing settings, or another device, never overwrite a finished grid
    with pytest.raises(ValueError, match="other settings"):
        bench.run_bench((model_dir,), out, **{**kw, "repeats": 2})
    with pytest.raises(ValueError, match="other settings"):
        bench.run_bench((model_dir,), out, **kw, device="meta")
    assert json.loads((out / "bench.json").read_text())["rows"] == rows
    # each cell says where it was timed, the CPU included
    assert all(r["machine"]["torch_threads"] >= 1 and "cpu_model" in r["machine"] for r in rows)
    # nor does a grid file that cannot be read
    good = (out / "bench.json").read_text()
    (out / "bench.json").write_text(good[:-20])
    with pytest.raises(ValueError, match="not valid JSON"):
        bench.run_bench((model_dir,), out, **kw)
    (out / "bench.json").write_text(good)

    # more paired samples asked for: each cell holding fewer is re-timed, its earlier timing kept
    monkeypatch.undo()
    need = max(r["paired_samples"] for r in rows) + 1
    retimed = bench.run_bench((model_dir,), out, **kw, **looser, min_paired=need)["rows"]
    for old, new in zip(rows, retimed):
        assert (
            new["paired_samples"] >= need
            and len(new["policy/plain_paired"]) == new["paired_samples"]
        )
        assert new["earlier_timings"][-1]["policy/plain"] == old["policy/plain"]
        assert new["earlier_timings"][-1]["paired_samples"] == old["paired_samples"]
    assert "Cells timed more than once" in (out / "bench.md").read_text()
    rows = retimed

    # the report alone, from bench.json (a grid stopped part-way has no fresh bench.md)
    md = (out / "bench.md").read_text()
    (out / "bench.md").unlink()
    from adainfer.cli import main

    assert main(["bench", "--report-only", "--out-dir", str(out)]) == 0
    assert (out / "bench.md").read_text() == md
    assert main(["bench", "--report-only", "--out-dir", str(tmp_path / "nothing")]) == 2

    # a grid resumed with one more batch size re-plans with new check costs; the cells it does
    # not time again keep, in the saved file, the plans they ran with (marked here by an
    # expected cost no plan has), over the same classifier only
    import dataclasses

    marked = load_policy(saved)
    marked.plans_[1] = dataclasses.replace(marked.plans_[1], expected_cost=99.0)
    save_policy(marked, saved)
    bench.run_bench((model_dir,), out, **{**kw, "batch_sizes": (1, 2, 4)}, **looser)
    kept = load_policy(saved)
    assert kept.plans_[1].expected_cost == 99.0 and set(kept.plans_) == {1, 2, 4}
    marked.policy_.set_params(threshold=marked.threshold_ + 1)  # another classifier
    save_policy(marked, saved)
    with pytest.warns(UserWarning, match="another classifier"):
        bench.run_bench((model_dir,), out, **{**kw, "batch_sizes": (1, 2, 4, 5)}, **looser)
    assert load_policy(saved).plans_[1].expected_cost != 99.0


def test_a_cell_is_retimed_when_its_plan_changes():
    from adainfer.bench import _same_plan
    from adainfer.checks import CheckPlan

    def plan(layers, threshold):
        return CheckPlan(layers, 20.0, 0.7, 0.7, 0.2, 10, True, 0.99, threshold)

    row = {
        "check_layers": [19, 22],
        "threshold": 0.9,
        "shortlist_check_layers": [],
        "shortlist_threshold": 0.5,
    }
    assert _same_plan(
        row, plan((19, 22), 0.9), plan((), 0.9)
    )  # no shortlist check: its threshold is moot
    assert not _same_plan(row, plan((19, 22), 0.85), None)  # same layers, another stop threshold
    assert not _same_plan(row, plan((19,), 0.9), None)
    assert not _same_plan(row, plan((19, 22), 0.9), plan((20,), 0.5))


def test_calibration_comes_from_the_timed_queries_split_but_never_the_same_queries():
    from adainfer.bench import _calibration_and_timed
    from adainfer.benchmarks import load_benchmark
    from conftest import SHARED_DATA

    if not SHARED_DATA.exists():
        pytest.skip("shared data folder not present")
    calibration, timed = _calibration_and_timed(char_tokenizer(), ["sst2"], 1, 6, 4, 0, SHARED_DATA)
    assert len(calibration) == 6 and len(timed) == 4
    assert not {q.prompt.rsplit("Q: ", 1)[1] for q in calibration} & {
        q.prompt.rsplit("Q: ", 1)[1] for q in timed
    }
    test_split = {
        e.input for e in load_benchmark("sst2", SHARED_DATA).examples
    }  # whole sentences, not pool phrases
    assert all(q.prompt.rsplit("Q: ", 1)[1].removesuffix("\nA:") in test_split for q in calibration)


def test_targets_name_the_worst_cell_and_whether_each_is_met():
    from adainfer.report import bench_targets

    def row(bs, policy, never, flops, true_flops, peak_policy):
        return {
            "model": "m",
            "dtype": "bfloat16",
            "task": "sst2",
            "batch_size": bs,
            "policy/plain": policy,
            "never/plain": never,
            "policy": {"flops_ratio": flops, "true_flops_ratio": true_flops},
            "peak_mem_plain_mb": 100.0,
            "peak_mem_policy_mb": peak_policy,
        }

    rows = [
        row(1, 1.00, 1.01, 1.0, 1.0, 100.0),
        row(8, 0.95, 1.09, 0.9, 0.9, 105.0),
        row(32, 1.05, 1.02, 0.9, 0.9, 120.0),
    ]
    lines = bench_targets(rows).splitlines()
    assert (
        lines[0].startswith("- never slower")
        and "NOT met, 2 of 3 cells within" in lines[0]
        and "bs 32" in lines[0]
    )
    assert (
        ": met, 2 of 2" in lines[1]
    )  # batch 8's 1.09 is outside the overhead target's batch sizes
    assert (
        "NOT met, 1 of 2" in lines[2] and "1.050 against 1.035" in lines[2]
    )  # only the cells that save layers
    assert "NOT met, 2 of 3" in lines[3] and "120.000 against 111.000" in lines[3]
    for r in rows:  # the same peaks on top of a 1 GB process are well within 10%
        r["resident_mb"] = 1000.0
    assert ": met, 3 of 3" in bench_targets(rows).splitlines()[3]
