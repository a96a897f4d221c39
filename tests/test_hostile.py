"""Hostile but fair inputs (issue 16): each one a clear error naming what to fix, never a crash,
a silent wrong answer or lost rows. One section per row of the issue's table, tiny models only."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from adainfer import AdaptiveEngine
from adainfer.cli import main
from adainfer.collect import collect, load_collected
from adainfer.files import FolderInUse, OutputLock
from adainfer.tasks import task_queries
from conftest import char_tokenizer, tiny_model
from test_models import _fake_alias, fake_convert, tiny_dir  # noqa: F401 (fixtures)


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


# ------------------------------------------------------------------ 1. damaged policy bytes
def layered():
    from test_policies import layered_data

    return layered_data()


def saved(tmp_path, name="crf", model=None):
    from adainfer import save_policy
    from adainfer.policies import make_policy

    X, y, groups = layered()
    policy = make_policy(name).fit(X, y, groups)
    model = model or tiny_model("llama")[0]
    return save_policy(policy, tmp_path / f"{name}.safetensors", model=model)


def data_range(path, array):
    """(start, stop) of `array`'s bytes in a safetensors file."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    start, stop = json.loads(raw[8 : 8 + n])[array]["data_offsets"]
    return 8 + n + start, 8 + n + stop


def rewrite(path, header=None, arrays=None, out=None):
    """The policy file with its header fields and arrays changed as given (None: dropped)."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), "np") as f:
        meta = json.loads(f.metadata()["adainfer"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for k, v in (header or {}).items():
        meta.pop(k) if v is None else meta.__setitem__(k, v)
    tensors.update(arrays or {})
    out = out or path.with_name("edited-" + path.name)
    save_file(tensors, str(out), metadata={"adainfer": json.dumps(meta)})
    return out


@pytest.mark.parametrize("where", [0.0, 0.004, 0.01, 0.3, 0.5, 0.9, 0.999])
def test_a_flipped_byte_in_the_crf_model_is_refused_before_crfsuite_reads_it(tmp_path, where):
    from adainfer import load_policy
    from adainfer.persist import PolicyFileError

    path = saved(tmp_path)
    start, stop = data_range(path, "model_bytes_")
    raw = bytearray(path.read_bytes())
    raw[start + int(where * (stop - start))] ^= 0xFF  # some offsets crashed the process (139)
    path.write_bytes(bytes(raw))
    with pytest.raises(PolicyFileError, match=rf"{path}: array model_bytes_ .* checksum"):
        load_policy(path)


def test_random_bytes_after_the_crf_header_are_refused(tmp_path):
    from adainfer import load_policy
    from adainfer.persist import PolicyFileError

    path = saved(tmp_path)
    start, stop = data_range(path, "model_bytes_")
    raw = bytearray(path.read_bytes())
    raw[start + 48 : stop] = np.random.default_rng(0).bytes(stop - start - 48)
    path.write_bytes(bytes(raw))
    with pytest.raises(PolicyFileError, match="checksum"):
        load_policy(path)


def test_a_crf_file_without_checksums_is_refused_unless_trusted(tmp_path):
    from adainfer import load_policy, save_policy
    from adainfer.persist import FORMAT, FORMAT_2, PolicyFileError, policy_header

    old = rewrite(saved(tmp_path), {"format": FORMAT_2, "arrays": None, "binding": None})
    with pytest.raises(PolicyFileError, match="no checksums.*unverified_ok=True"):
        load_policy(old)
    again = save_policy(load_policy(old, unverified_ok=True), tmp_path / "again.safetensors")
    assert policy_header(again)["format"] == FORMAT and load_policy(again).policy_.model_bytes_.size
    # even trusted, bytes that are not a crfsuite model never reach crfsuite
    junk = {"model_bytes_": np.frombuffer(np.random.default_rng(1).bytes(4680), np.uint8)}
    with pytest.raises(PolicyFileError, match="not a crfsuite model"):
        load_policy(rewrite(old, arrays=junk), unverified_ok=True)


def test_damaged_numbers_of_a_numpy_policy_are_refused_too(tmp_path):
    from adainfer import load_policy
    from adainfer.persist import PolicyFileError

    path = saved(tmp_path, "svm")
    start, _ = data_range(path, "dual_coef_")
    raw = bytearray(path.read_bytes())
    raw[start + 3] ^= 0x10  # a silently different decision before
    path.write_bytes(bytes(raw))
    with pytest.raises(PolicyFileError, match="dual_coef_ does not match its checksum"):
        load_policy(path)


# ------------------------------------------------------------------ 3. edited policy headers
MODEL = {
    "model_id": "tiny-llama",
    "model_type": "llama",
    "num_layers": 4,
    "hidden_size": 32,
    "vocab_size": 98,
}
EDITS = {
    "missing params": ({"params": None}, "lacks the field.s. params"),
    "unknown parameter": (
        {"params": {"features": ["gap", "top_prob"], "C": 1.0, "kernel": "rbf"}},
        "unknown parameter.s. kernel; it takes",
    ),
    "policy type changed": ({"policy": "logistic"}, "unknown parameter.s. gamma"),
    "model field of the wrong type": (
        {"model": {**MODEL, "num_layers": "4"}},
        "field model.num_layers must be a whole number >= 1, got '4'",
    ),
    "model not an object": ({"model": "tiny-llama"}, "field model must be null or an object"),
    "a null model field": (
        {"model": {**MODEL, "model_id": None}},
        "field model.model_id must be a string, got None",
    ),
    "features not a list": ({"features": "gap,top_prob"}, "field features must be a list"),
    "unknown feature": ({"features": ["gap", "vibes"]}, "unknown feature"),
    "plans of the wrong shape": ({"plans": {"1": [3, 5]}}, "field plans.1 must be an object"),
    "threshold not a number": (
        {"threshold": "high"},
        "field threshold must be null or a finite number",
    ),
    "target unknown": ({"target": "silver"}, "field target must be null or one of 'gold', 'final'"),
}


@pytest.mark.parametrize("edit", sorted(EDITS))
def test_an_edited_header_is_a_clear_error_naming_the_file(tmp_path, edit):
    from adainfer import load_policy
    from adainfer.persist import PolicyFileError

    changes, message = EDITS[edit]
    path = rewrite(saved(tmp_path, "svm"), changes)
    with pytest.raises(PolicyFileError, match=rf"{path}: .*{message}"):
        load_policy(path)


@pytest.mark.parametrize(
    "features", [["top_prob", "gap"], ["gap", "entropy"], ["entropy", "layer_frac"]]
)
def test_features_reordered_or_replaced_do_not_load(tmp_path, features):
    """Same length, so the arrays fit: the decision would silently read the wrong columns."""
    from adainfer import load_policy
    from adainfer.persist import PolicyFileError

    path = saved(tmp_path, "logistic")
    edited = rewrite(
        path, {"features": features, "params": {"features": features, "C": 1.0, "threshold": 0.5}}
    )
    with pytest.raises(PolicyFileError, match="features or model are not those the arrays"):
        load_policy(edited)


def test_a_policy_for_another_model_cannot_be_unbound_by_editing_its_model(tmp_path):
    from adainfer import load_policy
    from adainfer.persist import PolicyFileError, model_signature

    path = saved(tmp_path, "svm")
    other = model_signature(tiny_model("llama", layers=6)[0])
    with pytest.raises(PolicyFileError, match="not those the arrays"):
        load_policy(rewrite(path, {"model": other}))
    with pytest.raises(PolicyFileError, match="not those the arrays"):
        load_policy(rewrite(path, {"model": None}))


def test_arrays_that_do_not_fit_the_features_are_refused_in_old_files(tmp_path):
    """Files of format 1 and 2 carry no checksums: their arrays must still fit the header."""
    from adainfer import load_policy
    from adainfer.persist import FORMAT_2, PolicyFileError

    old = rewrite(
        saved(tmp_path, "logistic"), {"format": FORMAT_2, "arrays": None, "binding": None}
    )
    assert load_policy(old).policy_.coef_.shape == (2,)
    three = ["gap", "top_prob", "entropy"]
    wider = rewrite(old, {"features": three, "params": {"features": three}})
    with pytest.raises(PolicyFileError, match="array mean_ has shape .2., expected F with F = 3"):
        load_policy(wider)
    with pytest.raises(
        PolicyFileError, match="holds arrays .'coef_', 'intercept_'.*needs .'dual_coef_'"
    ):
        load_policy(rewrite(old, {"policy": "svm", "params": {}}))
    nan = {"coef_": np.array([np.nan, 1.0])}
    with pytest.raises(PolicyFileError, match="coef_ holds values that are not finite"):
        load_policy(rewrite(old, arrays=nan))


# ------------------------------------------------------------------ 3b. generation-side files
GENERATION = Path(__file__).parents[1] / "results" / "generation"
EXITS = GENERATION / "exits" / "qwen2.5-0.5b-bfloat16-b1-risk0.01.json"
PLAN = GENERATION / "plans" / "qwen2.5-0.5b-bf16-b1.json"


def edited_json(source, tmp_path, edit):
    data = json.loads(source.read_text())
    edit(data)
    path = tmp_path / source.name
    path.write_text(json.dumps(data))
    return path


EXIT_EDITS = {
    "risk a string": (lambda d: d["params"].update(risk="low"), "field params.risk must be"),
    "unknown parameter": (lambda d: d["params"].update(speed=2), "unknown field.s. speed"),
    "negative token": (lambda d: d["vocab"].__setitem__(0, -1), r"field vocab\[0\] must be"),
    "layer past the model": (lambda d: d.update(layers=[30]), r"layers \[30\] are not ascending"),
    "probe of 2 weights": (lambda d: d.update(coef=[[1.0, 2.0]]), "must hold 3 weights"),
    "threshold NaN": (lambda d: d.update(threshold=float("nan")), "field threshold must be"),
    "num_layers missing": (lambda d: d.pop("num_layers"), "lacks the field.s. num_layers"),
    "costs a list": (lambda d: d.update(costs=[1, 2]), "field costs must be an object"),
}


@pytest.mark.parametrize("edit", sorted(EXIT_EDITS))
def test_an_edited_token_exit_policy_is_a_clear_error(tmp_path, edit):
    from adainfer.lossy import TokenExitPolicy

    change, message = EXIT_EDITS[edit]
    path = edited_json(EXITS, tmp_path, change)
    with pytest.raises(ValueError, match=rf"{path} is not a readable .*{message}"):
        TokenExitPolicy.load(path)


PLAN_EDITS = {
    "draft layer a string": (
        lambda d: d["plan"].update(draft_layer="21"),
        "field plan.draft_layer must be null or a whole number >= 1",
    ),
    "negative draft token": (
        lambda d: d["plan"]["draft_vocab"].__setitem__(0, -5),
        r"field plan.draft_vocab\[0\] must be",
    ),
    "model check nulled": (
        lambda d: d["plan"].update(num_layers=None),
        "num_layers and vocab_size must both be given",
    ),
    "draft layer past the model": (
        lambda d: d["plan"].update(draft_layer=30),
        "draft_layer 30 is not above a layer of 24",
    ),
    "unknown field": (lambda d: d["plan"].update(turbo=True), "unknown field.s. turbo"),
    "plan not an object": (lambda d: d.update(plan=[21]), "field plan must be an object"),
}


@pytest.mark.parametrize("edit", sorted(PLAN_EDITS))
def test_an_edited_draft_plan_is_a_clear_error(tmp_path, edit):
    from adainfer.drafting import load_plan

    change, message = PLAN_EDITS[edit]
    path = edited_json(PLAN, tmp_path, change)
    with pytest.raises(ValueError, match=rf"{path} is a damaged draft plan: .*{message}"):
        load_plan(path)


def test_the_committed_generation_files_still_load():
    from adainfer.drafting import load_plan
    from adainfer.lossy import TokenExitPolicy

    for path in sorted((GENERATION / "exits").glob("*.json")):
        assert TokenExitPolicy.load(path).layers_ == json.loads(path.read_text())["layers"]
    for path in sorted((GENERATION / "plans").glob("*.json")):
        assert load_plan(path).num_layers == 24


# ------------------------------------------------------------------ 4. numbers out of range
@pytest.mark.parametrize("cost", ["-1", "-100", "nan", "inf", "1:nan", "1:1,8:-0.5", "8:inf"])
def test_a_negative_or_non_finite_check_cost_is_refused(cost, capsys):
    from adainfer.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["fit", "--data", "d", "--out", "o", "--check-cost", cost])
    assert e.value.code == 2 and "costs finite and >= 0" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_a_non_finite_policy_parameter_is_refused(value, capsys):
    from adainfer.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", "--data", "d", "--out", "o", "--param", f"t={value}"])
    assert "is not a finite number" in capsys.readouterr().err


def test_the_library_refuses_them_too():
    from adainfer.checks import PlannedPolicy
    from adainfer.policies import GapThreshold, LogisticExit, SVMExit
    from test_checks import settling_traces

    X, y, _ = layered()
    for cost in (-1.0, float("nan"), float("inf"), {1: 1.0, 8: float("nan")}, {0: 1.0}):
        with pytest.raises(ValueError, match="costs finite and >= 0"):
            PlannedPolicy(GapThreshold(), check_costs=cost).fit(settling_traces(Q=20))
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        GapThreshold(float("nan")).predict(X[:, :1])
    with pytest.raises(ValueError, match="threshold must be a finite number"):
        LogisticExit(threshold=float("inf")).fit(X, y)
    for rows in (0, -5, 1, 2.5):  # 0 said "the model is never right on this data"
        with pytest.raises(ValueError, match="max_train_rows must be a whole number of at least 2"):
            SVMExit(max_train_rows=rows).fit(X, y)
    assert SVMExit(max_train_rows=40).fit(X, y).support_vectors_.shape[0] <= 40


# ------------------------------------------------------------------ 5. a damaged conversion cache
@pytest.fixture
def converted(monkeypatch, tmp_path, fake_convert):  # noqa: F811
    """A fake alias converted once into tmp_path/cache; returns (its folder, the convert log)."""
    from adainfer import models

    alias = _fake_alias(monkeypatch, tmp_path)
    models.load("tiny-test", cache_dir=tmp_path / "cache")
    return tmp_path / "cache" / f"tiny-test-{alias.sha256[:12]}", fake_convert


def weights(folder):
    (path,) = folder.glob("*.safetensors")
    return path


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_truncated_or_missing_cached_weight_file_says_how_to_rebuild(converted, damage):
    from adainfer import models
    from adainfer.models import ModelNotAvailable

    folder, conversions = converted
    path = weights(folder)
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:1000])
        said = rf"{path.name} has 1000 bytes, \d+ were written"
    else:
        path.unlink()
        said = f"{path.name} is missing"
    with pytest.raises(ModelNotAvailable, match=rf"{folder} is damaged: {said}.*rm -rf"):
        models.load("tiny-test", cache_dir=folder.parent)
    models.shutil.rmtree(folder)  # as the message says: the next load converts anew
    models.load("tiny-test", cache_dir=folder.parent)
    assert len(conversions) == 2


def test_changed_bytes_of_the_same_size_are_found_when_asked(converted, monkeypatch):
    from adainfer import models
    from adainfer.models import ModelNotAvailable

    folder, _ = converted
    path = weights(folder)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # a weight, not the header: loads, silently other numbers
    path.write_bytes(bytes(raw))
    models.load("tiny-test", cache_dir=folder.parent)  # sizes only by default: cheap
    with pytest.raises(ModelNotAvailable, match=f"{path.name} does not match its sha256"):
        models.load("tiny-test", cache_dir=folder.parent, verify=True)
    monkeypatch.setenv("ADAINFER_VERIFY", "1")
    with pytest.raises(ModelNotAvailable, match="sha256.*rm -rf"):
        models.load("tiny-test", cache_dir=folder.parent)


def test_a_damaged_cache_from_before_manifests_still_says_how_to_rebuild(converted):
    from adainfer import models
    from adainfer.models import MANIFEST, ModelNotAvailable

    folder, _ = converted
    (folder / MANIFEST).unlink()
    path = weights(folder)
    path.write_bytes(path.read_bytes()[:1000])  # was a raw SafetensorError
    with pytest.raises(ModelNotAvailable, match=rf"cached in {folder} \(SafetensorError.*rm -rf"):
        models.load("tiny-test", cache_dir=folder.parent)


# ------------------------------------------------------------------ 6. NaN / inf in a layer
def broken_model(from_layer=3, value=float("nan")):
    """A tiny Llama whose layer `from_layer` (1-based) writes `value` into the residual."""
    import torch

    model, tok = tiny_model("llama", layers=4)
    with torch.no_grad():
        model.model.layers[from_layer - 1].mlp.down_proj.weight.fill_(value)
    return model, tok


PROMPTS = ["Q: apple\nA: Apple\n\nQ: river\nA:", "Q: cat\nA:"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_at_a_check_name_the_layer(value):
    from adainfer.policies import CRFExit, GapThreshold
    from adainfer.prefill import NonFiniteLogits

    engine = AdaptiveEngine(*broken_model(3, value))
    crf = CRFExit().fit(*layered())
    for policy in (GapThreshold(2.0), crf):  # 2.0: the gap never reaches it
        with pytest.raises(NonFiniteLogits, match=r"layer 3 gave non-finite logits .* \[0, 1\]"):
            engine.run(PROMPTS, policy, features=("gap", "top_prob"))
    # no check before the answer (the plain model's own forward): the answer is refused
    with pytest.raises(NonFiniteLogits, match="layer 4 gave non-finite logits"):
        engine.run(PROMPTS, GapThreshold(0.5), check_layers=[])
    # with a check layer or two before the NaN, rows still going meet it after them
    with pytest.raises(NonFiniteLogits, match="layer 4"):
        engine.run(PROMPTS, GapThreshold(2.0), check_layers=[1, 2])


def test_non_finite_logits_in_generation_are_an_error():
    import adainfer

    model, tok = broken_model(2)
    with pytest.raises(ValueError, match="non-finite logits"):
        adainfer.generate(model, tok, PROMPTS, max_new_tokens=2)
    with pytest.raises(ValueError, match="non-finite logits"):
        adainfer.generate(model, tok, PROMPTS, max_new_tokens=2, draft_layer=1, draft_tokens=2)


# ------------------------------------------------------------------ 7. smaller ones
def test_no_prompts_is_a_clear_error(engine):
    from adainfer.policies import NeverExit

    for run in (engine.run, engine.run_all):
        with pytest.raises(ValueError, match="no prompts given"):
            run([], NeverExit())


def test_n_test_beyond_the_task_is_capped_out_loud(tmp_path, caplog):
    small = tmp_path / "small.jsonl"
    small.write_text(
        "".join(json.dumps({"input": f"w{i}", "output": f"W{i}"}) + "\n" for i in range(10))
    )
    with caplog.at_level("WARNING"):
        _, test = task_queries(char_tokenizer(), [str(small)], shots=1, n_train=2, n_test=40)
    assert len(test) == 5
    assert "has 10 examples: holding out 5, not the 40 asked (--n-test)" in caplog.text


def test_a_min_layer_past_the_model_is_refused(model_dir, tmp_path, capsys):
    model, tok = tiny_model("llama", layers=4)
    for layer in (4, 1000):
        with pytest.raises(ValueError, match=f"min_layer {layer} leaves no layer to check"):
            AdaptiveEngine(model, tok, min_layer=layer)
    assert AdaptiveEngine(model, tok, min_layer=3).layers_to_check() == (3, 4)
    argv = ["eval", "--model", model_dir, "--task", "capitalize", "--policy", "gap"]
    assert main([*argv, "--min-layer", "1000", "--out", str(tmp_path / "e.json")]) == 2
    assert "checks run after layers 1..3" in capsys.readouterr().err


def test_a_corrupt_meta_json_is_named(engine, tmp_path):
    out = tmp_path / "data"
    collect(engine, queries(), out, batch_size=2, progress=False)
    (out / "meta.json").write_text('{"model": {"model_id": ')
    with pytest.raises(ValueError, match=rf"{out / 'meta.json'} is not a readable"):
        collect(engine, queries(), out, batch_size=2, progress=False)
    with pytest.raises(ValueError, match=rf"{out / 'meta.json'} is not a readable"):
        load_collected(out)
    (out / "meta.json").write_text('["not", "a", "collect", "record"]')
    with pytest.raises(ValueError, match="another model or feature set .None, None."):
        collect(engine, queries(), out, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="records no model"):
        load_collected(out)


# ------------------------------------------------------------------ what already held: kept so
def test_the_inputs_that_already_gave_clear_errors_still_do(model_dir, tmp_path, capsys):
    import pickle

    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(pickle.dumps({"policy": "svm"}))
    long = tmp_path / "long.jsonl"
    long.write_text(
        "".join(json.dumps({"input": f"{i}" + "x" * 400, "output": "y"}) + "\n" for i in range(9))
    )
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\nnot json\n')
    out = ["--out", str(tmp_path / "e.json")]
    eval_ = ["eval", "--model", model_dir, "--shots", "1", "--n-test", "3", *out]
    cases = {
        "not an adainfer policy file": [*eval_, "--task", "capitalize", "--policy", str(disguised)],
        "context is 256": [*eval_, "--task", str(long), "--policy", "gap"],
        "line 2": [*eval_, "--task", str(bad), "--policy", "gap"],
        "unknown model": [
            "eval",
            "--model",
            "gpt-17",
            "--task",
            "capitalize",
            "--policy",
            "gap",
            *out,
        ],
        "nosuch": [*eval_, "--task", "nosuch", "--policy", "gap"],
    }
    for message, argv in cases.items():
        assert main(argv) == 2, message
        assert message in capsys.readouterr().err
    assert not (tmp_path / "e.json").exists()
