"""Collect: per-layer labels, incremental parquet parts, resume after a kill, training arrays."""

import json

import numpy as np
import pytest

from adainfer import AdaptiveEngine
from adainfer.collect import collect, collected_ids, load_collected, training_arrays
from adainfer.pipeline import fit_policy
from adainfer.policies import CRFExit, SVMExit
from adainfer.tasks import task_queries
from conftest import char_tokenizer, tiny_model


@pytest.fixture
def setup():
    model, tok = tiny_model("llama", layers=4)
    train, _ = task_queries(
        char_tokenizer(), ["capitalize", "first_item"], shots=2, n_train=6, n_test=5
    )
    return AdaptiveEngine(model, tok), train


def test_labels_say_whether_each_layer_top1_is_gold(setup, tmp_path):
    engine, queries = setup
    collect(engine, queries, tmp_path, batch_size=4, progress=False)
    table, meta = load_collected(tmp_path)
    assert table.num_rows == len(queries) * 4
    assert meta["model"]["num_layers"] == 4
    top1, gold, label = (table.column(c).to_numpy() for c in ("top1", "gold", "label"))
    assert ((top1 == gold) == (label == 1)).all()
    # the last layer's top-1 is the plain model's answer
    last = table.filter(table.column("layer").to_numpy() == 4).sort_by("query_id")
    by_id = {q.id: q for q in queries}
    ids = last.column("query_id").to_pylist()
    full = engine.run([by_id[i].prompt for i in ids], __import__("adainfer").policies.NeverExit())
    assert (last.column("top1").to_numpy() == full.top1).all()


def test_killed_run_resumes_without_redoing_work(setup, tmp_path, monkeypatch):
    engine, queries = setup
    real_run, calls = engine.run, []

    def dies_on_third_batch(prompts, *a, **k):
        calls.append(len(prompts))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_run(prompts, *a, **k)

    monkeypatch.setattr(engine, "run", dies_on_third_batch)
    with pytest.raises(KeyboardInterrupt):
        collect(engine, queries, tmp_path, batch_size=2, progress=False)
    assert len(collected_ids(tmp_path)) == 4
    assert not list(tmp_path.glob(".*tmp"))  # no half-written part left behind
    calls.clear()
    monkeypatch.setattr(
        engine,
        "run",
        lambda prompts, *a, **k: (calls.append(len(prompts)), real_run(prompts, *a, **k))[1],
    )
    collect(engine, queries, tmp_path, batch_size=2, progress=False)
    assert sum(calls) == len(queries) - 4  # only the missing queries ran
    table, _ = load_collected(tmp_path)
    assert sorted(set(table.column("query_id").to_pylist())) == sorted(q.id for q in queries)
    assert table.num_rows == len(queries) * 4


def test_prompts_of_similar_length_share_a_batch(setup, tmp_path, monkeypatch):
    engine, queries = setup
    real_run, batches = engine.run, []
    monkeypatch.setattr(
        engine,
        "run",
        lambda prompts, *a, **k: (
            batches.append([len(p) for p in prompts]),
            real_run(prompts, *a, **k),
        )[1],
    )
    collect(engine, queries, tmp_path, batch_size=3, progress=False)
    lengths = sorted((len(q.prompt) for q in queries), reverse=True)
    assert len(set(lengths)) > 3  # the order matters here
    assert [
        n for b in batches for n in b
    ] == lengths  # padded to their own length, not a random neighbour's
    assert collected_ids(tmp_path) == {q.id for q in queries}


def test_long_prompts_run_alone_under_the_token_budget(setup, tmp_path, monkeypatch):
    from adainfer.collect import _batches

    assert list(_batches([900, 500, 300, 300, 100, 100, 100], 4, 1000)) == [
        (0, 1),
        (1, 3),
        (3, 6),
        (6, 7),
    ]
    assert list(_batches([5000, 10], 8, 1000)) == [
        (0, 1),
        (1, 2),
    ]  # a prompt over the budget still runs, alone
    assert list(_batches([900, 500, 300], 2, None)) == [(0, 2), (2, 3)]
    engine, queries = setup
    real_run, batches = engine.run, []
    monkeypatch.setattr(
        engine,
        "run",
        lambda prompts, *a, **k: (
            batches.append(engine.encode(prompts)["input_ids"].shape),
            real_run(prompts, *a, **k),
        )[1],
    )
    budget = 3 * max(len(q.prompt) for q in queries) // 2  # room for one longest prompt, not two
    collect(engine, queries, tmp_path, batch_size=4, max_batch_tokens=budget, progress=False)
    assert batches[0][0] == 1 and max(b[0] for b in batches) > 1
    assert all(rows == 1 or rows * length <= budget for rows, length in batches)
    assert collected_ids(tmp_path) == {q.id for q in queries}
    assert len(list(tmp_path.glob("part-*.parquet"))) < len(batches)  # small batches share a part


