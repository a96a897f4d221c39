"""The generation benchmark (bench/generation.py) on tiny random models: a cell end to end to
its JSON and table, resume, the paired-ratio summary on injected timings, exact match, the
common stopping rule and the scorers. No timed assertions."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import decoders

from adainfer.headroom import StopInText
from conftest import char_tokenizer, tiny_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["hello world, how are you", "ab", "the quick brown fox", "xyz 123", "no"]


def _bench():
    spec = importlib.util.spec_from_file_location(
        "bench_generation", ROOT / "bench" / "generation.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _bench()


def _toy_task(bench, limit=None):
    items = [bench.Item(f"toy/{i}", p, ["world"]) for i, p in enumerate(PROMPTS)][:limit]
    return bench.Task("toy", items, ["calibrate me", "and me"], (), 6, "f1")


def _loader(name, dtype):
    model, tok = tiny_model("llama")
    return model.to(getattr(torch, dtype)), tok


def _argv(tmp_path, *extra):
    return [
        "--models", "tiny", "--dtypes", "float32", "--batch-sizes", "1,2",
        "--calib-batches", "2", "--calib-tokens", "4", "--out-dir", str(tmp_path), *extra,
    ]  # fmt: skip


def _counting(bench, monkeypatch):
    """Wrap every method's run to count its calls per batch size."""
    calls = []
    for name, method in list(bench.METHODS.items()):

        def run(model, tok, prompts, job, _run=method.run, _name=name):
            calls.append((_name, len(prompts), job.max_new_tokens))
            return _run(model, tok, prompts, job)

        monkeypatch.setitem(
            bench.METHODS,
            name,
            bench.Method(run, method.candidates, method.prepare, method.max_batch),
        )
    return calls


