"""`adainfer reproduce` end to end on a tiny model: outputs, resume, and 1 vs 2 processes."""

import json
import os
import socket
import subprocess
import sys

import pyarrow.dataset as ds
import pytest

from adainfer.cli import main
from adainfer.reproduce import report, run_reproduce
from conftest import SHARED_DATA

needs_data = pytest.mark.skipif(not SHARED_DATA.exists(), reason="shared data folder not present")


@pytest.fixture(scope="module")
def model_dir(saved_tiny):
    return saved_tiny("gpt2")


def args(model_dir, out, *extra):
    return [
        "reproduce",
        "--model",
        model_dir,
        "--task",
        "capitalize",
        "--task",
        "sst2",
        "--task",
        "mmlu:STEM",
        "--n-queries",
        "6",
        "--shots",
        "0,2",
        "--n-train",
        "4",
        "--train-shots",
        "2",
        "--data-dir",
        str(SHARED_DATA),
        "--batch-size",
        "4",
        "--out-dir",
        str(out),
        *extra,
    ]


def _traces(out):
    table = ds.dataset(sorted((out / "traces" / "test").glob("part-*.parquet"))).to_table()
    return table.sort_by([("query_id", "ascending"), ("layer", "ascending")])


@needs_data
def test_reproduce_writes_every_table_and_figure(model_dir, tmp_path):
    out = tmp_path / "r"
    assert main(args(model_dir, out)) == 0
    results = json.loads((out / "results.json").read_text())
    tables = (out / "tables.md").read_text()
    for title in (
        "Tables 2/3",
        "Tables 4/8/9",
        "Table 6",
        "Table 7",
        "Oracle bounds",
        "choice-restricted",
    ):
        assert title in tables
    for fig in (
        "fig1_accuracy_vs_layer.png",
        "fig3_features_vs_layer.png",
        "exit_layer_histograms.png",
    ):
        assert (out / fig).stat().st_size > 10_000
    full = [r for r in results["rows"] if r["policy"] == "full"]
    assert {(r["task"], r["shots"]) for r in full} == {
        (t, k) for t in ("capitalize", "sst2", "mmlu:STEM") for k in (0, 2)
    }
    assert all(r["flops_ratio"] == 1.0 and r["n"] == 6 for r in full)
    mmlu = [r for r in full if r["task"] == "mmlu:STEM"]
    assert all(r["choice_accuracy"] is not None for r in mmlu)  # choice tasks get both accuracies
    assert results["config"]["seed"] == 0 and results["config"]["train_tasks"]
    held_out = results["config"]["held_out"]  # the split, recorded: 6 example indices per task
    assert set(held_out) == {"capitalize", "sst2", "mmlu:STEM"} and all(
        len(set(v)) == 6 for v in held_out.values()
    )
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
    with socket.socket() as free:  # a port nothing else holds, not a fixed one
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        port,
        "-m",
        "adainfer.cli",
        *args(model_dir, two, "--dtype", "float32"),  # as the pinned in-process run
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name.split("-")[1] for p in (two / "traces" / "test").glob("part-*")} == {"r0", "r1"}
    a, b = _traces(one), _traces(two)
    assert a.column_names == b.column_names
    for name in a.column_names:
        x, y = a.column(name).to_pylist(), b.column(name).to_pylist()
        assert (
            x == pytest.approx(y, rel=1e-4, abs=1e-5, nan_ok=True)
            if isinstance(x[0], float)
            else x == y
        ), name
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
    run = [
        "reproduce",
        "--model",
        model_dir,
        "--task",
        str(task),
        "--task",
        "capitalize",
        "--n-queries",
        "6",
        "--shots",
        "0,8",
        "--n-train",
        "4",
        "--train-shots",
        "2",
        "--batch-size",
        "4",
        "--out-dir",
        str(out),
    ]
    assert (
        main(["-v", *run]) == 0
    )  # 6 pool examples cannot give 8 demonstrations: that cell is skipped
    notes = json.loads((out / "results.json").read_text())["notes"]
    assert f"{task} 8-shot" in notes
    assert main([*run, "--report-only"]) == 0
    assert (
        json.loads((out / "results.json").read_text())["notes"][f"{task} 8-shot"]
        == notes[f"{task} 8-shot"]
    )


# ------------------------------------------------------------------- report on learnable traces
L = 8