def test_collect_folder_of_another_model_is_refused(setup, tmp_path):
    engine, queries = setup
    collect(engine, queries[:2], tmp_path, progress=False)
    other = AdaptiveEngine(*tiny_model("llama", layers=6))
    with pytest.raises(ValueError, match="another model"):
        collect(other, queries, tmp_path, progress=False)


def test_a_folder_from_before_the_parameter_count_gets_it_on_resume(setup, tmp_path):
    engine, queries = setup
    collect(engine, queries[:2], tmp_path, batch_size=2, progress=False)
    meta_path = tmp_path / "meta.json"
    meta = json.loads(meta_path.read_text())
    assert meta["parameters"] == sum(p.numel() for p in engine.model.parameters())
    old = {k: v for k, v in meta.items() if k != "parameters"}
    meta_path.write_text(json.dumps(old))  # as collect wrote it before the count
    collect(engine, queries[:2], tmp_path, batch_size=2, progress=False)
    assert json.loads(meta_path.read_text()) == meta
    meta_path.write_text(json.dumps({**meta, "parameters": meta["parameters"] + 1}))
    with pytest.raises(ValueError, match="another model"):  # a recorded count must match
        collect(engine, queries[:2], tmp_path, batch_size=2, progress=False)


def test_training_arrays_and_fit(setup, tmp_path):
    engine, queries = setup
    collect(engine, queries, tmp_path, progress=False)
    table, _ = load_collected(tmp_path)
    X, y, groups = training_arrays(table, ("gap", "top_prob"))
    assert X.shape == (len(queries) * 4, 2) and len(y) == len(groups)
    # rows of one query are contiguous and in layer order (what the CRF needs)
    first = groups == groups[0]
    assert first[:4].all() and not first[4:].any()
    with pytest.raises(ValueError, match="never right|nothing to learn"):
        fit_policy(
            tmp_path, SVMExit()
        )  # a random tiny model is never right: clear error, not a crash
    labels = (X[:, 0] > np.median(X[:, 0])).astype(int)  # learnable stand-in labels
    CRFExit().fit(X, labels, groups)


def test_missing_collect_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="adainfer collect"):
        load_collected(tmp_path / "nothing")


def test_a_missing_middle_part_is_refilled_without_overwriting_the_others(setup, tmp_path):
    engine, queries = setup
    collect(engine, queries, tmp_path, batch_size=2, progress=False)
    parts = sorted(tmp_path.glob("part-*.parquet"))
    assert len(parts) >= 3
    parts[1].unlink()  # lost or deleted by hand: its queries must run again, the rest stay put
    kept = {p: p.read_bytes() for p in parts if p != parts[1]}
    collect(engine, queries, tmp_path, batch_size=2, progress=False)
    assert all(p.read_bytes() == b for p, b in kept.items())
    table, _ = load_collected(tmp_path)
    assert sorted(table.column("query_id").to_pylist()) == sorted(
        q.id for q in queries for _ in range(4)
    )


def test_an_id_collected_from_another_prompt_is_refused(setup, tmp_path):
    import dataclasses

    engine, queries = setup
    collect(engine, queries[:4], tmp_path, batch_size=4, progress=False)
    # the same ids under other settings (another --n-test moves every query): refuse, never mix
    moved = [dataclasses.replace(q, prompt=q.prompt.replace("Q:", "Q: ", 1)) for q in queries]
    with pytest.raises(
        ValueError,
        match=f"holds 4 queries with these ids but other prompts.*first: {queries[0].id}",
    ):
        collect(engine, moved, tmp_path, batch_size=4, progress=False)
    collect(
        engine, queries, tmp_path, batch_size=4, progress=False
    )  # the same queries resume as before
    assert collected_ids(tmp_path) == {q.id for q in queries}


def test_a_mistyped_task_or_batch_size_is_an_error(setup, tmp_path):
    engine, queries = setup
    collect(engine, queries, tmp_path, batch_size=4, progress=False)
    assert load_collected(tmp_path, ["capitalize"])[0].num_rows == 6 * 4
    with pytest.raises(
        ValueError,
        match=r"no rows of task\(s\) \['first_iten'\]; it holds \['capitalize', 'first_item'\]",
    ):
        load_collected(tmp_path, ["capitalize", "first_iten"])  # would train on capitalize alone
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        collect(engine, queries, tmp_path / "b", batch_size=0, progress=False)  # looped forever