def test_a_tiny_grid_end_to_end_then_resumes(bench, tmp_path, monkeypatch):
    tasks = lambda name, tok, limit: _toy_task(bench, limit)  # noqa: E731
    bench.main(_argv(tmp_path), loader=_loader, tasks=tasks)
    files = sorted(p.name for p in (tmp_path / "bench").glob("*.json"))
    assert files == ["tiny-float32-b1.json", "tiny-float32-b2.json"]
    b1 = json.loads((tmp_path / "bench" / "tiny-float32-b1.json").read_text())
    assert len(b1["batches"]) == 5 and b1["machine"]["torch_threads"] == 1
    assert b1["methods"]["lossless"]["params"]["draft_layer"] in (1, 2, 3)
    assert len(b1["methods"]["hf-early-exit"]["sweep"]) == 3  # E = 1, 2, 3 on 4 layers
    for name in ("hf-early-exit", "lossless"):
        s = bench.summarise_method(b1, name)
        assert s["rows"] == 5 and s["ratio"]["n"] == 5 and s["ratio"]["median"] > 0
        assert s["exact"] == {"rows": 1.0, "tokens": 1.0}  # lossless, fp32
        assert s["peak_memory_mb"] is not None and "f1" in s
    assert 0 <= bench.summarise_method(b1, "lossless")["acceptance"] <= 1
    b2 = json.loads((tmp_path / "bench" / "tiny-float32-b2.json").read_text())
    assert "batch_size = 1" in b2["methods"]["hf-early-exit"]["unsupported"]
    assert all(set(b["runs"]) == {"plain", "lossless"} for b in b2["batches"].values())
    table = (tmp_path / "bench.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 3 + 3  # b1: three methods; b2: plain, the refusal, lossless
    assert all(r.count("|") == table.splitlines()[0].count("|") for r in rows)
    judged = [line for line in table.splitlines() if line.startswith("| tiny-fp32-b")]
    assert len(judged) == 2 and all("| met: 0 of 5 rows differ |" in r for r in judged)
    assert "met: " in judged[0].split(" | ")[3] and judged[1].split(" | ")[3] == "-"  # HF at b1
    assert not list(tmp_path.rglob(".*.tmp"))
    # run again: every batch is there, nothing generates, the files stay as they were
    calls = _counting(bench, monkeypatch)
    written = {p: p.read_bytes() for p in (tmp_path / "bench").glob("*.json")}
    bench.main(_argv(tmp_path), loader=_loader, tasks=tasks)
    assert [c for c in calls if c[2] > 1] == []
    assert all(p.read_bytes() == text for p, text in written.items())
    # --report-only rebuilds the same table without a model, and the figure
    (tmp_path / "speed.png").unlink()
    assert bench.main(["--report-only", "--out-dir", str(tmp_path)]) == table
    assert (tmp_path / "speed.png").read_bytes()[:4] == b"\x89PNG"


def test_a_killed_cell_resumes_at_its_batch(bench, tmp_path, monkeypatch):
    tasks = lambda name, tok, limit: _toy_task(bench, limit)  # noqa: E731
    argv = _argv(tmp_path, "--methods", "plain,lossless")
    argv[argv.index("--batch-sizes") + 1] = "1"
    plain = bench.METHODS["plain"]
    seen = []

    def dies_on_the_third_prompt(model, tok, prompts, job):
        if prompts == [PROMPTS[2]] and job.max_new_tokens == 6:
            raise KeyboardInterrupt
        seen.append(prompts)
        return plain.run(model, tok, prompts, job)

    monkeypatch.setitem(bench.METHODS, "plain", bench.Method(dies_on_the_third_prompt))
    with pytest.raises(KeyboardInterrupt):
        bench.main(argv, loader=_loader, tasks=tasks)
    data = json.loads((tmp_path / "bench" / "tiny-float32-b1.json").read_text())
    assert sorted(data["batches"]) == ["0", "1"]
    monkeypatch.setitem(bench.METHODS, "plain", plain)
    calls = _counting(bench, monkeypatch)
    first = data["machine"]
    # resumed on another machine (sessions may get another CPU): the cell keeps the first
    # run's, where its calibration was measured, and every batch says where it was timed
    other = {**bench.timing.machine(), "cpu_model": "Other CPU"}
    monkeypatch.setattr(bench.timing, "machine", lambda: other)
    text = bench.main(argv, loader=_loader, tasks=tasks)
    timed = [c for c in calls if c[2] == 6]
    # batches 2, 3, 4 by both methods (the memory runs were done before the kill)
    assert len(timed) == 3 * 2
    data = json.loads((tmp_path / "bench" / "tiny-float32-b1.json").read_text())
    assert sorted(data["batches"], key=int) == ["0", "1", "2", "3", "4"]
    assert data["machine"] == first
    assert [b["cpu"].split(",")[0] for _, b in sorted(data["batches"].items())] == [
        first["cpu_model"]
    ] * 2 + ["Other CPU"] * 3
    assert "3 on Other CPU" in text and "2 on " + first["cpu_model"] in text
    # other settings in the same folder are refused, not mixed in
    with pytest.raises(SystemExit, match="other settings"):
        bench.main([*argv, "--calib-tokens", "5"], loader=_loader, tasks=tasks)


def test_a_cell_has_one_writer_while_other_cells_of_the_folder_run(bench, tmp_path):
    from adainfer.files import FolderInUse, OutputLock

    tasks = lambda name, tok, limit: _toy_task(bench, limit)  # noqa: E731
    argv = _argv(tmp_path, "--methods", "plain")
    argv[argv.index("--batch-sizes") + 1] = "1"
    cell = tmp_path / "bench" / "tiny-float32-b1.json"
    with OutputLock(cell, folder=False), pytest.raises(FolderInUse, match="in use"):
        bench.main(argv, loader=_loader, tasks=tasks)
    assert not cell.exists()
    with OutputLock(tmp_path / "bench" / "tiny-float32-b2.json", folder=False):
        bench.main(argv, loader=_loader, tasks=tasks)  # another lane's cell: no conflict
    assert len(json.loads(cell.read_text())["batches"]) == len(PROMPTS)


def _run(seconds, tokens, **extra):
    return {"seconds": seconds, "tokens": tokens, "texts": [""] * len(tokens), "stats": {}, **extra}


def test_paired_ratios_on_injected_timings(bench):
    # per batch: plain 10 tokens; the method's tokens/s over plain's is 2, 1, 0.5, 4
    batches = {}
    for i, (tp, tm) in enumerate([(1.0, 0.5), (2.0, 2.0), (1.0, 2.0), (4.0, 1.0)]):
        batches[str(i)] = {
            "ids": [str(i)],
            "loadavg": [1.0, 1.0, 1.0],
            "runs": {"plain": _run(tp, [list(range(10))]), "m": _run(tm, [list(range(10))])},
        }
    data = {"methods": {"plain": {}, "m": {"params": {"x": 1}}}, "batches": batches}
    s = bench.summarise_method(data, "m")
    assert s["ratio"]["median"] == pytest.approx(1.5)  # of 0.5, 1, 2, 4
    assert s["ratio"]["q1"] == pytest.approx(0.875) and s["ratio"]["q3"] == pytest.approx(2.5)
    assert s["ratio"]["n"] == 4 and s["tokens_per_s"] == pytest.approx(40 / 5.5)
    assert bench.summarise_method(data, "plain")["ratio"]["median"] == 1.0


def test_the_lossy_saving_is_set_against_the_oracle_of_its_calibration_files(bench, tmp_path):
    # adainfer-plain 10 tokens in 2 s; lossy@1% in 1.6 s: 1.25x, a saving of 20% of the time
    runs = {"adainfer-plain": _run(2.0, [list(range(10))]), "lossy@1%": _run(1.6, [[1] * 10])}
    data = {"model": "m", "dtype": "bfloat16", "batch_size": 1, "batches": {"0": {"runs": runs}}}
    data["methods"] = {"adainfer-plain": {}, "lossy@1%": {}}
    exits = tmp_path / "exits"
    exits.mkdir()
    for half, settled in enumerate((16.0, 20.0)):  # oracle steps 1 - 6 * 0.05, 1 - 2 * 0.05
        policy = {"num_layers": 22, "costs": {"layer": 0.05}}
        policy["calibration"] = {"oracle_mean_settled": settled}
        (exits / f"m-bfloat16-b1-risk0.01-half{half}.json").write_text(json.dumps(policy))
    oracle = bench.oracle_speedup(bench.cell_policies(tmp_path, data))
    assert oracle == pytest.approx(1 / 0.8)  # a 20% saving
    assert bench.oracle_speedup(bench.cell_policies(tmp_path, {**data, "batch_size": 8})) is None
    note = bench._oracle_note({**data, "oracle_speedup": oracle}, "lossy@1%")
    assert "1.25x" in note and "100% of its saving" in note
    assert "costed at batch" not in note
    # at batch 8 the files' own oracle_step_cost (costed at that batch size) is set beside it
    for half in (0, 1):
        policy = {"num_layers": 22, "costs": {"layer": 0.05}}
        policy["calibration"] = {"oracle_mean_settled": 16.0, "oracle_step_cost": 0.9}
        (exits / f"m-bfloat16-b8-risk0.01-half{half}.json").write_text(json.dumps(policy))
    b8 = {**data, "batch_size": 8}
    policies = bench.cell_policies(tmp_path, b8)
    assert bench.oracle_speedup(policies, batched=True) == pytest.approx(1 / 0.9)
    b8 |= {"oracle_speedup": bench.oracle_speedup(policies), "oracle_speedup_batched": 1 / 0.9}
    note = bench._oracle_note(b8, "lossy@1%")
    assert "1.43x: 67% of its saving" in note and "gives 1.11x: 200% of that saving" in note
    # without adainfer-plain, lossless-planned stands in only where it never drafted
    planned = _run(2.0, [list(range(10))], stats={"drafted": [0]})
    runs["lossless-planned"] = planned
    del runs["adainfer-plain"]
    assert bench.engine_base(data) == "lossless-planned"
    planned["stats"]["drafted"] = [3]
    assert bench.engine_base(data) is None
    assert bench._oracle_note({**data, "oracle_speedup": oracle}, "lossy@1%") is None


def test_problems_lost_and_gained_are_counted_pairwise(bench):
    runs = [({"passed": [True, True]}, {"passed": [False, True]}), ({"passed": [False]}, {})]
    data = {"batches": {str(i): {"runs": {"plain": p, "m": m}} for i, (p, m) in enumerate(runs)}}
    assert (
        bench._pass_note(data, "m")
        == "- m against plain: 1 problems lost, 0 gained (McNemar p = 1.000)"
    )
    data["batches"]["1"]["runs"]["m"] = {"passed": [True]}
    assert "1 problems lost, 1 gained" in bench._pass_note(data, "m")
    data["batches"]["0"]["runs"]["m"] = {"passed": [True, True]}
    data["batches"]["1"]["runs"]["m"] = {"passed": [False]}
    assert bench._pass_note(data, "m") is None  # same problems passed


def test_a_method_that_changes_outputs_scores_below_one(bench, tmp_path, monkeypatch):
    plain = bench.METHODS["plain"]

    def mangle(model, tok, prompts, job):
        gen = plain.run(model, tok, prompts, job)
        gen.tokens[0] = gen.tokens[0][:2] + [(gen.tokens[0][2] + 1) % 90 + 3] + gen.tokens[0][3:]
        return gen

    monkeypatch.setitem(bench.METHODS, "mangle", bench.Method(mangle))
    tasks = lambda name, tok, limit: _toy_task(bench, limit)  # noqa: E731
    argv = _argv(tmp_path, "--methods", "plain,mangle", "--limit", "4")
    argv[argv.index("--batch-sizes") + 1] = "2"
    bench.main(argv, loader=_loader, tasks=tasks)
    data = json.loads((tmp_path / "bench" / "tiny-float32-b2.json").read_text())
    s = bench.summarise_method(data, "mangle")
    assert s["rows"] == 4 and s["exact"]["rows"] == pytest.approx(0.5)  # row 0 of each batch
    plain = [
        r for k in sorted(data["batches"]) for r in data["batches"][k]["runs"]["plain"]["tokens"]
    ]
    agreed = [2 if i % 2 == 0 else len(t) for i, t in enumerate(plain)]  # row 0 differs at 2
    assert s["exact"]["tokens"] == pytest.approx(sum(agreed) / sum(map(len, plain)))


def test_exact_match_by_hand(bench):
    got = bench.exact_match([[1, 2, 3], [4, 5], [6]], [[1, 2, 9], [4, 5], []])
    assert got == {"rows": pytest.approx(1 / 3), "tokens": pytest.approx(4 / 6)}


def test_finish_cuts_at_eos_then_at_a_stop_string(bench):
    tok = char_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Fuse()  # decode without spaces between characters
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    # (the tiny vocabulary has no newline: "|" stands for it)
    tokens, text = bench.finish(ids("abc|def x|if"), tok, [2], ["|def", "|if"])
    assert text == "abc" and tokens == ids("abc|def")
    tokens, text = bench.finish(ids("ab") + [2] + ids("|def"), tok, [2], ["|def"])
    assert tokens == ids("ab") + [2] and text == "ab"
    assert bench.finish(ids("plain"), tok, [2], []) == (ids("plain"), "plain")


def test_hf_stop_criterion_finds_a_stop_anywhere_in_the_new_text(bench):
    tok = char_tokenizer()
    tok.backend_tokenizer.decoder = decoders.Fuse()
    rows = torch.tensor([tok("xx|defab")["input_ids"], tok("|dexxxxx")["input_ids"]])
    assert StopInText(tok, ["|def"], 0)(rows, None).tolist() == [True, False]
    assert StopInText(tok, ["xx"], 2)(rows, None).tolist() == [False, True]  # new text only


def test_scores_f1_and_executes_only_when_asked(bench, monkeypatch):
    assert bench.squad_f1("The Denver Broncos.", ["Denver Broncos"]) == 1.0
    assert bench.squad_f1("in Paris, France", ["Paris"]) == pytest.approx(0.5)  # P 1/3, R 1
    problem = {
        "task_id": "t/0",
        "prompt": "def f():\n",
        "test": "def check(candidate):\n    assert candidate() == 1\n",
        "entry_point": "f",
    }
    assert bench.run_tests(problem, "    return 1\n") is True  # the real harness, trivial code
    assert bench.run_tests(problem, "    return 2\n") is False
    task = bench.Task("humaneval", [bench.Item("t/0", "def f():\n", problem)], [], (), 4, "pass@1")
    record = {"runs": {"plain": {"texts": ["    return 1\n"]}, "m": {"texts": ["    return 1\n"]}}}
    bench.score(record, task.items, task, False, {})
    assert "passed" not in record["runs"]["plain"]  # without --execute nothing runs
    ran = []
    monkeypatch.setattr(bench, "execute_fn", lambda p, c: ran.append(c) or True)
    bench.score(record, task.items, task, True, {})
    assert record["runs"]["m"]["passed"] == [True] and len(ran) == 1  # identical: run once


def test_unknown_methods_are_refused_with_the_known_ones(bench, tmp_path):
    with pytest.raises(SystemExit, match="lossy@1%"):
        bench.main(_argv(tmp_path, "--methods", "plain,lossy@2%"), loader=_loader)
    with pytest.raises(SystemExit) as e:
        bench.main(["--help"])
    assert e.value.code == 0


def test_a_lossy_cell_records_exit_layers(bench, tmp_path, monkeypatch):
    """The lossy adapter end to end, its policy calibrated on the calibration prompts (the
    real prepare calibrates on 64 stdlib prompts, too slow for a unit test)."""
    from adainfer.lossy import TokenExitPolicy, trace_exits

    def calibrate(ctx, job):
        prompts = list(ctx.task.calibration) * 2
        trace = trace_exits(ctx.model, ctx.tokenizer, prompts, max_new_tokens=6, batch_size=4)
        policy = TokenExitPolicy(risk=0.5, min_agreement=0.0).fit_trace(trace)
        return {"exits": [policy], "split": None}

    lossy = bench.Method(bench.run_lossy, prepare=calibrate)
    monkeypatch.setitem(bench.METHODS, "lossy@5%", lossy)
    tasks = lambda name, tok, limit: _toy_task(bench, limit)  # noqa: E731
    argv = _argv(tmp_path, "--methods", "plain,adainfer-plain,lossy@5%")
    argv[argv.index("--batch-sizes") + 1] = "2"
    bench.main(argv, loader=_loader, tasks=tasks)
    data = json.loads((tmp_path / "bench" / "tiny-float32-b2.json").read_text())
    assert bench.summarise_method(data, "adainfer-plain")["exact"]["rows"] == 1.0
    assert bench.summarise_method(data, "plain")["changed"] == 0.0  # the floor: fp32, exact
    s = bench.summarise_method(data, "lossy@5%")
    assert 1 <= s["exit_layer"] <= 4 and s["ratio"]["n"] == len(data["batches"])
    changed = s["changed"]
    assert 0 <= changed <= 1 and all(
        len(r["changed"]) == len(r["tokens"]) for b in data["batches"].values()
        for r in [b["runs"]["lossy@5%"]]
    )  # fmt: skip
    for b in data["batches"].values():  # which tokens skipped the full head, token by token
        run = b["runs"]["lossy@5%"]
        assert [len(x) for x in run["stats"]["head_skips"]] == [len(t) for t in run["tokens"]]


def test_crossfit_serves_each_half_a_policy_calibrated_on_the_other(bench, tmp_path, monkeypatch):
    """Every evaluated prompt is generated by a policy whose calibration never saw it; the
    two policies are written to the out dir and reused by a resumed run."""
    import adainfer.lossy as lossy

    traced, served, misses = [], [], []
    real_trace, real_run = lossy.trace_exits, bench._adainfer

    def trace(model, tok, prompts, **kw):
        traced.append(list(prompts))
        misses.append(kw["training_misses"])
        return real_trace(model, tok, prompts, **{**kw, "max_new_tokens": 4})

    def run(model, tok, prompts, job, **how):
        served.append((list(prompts), how["exits"]))
        return real_run(model, tok, prompts, job, **how)

    monkeypatch.setattr(lossy, "trace_exits", trace)
    monkeypatch.setattr(bench, "_adainfer", run)
    monkeypatch.setattr(lossy, "measure_exit_costs", lambda m, t, rows, vocab, **kw: None)
    bench._exit_trace.cache_clear()
    tasks = lambda name, tok, limit: _toy_task(bench, limit)  # noqa: E731
    argv = _argv(tmp_path, "--methods", "plain,lossy@5%")
    argv[argv.index("--batch-sizes") + 1] = "1"
    bench.main(argv, loader=_loader, tasks=tasks)
    split = bench.crossfit_split(len(PROMPTS), 1)
    assert split == 2 and sorted(map(sorted, traced)) == sorted(
        map(sorted, [PROMPTS[:2], PROMPTS[2:]])
    )
    files = sorted(p.name for p in (tmp_path / "exits").glob("*.json"))
    assert files == ["tiny-float32-b1-risk0.05-half0.json", "tiny-float32-b1-risk0.05-half1.json"]
    timed = [(p, e) for p, e in served if len(p) == 1][-len(PROMPTS) :]  # after the warm-up
    policies = {p[0]: e for p, e in timed}
    first, second = {id(policies[p]) for p in PROMPTS[:2]}, {id(policies[p]) for p in PROMPTS[2:]}
    assert len(first) == len(second) == 1 and first != second
    data = json.loads((tmp_path / "bench" / "tiny-float32-b1.json").read_text())
    assert data["settings"]["exit_calibration"] == "crossfit"
    with pytest.raises(SystemExit, match="at least 2 batches"):
        bench.crossfit_split(3, 2)
    assert bench.crossfit_split(164, 1) == bench.crossfit_split(164, 8) == 80
    assert len(list((tmp_path / "exits" / ".traces").glob("*.npz"))) == 2
    for f in (tmp_path / "exits").glob("*.json"):  # refit from the kept traces: no decoding
        f.unlink()
    (tmp_path / "bench" / "tiny-float32-b1.json").unlink()
    bench._exit_trace.cache_clear()
    traced.clear()
    bench.main(argv, loader=_loader, tasks=tasks)
    assert traced == [] and len(list((tmp_path / "exits").glob("*.json"))) == 2
    assert misses == [False, False] and "training_misses" not in data["settings"]  # as before
    out = tmp_path / "misses"  # the probes trained on shortlist misses: its own traces
    argv[argv.index("--out-dir") + 1] = str(out)
    bench._exit_trace.cache_clear()
    bench.main([*argv, "--training-misses"], loader=_loader, tasks=tasks)
    assert misses[2:] == [True, True]
    files = sorted(p.name for p in (out / "exits").glob("*.json"))
    assert files == [f"tiny-float32-b1-risk0.05-half{h}-misses.json" for h in (0, 1)]
    assert json.loads((out / "bench" / "tiny-float32-b1.json").read_text())["settings"][
        "training_misses"
    ]
    hidden = tmp_path / "hidden"  # probes that read the hidden state too: their own files
    argv[argv.index("--out-dir") + 1] = str(hidden)
    bench._exit_trace.cache_clear()
    bench.main([*argv, "--training-misses", "--hidden-state"], loader=_loader, tasks=tasks)
    files = sorted((hidden / "exits").glob("*.json"))
    assert [p.name for p in files] == [
        f"tiny-float32-b1-risk0.05-half{h}-misses-hidden.json" for h in (0, 1)
    ]
    assert all(lossy.TokenExitPolicy.load(p).hidden_state for p in files)
    data = json.loads((hidden / "bench" / "tiny-float32-b1.json").read_text())
    assert data["settings"]["hidden_state"] and len(bench.cell_policies(hidden, data)) == 1


def _ties():
    spec = importlib.util.spec_from_file_location("bench_ties", ROOT / "bench" / "ties.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ties_reads_the_top_two_logits_where_a_lossless_row_differs():
    ties = _ties()
    model, tok = tiny_model("llama")
    plain, other = [5, 6, 7, 8], [5, 6, 9]
    runs = {"plain": {"tokens": [plain, plain]}, "lossless-planned": {"tokens": [other, plain]}}
    data = {"model": "tiny", "dtype": "float32", "batch_size": 2}
    data["batches"] = {"0": {"ids": ["a", "b"], "runs": runs}}
    rows = ties.differing_rows(data)
    assert [(r["id"], r["at"]) for r in rows] == [("a", 2)]  # row b is identical
    (row,) = ties.cell_ties(data, model, tok, {"a": "hello", "b": "world"})
    ids, values = ties.top_two(model, tok, "hello", plain[:3])
    assert row["top2"] == ids and row["gap"] == pytest.approx(values[0] - values[1])
    assert row["token"] == 2 and row["of"] == 4 and row["cell"] == "tiny-fp32-b2"
    table = ties.table([row])
    assert "| tiny-fp32-b2 | lossless-planned | a | 3 of 4 |" in table


def test_planned_exit_drafts_keep_plain_output_and_keep_their_plans(bench, tmp_path):
    """Each crossfit half's exit policy wrapped in a plan fitted on its own calibration
    trace; the plans are kept in exits/draft-plans, said in the cell, and the rows are the
    plain model's (drafting or not)."""
    bench._exit_trace.cache_clear()
    tasks = lambda name, tok, limit: _toy_task(bench, limit)  # noqa: E731
    argv = _argv(tmp_path, "--methods", "plain,adainfer-plain,lossless-exits-planned@5%")
    argv[argv.index("--batch-sizes") + 1] = "1"
    bench.main(argv, loader=_loader, tasks=tasks)
    data = json.loads((tmp_path / "bench" / "tiny-float32-b1.json").read_text())
    prepared = data["methods"]["lossless-exits-planned@5%"]["prepared"]
    assert len(prepared["plans"]) == 2 and prepared["split"] == 2
    assert all(isinstance(p, str) and p for p in prepared["plans"])
    plans = sorted(p.name for p in (tmp_path / "exits" / "draft-plans").glob("*.json"))
    assert plans == [f"tiny-float32-b1-risk0.05-half{h}.json" for h in (0, 1)]
    s = bench.summarise_method(data, "lossless-exits-planned@5%")
    assert s["exact"]["rows"] == 1.0 and s["rows"] == len(PROMPTS)


def test_the_oracle_note_sets_the_share_of_tokens_that_left_against_the_calibration(bench):
    data = {
        "calibrated_exits": {"lossy@1%": {"num_layers": 4, "shares": [0.5, 0.25]}},
        "batches": {
            "0": {"runs": {"lossy@1%": {"stats": {"exit_layers": [[2, 4, 4, 3]]}}}},
            "1": {"runs": {"lossy@1%": {"stats": {"exit_layers": [[4, 4]]}}}},
        },
    }
    said = bench._exits_said(data, "lossy@1%")
    assert "33% of tokens left before the last layer" in said and "50%/25%" in said
    assert bench._exits_said(data, "lossy@5%") == "" and "LM head" not in said
    data["calibrated_exits"]["lossy@1%"]["heads"] = [0.6, 0.3]
    data["batches"]["0"]["runs"]["lossy@1%"]["stats"]["head_skips"] = [[1, 1, 0, 1]]
    assert "LM head" not in bench._exits_said(data, "lossy@1%")  # a batch without: no share
    data["batches"]["1"]["runs"]["lossy@1%"]["stats"]["head_skips"] = [[0, 1]]
    said = bench._exits_said(data, "lossy@1%")
    assert "67% skipped the full LM head (60%/30%)" in said


def test_rounds_time_each_batch_again_and_a_cell_keeps_its_plan(bench, tmp_path, monkeypatch):
    """--rounds 3: every method thrice per batch, its time the median of the three; the plan
    fitted for lossless-planned is kept in plans/ and a resumed cell reuses it."""
    import functools

    import adainfer.drafting as drafting

    tasks = lambda name, tok, limit: _toy_task(bench, 2)  # noqa: E731
    planner = drafting.DraftPlanner
    monkeypatch.setattr(
        drafting, "DraftPlanner", functools.partial(planner, repeats=2, max_new_tokens=8)
    )
    argv = _argv(tmp_path, "--methods", "plain,lossless-planned", "--rounds", "3")
    argv[argv.index("--batch-sizes") + 1] = "1"
    calls = _counting(bench, monkeypatch)
    bench.main(argv, loader=_loader, tasks=tasks)
    data = json.loads((tmp_path / "bench" / "tiny-float32-b1.json").read_text())
    assert data["settings"]["rounds"] == 3
    timed = 2 * 2 * 3  # batches x methods x rounds
    assert len([c for c in calls if c[2] == 6]) == timed + 2  # + each method's memory run
    for record in data["batches"].values():
        for run in record["runs"].values():
            assert len(run["seconds_rounds"]) == 3
            assert run["seconds"] == sorted(run["seconds_rounds"])[1]  # the median
    kept = tmp_path / "plans" / "tiny-fp32-b1.json"
    assert kept.is_file()
    assert data["methods"]["lossless-planned"]["prepared"]["described"]

    def refit(*args, **kwargs):
        raise AssertionError("the kept plan should serve the resumed cell")

    monkeypatch.setattr(drafting, "DraftPlanner", refit)
    (tmp_path / "bench" / "tiny-float32-b1.json").unlink()  # start the cell again
    bench.main(argv, loader=_loader, tasks=tasks)
    # an earlier grid's settings (one round) are refused, not mixed in
    with pytest.raises(SystemExit, match="other settings"):
        bench.main(argv[:-2], loader=_loader, tasks=tasks)


def test_confirm_plans_times_kept_plans_and_records_what_the_check_decides(
    bench, tmp_path, monkeypatch
):
    from adainfer.arch import find_parts
    from adainfer.drafting import DraftPlan, save_plan

    spec = importlib.util.spec_from_file_location(
        "confirm_plans", ROOT / "bench" / "confirm_plans.py"
    )
    cp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cp)
    model, tok = tiny_model("llama")
    monkeypatch.setattr(cp, "load", lambda name, dtype: (model, tok))
    monkeypatch.setattr(cp, "TASK_OF", {"tiny": "toy"})
    monkeypatch.setattr(cp, "make_task", lambda kind, n, tok, data, **_: _toy_task(bench))
    parts = find_parts(model)
    shape = dict(model="tiny", num_layers=parts.num_layers, vocab_size=parts.head.weight.shape[0])
    drafting = DraftPlan(2, 2, batch_size=2, meta={"dtype": "float32"}, **shape)
    plain = DraftPlan(None, batch_size=1, meta={"dtype": "float32"}, **shape)
    paths = [save_plan(drafting, tmp_path / "tiny-fp32-b2.json")]
    paths.append(save_plan(plain, tmp_path / "tiny-fp32-b1.json"))
    args = [str(p) for p in paths] + ["--batches", "1", "--max-new-tokens", "4"]
    assert cp.main(args) == 0
    assert cp.main(args + ["--evaluated"]) == 0
    found = json.loads((tmp_path / "confirmations.json").read_text())
    for prompts, key in (("calibration", "calibration-3-paragraphs"), ("evaluated", "evaluated")):
        entry = found[f"tiny-fp32-b2.json@4-{key}"]
        assert entry["prompts"] == prompts and entry["max_new_tokens"] == 4
        assert entry["distinct_prompts"] == 2  # one batch of 2
        assert entry["timed"]["pairs"] == 2 and entry["timed"]["identical"] == 1.0
        assert f"measured {entry['timed']['median']:.2f}x" in entry["decision"]
    assert (
        found["tiny-fp32-b1.json@4-calibration-3-paragraphs"]["timed"] is None
    )  # plain decoding: nothing to time
    stray = save_plan(drafting, tmp_path / "other-fp32-b2.json")  # no task for this model
    with pytest.raises(SystemExit, match="not a plan bench/generation.py kept"):
        cp.main([str(stray)])


def test_squad_calibration_takes_more_paragraphs_of_the_held_out_articles(bench):
    from conftest import SHARED_DATA

    if not (SHARED_DATA / "squad" / "dev-v1.1.json").exists():
        pytest.skip("no shared SQuAD data")
    one = bench.squad_task(None, SHARED_DATA, None, chat=False, calibration_paragraphs=1)
    three = bench.squad_task(None, SHARED_DATA, None, chat=False)  # the default: 3
    assert [it.prompt for it in one.items] == [it.prompt for it in three.items]
    assert len(one.calibration) == 8 and len(set(three.calibration)) == 24
    assert three.calibration[:8] == one.calibration  # the cells made with one paragraph
    evaluated = {it.prompt.split("\n\nQuestion")[0] for it in three.items}
    assert not evaluated & {p.split("\n\nQuestion")[0] for p in three.calibration}
    # the setting is kept with a SQuAD cell's settings, absent where it means what it did
    args = bench.parser().parse_args([])
    assert bench.settings_of(three, args, False)["calibration_paragraphs"] == 3
    args.calibration_paragraphs = 1
    assert "calibration_paragraphs" not in bench.settings_of(one, args, False)
    code = bench.Task("humaneval", [], ["def f():"], (), 8, "pass@1")
    assert "calibration_paragraphs" not in bench.settings_of(
        code, bench.parser().parse_args([]), False
    )
