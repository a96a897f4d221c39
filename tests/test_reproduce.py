"""`adainfer reproduce` end to end on a tiny model: outputs, resume, and 1 vs 2 processes."""

import json
import os
import subprocess
import sys

import pyarrow.dataset as ds
import pytest
from conftest import SHARED_DATA

from adainfer.cli import main

needs_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared data folder not present")


@pytest.fixture(scope="module")
def model_dir(saved_tiny):
    return saved_tiny("gpt2")


def args(model_dir, out, *extra):
    return ["reproduce", "--model", model_dir, "--task", "capitalize", "--task", "sst2", "--task", "mmlu:STEM",
            "--n-queries", "6", "--shots", "0,2", "--n-train", "4", "--train-shots", "2",
            "--data-dir", str(SHARED_DATA), "--batch-size", "4", "--out-dir", str(out), *extra]  # fmt: skip


def _traces(out):
    table = ds.dataset(sorted((out / "traces" / "test").glob("part-*.parquet"))).to_table()
    return table.sort_by([("query_id", "ascending"), ("layer", "ascending")])


@needs_data
def test_reproduce_writes_every_table_and_figure(model_dir, tmp_path):
    out = tmp_path / "r"
    assert main(args(model_dir, out)) == 0
    results = json.loads((out / "results.json").read_text())
    tables = (out / "tables.md").read_text()
    for title in ("Tables 2/3", "Tables 4/8/9", "Table 6", "Table 7", "Oracle bounds", "choice-restricted"):
        assert title in tables
    for fig in ("fig1_accuracy_vs_layer.png", "fig3_features_vs_layer.png", "exit_layer_histograms.png"):
        assert (out / fig).stat().st_size > 10_000
    full = [r for r in results["rows"] if r["policy"] == "full"]
    assert {(r["task"], r["shots"]) for r in full} == {(t, k) for t in ("capitalize", "sst2", "mmlu:STEM") for k in (0, 2)}
    assert all(r["flops_ratio"] == 1.0 and r["n"] == 6 for r in full)
    mmlu = [r for r in full if r["task"] == "mmlu:STEM"]
    assert all(r["choice_accuracy"] is not None for r in mmlu)  # choice tasks get both accuracies
    assert results["config"]["seed"] == 0 and results["config"]["train_tasks"]
    # a random tiny model is never right: trained policies are reported as untrainable, not a crash
    assert "svm" in results["notes"]


@needs_data
def test_resume_after_kill_redoes_nothing(model_dir, tmp_path):
    out = tmp_path / "r"
    assert main(args(model_dir, out)) == 0
    first = _traces(out)
    parts = sorted((out / "traces" / "test").glob("part-*.parquet"))
    parts[-1].unlink()  # as if killed before the last batch was written
    mtimes = {p: p.stat().st_mtime_ns for p in parts[:-1]}
    assert main(args(model_dir, out)) == 0
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())  # finished parts untouched
    assert _traces(out).equals(first)


@needs_data
def test_two_processes_give_the_same_results_as_one(model_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args(model_dir, one)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29533",
           "-m", "adainfer.cli", *args(model_dir, two)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name.split("-")[1] for p in (two / "traces" / "test").glob("part-*")} == {"r0", "r1"}
    a, b = _traces(one), _traces(two)
    assert a.column_names == b.column_names
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        assert x == pytest.approx(y, rel=1e-4, abs=1e-5, nan_ok=True) if isinstance(x[0], float) else x == y, name
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (one, two))
    assert [r["accuracy"] for r in ra["rows"]] == [r["accuracy"] for r in rb["rows"]]
    assert [r["mean_exit_layer"] for r in ra["rows"]] == [r["mean_exit_layer"] for r in rb["rows"]]


@needs_data
def test_report_only_rebuilds_tables_without_the_model(model_dir, tmp_path):
    out = tmp_path / "r"
    assert main(args(model_dir, out)) == 0
    before = json.loads((out / "results.json").read_text())["rows"]
    (out / "tables.md").unlink()
    assert main(args("no-such-model", out, "--report-only")) == 0  # the model is not even loaded
    assert json.loads((out / "results.json").read_text())["rows"] == before
    assert "Tables 2/3" in (out / "tables.md").read_text()


def test_report_only_keeps_the_notes_on_skipped_cells(model_dir, tmp_path):
    task = tmp_path / "small.json"
    task.write_text(json.dumps([{"input": f"w{i}", "output": f"W{i}"} for i in range(12)]))
    out = tmp_path / "r"
    run = ["reproduce", "--model", model_dir, "--task", str(task), "--task", "capitalize", "--n-queries", "6",
           "--shots", "0,8", "--n-train", "4", "--train-shots", "2", "--batch-size", "4", "--out-dir", str(out)]  # fmt: skip
    assert main(["-v", *run]) == 0  # 6 pool examples cannot give 8 demonstrations: that cell is skipped
    notes = json.loads((out / "results.json").read_text())["notes"]
    assert f"{task} 8-shot" in notes
    assert main([*run, "--report-only"]) == 0
    assert json.loads((out / "results.json").read_text())["notes"][f"{task} 8-shot"] == notes[f"{task} 8-shot"]