def synthetic_traces(path, model_id, tasks, shots, n, seed):
    """Traces in the collected layout where the answer appears at a random layer and `gap`
    jumps there: a classifier can learn to stop, so every table gets real numbers."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adainfer.features import ALL_FEATURES

    rng = np.random.default_rng(seed)
    cols = {
        c: []
        for c in (
            "query_id",
            "task",
            "shots",
            "layer",
            "num_layers",
            "seq_len",
            "top1",
            "gold",
            "label",
            "choice_top1",
            *ALL_FEATURES,
        )
    }
    for task in tasks:
        for k in shots:
            for i in range(n):
                first = rng.integers(3, L + 2)  # L + 1: never right
                layer = np.arange(1, L + 1)
                right = layer >= first
                cols["query_id"] += [f"{task}/{k}shot/{seed}/{i}"] * L
                cols["task"] += [task] * L
                cols["shots"] += [k] * L
                cols["layer"] += layer.tolist()
                cols["num_layers"] += [L] * L
                cols["seq_len"] += [40 + 10 * k] * L
                cols["top1"] += np.where(right, 7, 100 + layer).tolist()
                cols["gold"] += [7] * L
                cols["label"] += right.astype(int).tolist()
                cols["choice_top1"] += (
                    np.where(right, 7, 8) if task == "mmlu" else np.full(L, -1)
                ).tolist()
                for f in ALL_FEATURES:
                    base = np.where(right, 0.9, 0.1) if f in ("gap", "top_prob") else rng.random(L)
                    cols[f] += (base + 0.03 * rng.standard_normal(L)).tolist()
    path.mkdir(parents=True)
    pq.write_table(pa.table(cols), path / "part-r0-00000.parquet")
    meta = {
        "model": {
            "model_id": model_id,
            "model_type": "toy",
            "num_layers": L,
            "hidden_size": 64,
            "vocab_size": 256,
        },
        "features": list(ALL_FEATURES),
    }
    (path / "meta.json").write_text(json.dumps(meta))


def test_report_fills_every_table_when_classifiers_can_learn(tmp_path):
    tasks = ["sst2", "mmlu", "capitalize"]
    for name, model_id in (("here", "toy-a"), ("other", "toy-b")):
        synthetic_traces(tmp_path / name / "traces" / "train", model_id, tasks, [5], 30, seed=0)
        synthetic_traces(tmp_path / name / "traces" / "test", model_id, tasks, [0, 5], 20, seed=1)
    config = dict(
        model="toy-a",
        dtype="float32",
        tasks=tasks,
        n_queries=20,
        shots=[0, 5],
        n_train=30,
        train_shots=5,
        train_tasks=["sst2", "mmlu"],
        seed=0,
        transfer_from=str(tmp_path / "other"),
        skipped={},
    )
    results = report(tmp_path / "here", config, hidden=64, vocab=256)
    assert results["notes"] == {}  # every classifier trained
    rows = results["rows"]

    def of(family, policy):
        return [r for r in rows if r["family"] == family and r["policy"] == policy]

    full = {(r["task"], r["shots"]): r for r in of("main", "full")}
    for r in of(
        "main", "svm"
    ):  # the SVM stops where the answer appears: full accuracy, fewer layers
        assert r["mean_exit_layer"] < L - 1 and r["flops_ratio"] < 0.95
        assert r["accuracy"] == pytest.approx(full[r["task"], r["shots"]]["accuracy"], abs=0.05)
    assert {p for p in results["families"]["generalization"]} == {
        f"{classifier}: {setting}"
        for classifier in ("svm", "crf")  # the paper's Table 6 has both classifiers
        for setting in (
            "intra-task (train: sentiment)",
            "inter-task (train: question answering)",
            "inter-model (train: toy-b)",
        )
    }
    for family in ("factor", "generalization"):
        for p in results["families"][family]:
            assert len(of(family, p)) == len(tasks) * 2 and all(
                r["mean_exit_layer"] < L - 1 for r in of(family, p)
            )
    mmlu = [r for r in of("main", "svm") if r["task"] == "mmlu"]
    assert all(r["choice_accuracy"] >= r["accuracy"] for r in mmlu)
    tables = (tmp_path / "here" / "tables.md").read_text()
    assert (
        "| inter-model (train: toy-b) | crf |" in tables
        and "choice-restricted accuracy, zero-shot" in tables
    )
    for title in ("Table 1: model statistics", "Observation 1", "Figure 1 in numbers", "Per k:"):
        assert title in tables
    layer_acc = {(c["task"], c["shots"]): c["accuracy"] for c in results["layer_accuracy"]}
    assert len(layer_acc) == len(tasks) * 2 and all(len(a) == L for a in layer_acc.values())
    assert layer_acc["sst2", 5][-1] == pytest.approx(full["sst2", 5]["accuracy"])
    svm_line = next(line for line in tables.splitlines() if line.startswith("| sst2 |"))
    assert " - " not in svm_line  # a number in every cell
    assert (
        "### zero-shot" in tables and "### few-shot (k = 5)" in tables
    )  # oracle bounds per setting

    # rebuilt from the traces alone, the recorded transfer_from still gives the inter-model row
    (tmp_path / "here" / "traces" / "run.json").write_text(json.dumps(config))
    again = run_reproduce(out_dir=tmp_path / "here", report_only=True)
    assert again["families"]["generalization"] == results["families"]["generalization"]


def test_resume_refuses_settings_that_change_the_queries(tmp_path):
    out = tmp_path / "r"
    (out / "traces").mkdir(parents=True)
    (out / "traces" / "run.json").write_text(
        json.dumps({"dtype": "float32", "seed": 0, "n_queries": 6, "n_train": 4, "train_shots": 2})
    )
    run = [
        "reproduce",
        "--model",
        "no-such-model",
        "--task",
        "capitalize",
        "--n-queries",
        "5",
        "--seed",
        "1",
        "--n-train",
        "4",
        "--train-shots",
        "2",
        "--out-dir",
        str(out),
    ]
    with pytest.raises(
        ValueError, match=r"--seed 0 \(now 1\), --n-queries 6 \(now 5\).*new --out-dir"
    ):
        run_reproduce(
            "no-such-model",
            out,
            tasks=["capitalize"],
            n_queries=5,
            seed=1,
            n_train=4,
            train_shots=2,
        )
    assert main(run) != 0  # the CLI says it too, before loading any model (there is none)


def test_two_task_files_with_one_name_are_refused(model_dir, tmp_path, capsys):
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "words.json").write_text(
            json.dumps([{"input": f"w{i}", "output": f"W{i}"} for i in range(12)])
        )
    run = [
        "reproduce",
        "--model",
        model_dir,
        "--task",
        str(tmp_path / "a" / "words.json"),
        "--task",
        str(tmp_path / "b" / "words.json"),
        "--n-queries",
        "4",
        "--shots",
        "0",
        "--n-train",
        "2",
        "--train-shots",
        "1",
        "--out-dir",
        str(tmp_path / "r"),
    ]
    assert main(run) != 0
    assert "tasks ['words'] appear twice" in capsys.readouterr().err
    assert not (tmp_path / "r" / "traces" / "test").exists()  # refused before any query ran
