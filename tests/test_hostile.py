"""Hostile but fair inputs (issue 16): each one a clear error naming what to fix, never a crash,
a silent wrong answer or lost rows. One section per row of the issue's table, tiny models only."""

import os
import signal
import subprocess
import sys

import pytest

from adainfer import AdaptiveEngine
from adainfer.cli import main
from adainfer.collect import collect, load_collected
from adainfer.files import FolderInUse, OutputLock
from adainfer.tasks import task_queries
from conftest import char_tokenizer, tiny_model


@pytest.fixture(scope="module")
def model_dir(saved_tiny):
    return saved_tiny("llama")


@pytest.fixture
def engine():
    model, tok = tiny_model("llama", layers=4)
    return AdaptiveEngine(model, tok)


def queries(task="capitalize", n_train=4):
    train, _ = task_queries(char_tokenizer(), [task], shots=1, n_train=n_train, n_test=3)
    return train


# ------------------------------------------------------------------ 2. two writers, one folder
def _hold_lock(path, *args):
    """A second process holding the lock of `path` until killed (a live writer)."""
    code = (
        "import sys, time\nfrom adainfer.files import OutputLock\n"
        f"with OutputLock({str(path)!r}{''.join(', ' + a for a in args)}):\n"
        "    print('held', flush=True)\n    time.sleep(600)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    assert proc.stdout.readline().strip() == b"held"
    return proc


def test_a_second_collect_into_a_folder_in_use_is_refused_and_no_rows_are_lost(engine, tmp_path):
    out = tmp_path / "data"
    collect(engine, queries("capitalize"), out, batch_size=2, progress=False)
    holder = _hold_lock(out)  # another run writing there now
    try:
        with pytest.raises(FolderInUse, match=rf"{out}.*pid {holder.pid}"):
            collect(engine, queries("first_item"), out, batch_size=2, progress=False)
    finally:
        holder.kill()
        holder.wait()
    # killed (-9 included), it leaves no lock behind: the next writer goes ahead
    collect(engine, queries("first_item"), out, batch_size=2, progress=False)
    table, _ = load_collected(out)
    assert sorted(set(table.column("task").to_pylist())) == ["capitalize", "first_item"]
    assert table.num_rows == 2 * 4 * 4  # every query of both tasks, at each of 4 layers
    assert not list(out.glob(".lock*"))


def test_the_lock_is_exclusive_in_one_process_too_and_ranks_hold_their_own(tmp_path):
    with OutputLock(tmp_path):
        with pytest.raises(FolderInUse, match="in use"):
            OutputLock(tmp_path).__enter__()
        with OutputLock(tmp_path, rank=1):  # rank 1 of the same torchrun run writes its parts
            pass
    with OutputLock(tmp_path):  # released on exit
        pass


def test_a_killed_holder_leaves_the_lock_free(tmp_path):
    holder = _hold_lock(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with OutputLock(tmp_path):
        pass


def test_eval_bench_reproduce_and_collect_refuse_an_output_in_use(model_dir, tmp_path, capsys):
    common = ["--model", model_dir, "--task", "capitalize", "--shots", "1", "--n-test", "3"]
    data, summary = tmp_path / "data", tmp_path / "eval.json"
    runs = {
        data: ["collect", *common, "--n-train", "2", "--out", str(data)],
        summary: ["eval", *common, "--policy", "gap", "--out", str(summary)],
        tmp_path / "bench": ["bench", "--report-only", "--out-dir", str(tmp_path / "bench")],
        tmp_path / "rep": ["reproduce", "--model", model_dir, "--out-dir", str(tmp_path / "rep")],
    }
    for path, argv in runs.items():
        lock = OutputLock(path, folder=path.suffix != ".json")
        with lock:
            assert main(argv) == 2
        err = capsys.readouterr().err
        assert f"{path} is in use" in err and f"pid {os.getpid()}" in err, argv
    assert not summary.exists() and not list(data.glob("part-*"))


def test_rerunning_a_finished_collect_says_nothing_ran(model_dir, tmp_path, capsys):
    argv = ["collect", "--model", model_dir, "--task", "capitalize", "--shots", "1"]
    argv += ["--n-test", "3", "--out", str(tmp_path / "d")]
    assert main([*argv, "--n-train", "2"]) == 0
    assert "collected 2 training queries" in capsys.readouterr().out
    assert main([*argv, "--n-train", "3"]) == 0
    assert "collected 1 training queries x 4 layers" in capsys.readouterr().out
    assert main([*argv, "--n-train", "3"]) == 0
    assert "all 3 training queries were already collected" in capsys.readouterr().out
