"""The CLI end to end on a tiny model saved as a local Hugging Face folder."""

import json

import pytest

from adainfer.cli import build_parser, main


@pytest.fixture(scope="module")
def model_dir(saved_tiny):
    return saved_tiny("llama")


@pytest.mark.parametrize("command", ["collect", "fit", "eval", "demo", "generate"])
def test_every_command_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 300


def test_unknown_options_are_refused_except_lm_evals(capsys):
    # main() parses known arguments only, so that `lm-eval` can pass its options on
    with pytest.raises(SystemExit) as e:
        main(["eval", "--task", "capitalize", "--policy", "gap", "--out", "x", "--bogus", "1"])
    assert e.value.code == 2
    assert "unrecognized arguments: --bogus 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args",
    [
        ["reproduce", "--out-dir", "x", "--max-batch-tokens", "-5"],
        ["collect", "--task", "capitalize", "--out", "x", "--max-batch-tokens", "many"],
        ["bench", "--min-paired", "0"],
        ["collect", "--task", "capitalize", "--out", "x", "--batch-size", "0"],  # looped forever
        ["eval", "--task", "capitalize", "--policy", "gap", "--out", "x", "--n-test", "-1"],
        ["eval", "--task", "capitalize", "--policy", "gap", "--out", "x", "--stride", "0"],
        ["collect", "--task", "capitalize", "--out", "x", "--shots", "-2"],
        ["reproduce", "--out-dir", "x", "--n-queries", "0"],
        ["bench", "--repeats", "0"],
        ["bench", "--batch-sizes", "8,0"],
        ["reproduce", "--out-dir", "x", "--shots", "0,-5"],
        ["reproduce", "--out-dir", "x", "--shots", ","],
    ],
)
def test_counts_out_of_range_are_refused_with_the_bound(args, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(args)
    assert e.value.code == 2
    assert "whole number" in capsys.readouterr().err


def test_repeated_values_in_a_list_count_once():
    assert build_parser().parse_args(["bench", "--batch-sizes", "8,1,8"]).batch_sizes == (8, 1)


def test_collect_fit_eval(model_dir, tmp_path, capsys):
    data, policy, summary = tmp_path / "data", tmp_path / "gap.safetensors", tmp_path / "eval.json"
    common = ["--model", model_dir, "--task", "capitalize", "--shots", "2", "--n-test", "6"]
    assert main(["collect", *common, "--n-train", "4", "--out", str(data)]) == 0
    assert list(data.glob("part-*.parquet"))
    assert (
        main(
            [
                "fit",
                "--data",
                str(data),
                "--policy",
                "gap",
                "--param",
                "threshold=0.5",
                "--check-cost",
                "0.5",
                "--out",
                str(policy),
            ]
        )
        == 0
    )
    assert "checks at layers" in capsys.readouterr().out
    from adainfer.persist import load_policy

    fitted = load_policy(
        policy
    )  # a threshold given by hand is kept; the schedule is planned around it
    assert fitted.threshold_ == 0.5 and set(fitted.plans_) == {1}
    assert (
        main(
            ["eval", *common, "--policy", str(policy), "--policy", "oracle", "--out", str(summary)]
        )
        == 0
    )
    s = json.loads(summary.read_text())
    assert set(s["policies"]) == {"full", str(policy), "oracle"}
    for fig in s["policies"].values():
        assert {
            "accuracy",
            "mean_exit_layer",
            "num_layers",
            "flops_ratio",
            "true_flops_ratio",
            "wall_time_s",
        } <= set(fig)
    assert s["num_queries"] == 6 and s["policies"]["full"]["flops_ratio"] == 1.0
    assert s["policies"]["oracle"]["accuracy"] >= s["policies"]["full"]["accuracy"]
    assert all(
        sum(fig["exit_layer_histogram"]) == 6 and set(fig["per_task"]) == {"capitalize"}
        for fig in s["policies"].values()
    )
    assert "| full |" in capsys.readouterr().out
    # the held-out queries can be recorded too, for offline judging; never the training ones
    held = tmp_path / "held"
    assert main(["collect", *common, "--n-train", "4", "--held-out", "--out", str(held)]) == 0
    from adainfer.collect import load_collected

    held_ids, train_ids = (
        set(load_collected(d)[0].column("query_id").to_pylist()) for d in (held, data)
    )
    assert len(held_ids) == 6 and len(train_ids) == 4 and not held_ids & train_ids


def test_bad_inputs_give_one_clear_line(model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "output": "b"}\nnot json\n')
    assert (
        main(["collect", "--model", model_dir, "--task", str(bad), "--out", str(tmp_path / "d")])
        == 2
    )
    assert "line 2" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--model",
                "no-such-model",
                "--task",
                "capitalize",
                "--policy",
                "gap",
                "--out",
                str(tmp_path / "e.json"),
            ]
        )
        == 2
    )
    assert "smollm2-135m" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--model",
                model_dir,
                "--task",
                "capitalize",
                "--policy",
                "forest",
                "--out",
                str(tmp_path / "e.json"),
            ]
        )
        == 2
    )
    assert "svm" in capsys.readouterr().err
    assert (
        main(
            [
                "eval",
                "--model",
                model_dir,
                "--task",
                "capitalize",
                "--policy",
                "svm",
                "--out",
                str(tmp_path / "e.json"),
            ]
        )
        == 2
    )
    assert (
        "adainfer fit" in capsys.readouterr().err
    )  # an untrained classifier is refused, not a traceback
    assert (
        main(["fit", "--data", str(tmp_path / "none"), "--out", str(tmp_path / "p.safetensors")])
        == 2
    )
    assert "adainfer collect" in capsys.readouterr().err


def test_device_map_auto_passes_through_to_accelerate(model_dir, tmp_path, monkeypatch):
    import transformers

    from adainfer import AdaptiveEngine, load
    from adainfer.policies import NeverExit
    from adainfer.prefill import plain_last_logits

    seen, real = [], transformers.AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(
        transformers.AutoModelForCausalLM,
        "from_pretrained",
        lambda *a, **k: seen.append(k.get("device_map")) or real(*a, **k),
    )
    model, tok = load(model_dir, device_map="auto")
    assert seen == ["auto"]  # handed to accelerate (which keeps a CPU-only model on the CPU)
    engine = AdaptiveEngine(model, tok)
    prompts = ["Q: a\nA:", "Q: longer one\nA:"]
    result = engine.run(prompts, NeverExit(), check_layers=[1, 2, 3, 4])
    assert (result.top1 == plain_last_logits(engine, prompts).argmax(-1).numpy()).all()
    out = tmp_path / "e.json"
    assert (
        main(
            [
                "eval",
                "--model",
                model_dir,
                "--device-map",
                "auto",
                "--task",
                "capitalize",
                "--n-test",
                "4",
                "--policy",
                "oracle",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert seen == ["auto", "auto"]


def test_fit_learns_final_targets_and_a_threshold(model_dir, tmp_path, capsys):
    import numpy as np

    from adainfer.persist import load_policy

    data, out = tmp_path / "data", tmp_path / "p.safetensors"
    assert (
        main(
            [
                "collect",
                "--model",
                model_dir,
                "--task",
                "capitalize",
                "--shots",
                "2",
                "--n-train",
                "8",
                "--out",
                str(data),
            ]
        )
        == 0
    )
    # the tiny model's top-1 changes over depth, so "already final" labels have both classes
    assert (
        main(
            [
                "fit",
                "--data",
                str(data),
                "--policy",
                "logistic",
                "--target",
                "final",
                "--check-cost",
                "1:0.5,8:0.1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    policy = load_policy(out)
    assert policy.target_ == "final" and set(policy.plans_) == {1, 8}
    assert "stop threshold" in said and np.isfinite(policy.threshold_)
    from adainfer.pipeline import fit_policy
    from adainfer.policies import LogisticExit

    same = fit_policy(
        data, LogisticExit(), check_cost={1: 0.5, 8: 0.1}, target="final"
    )  # the CLI is the library, no more
    assert same.threshold_ == policy.threshold_ and same.plans_ == policy.plans_
    assert same.model_ == policy.model_ == json.loads((data / "meta.json").read_text())["model"]

    # the bench's default policy, with its own features (it needs depth to tell layers apart)
    out = tmp_path / "layer.safetensors"
    assert (
        main(
            [
                "fit",
                "--data",
                str(data),
                "--policy",
                "layer-logistic",
                "--target",
                "final",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert "layer_frac" in load_policy(out).features


@pytest.fixture
def answered_by_the_model(saved_tiny, monkeypatch):
    """The demo on the tiny llama, whose own answers are the gold: a random model is never
    right, and the policies need both labels."""
    from dataclasses import replace

    from adainfer import demo, models
    from adainfer.prefill import AdaptiveEngine, plain_last_logits

    path = saved_tiny("llama")
    engine = AdaptiveEngine(*models.load(path))
    real = demo.task_queries

    def own_answers(qs):
        answers = plain_last_logits(engine, [q.prompt for q in qs]).argmax(-1) if qs else []
        return [replace(q, gold=int(g)) for q, g in zip(qs, answers)]

    def queries(tok, *a, **k):
        return [own_answers(qs) for qs in real(tok, *a, **k)]

    monkeypatch.setattr(demo, "task_queries", queries)
    return path


def test_demo_smoke_runs_end_to_end_on_a_tiny_model(answered_by_the_model, tmp_path):
    from adainfer import demo

    s = demo.run_demo(
        answered_by_the_model,
        tmp_path,
        smoke=True,
        tasks=("capitalize", "first_item"),
        shots=1,
        n_train=6,
        n_test=4,
        batch_size=4,
        progress=False,
    )
    names = {"full", "gap", "crf", "svm", "logistic", "svm+layer", "svm+layer, planned", "oracle"}
    assert set(s["policies"]) == names
    assert (
        s["policies"]["full"]["accuracy"] == 1.0
        and s["layer_accuracy"][-1] == 1.0
        and len(s["layer_accuracy"]) == 4
    )
    assert (
        s["policies"]["oracle"]["mean_exit_layer"] <= s["policies"]["full"]["mean_exit_layer"] == 4
    )
    assert all(
        line.split(" | ")[0].strip("| ") in names
        for line in (tmp_path / "table.md").read_text().splitlines()[2:]
    )
    assert len(list((tmp_path / "policies").glob("*.safetensors"))) == 6
    assert (tmp_path / "accuracy_vs_layers.png").stat().st_size > 10_000


def test_demo_default_times_the_plan_and_ends_with_its_verdict(answered_by_the_model, tmp_path):
    from adainfer import demo

    s = demo.run_demo(
        answered_by_the_model,
        tmp_path,
        tasks=("capitalize",),
        shots=1,
        n_train=12,
        n_test=4,
        batch_size=4,
        progress=False,
    )
    assert set(s["policies"]) == {"full", "planned"} and s["planned_policy"] == "planned"
    assert s["calibration_queries"] == 12 and s["num_queries"] == 4
    # the plot's curve comes from the calibration traces: every query is right at the last layer
    assert len(s["layer_accuracy"]) == 4 and s["layer_accuracy"][-1] == 1.0
    assert s["verdict"] == demo.verdict(s, "capitalize")
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["verdict"] == s["verdict"] and (tmp_path / "demo.png").stat().st_size > 10_000


def test_demo_calibrates_on_held_out_examples_the_test_queries_never_share():
    from dataclasses import replace

    from adainfer.demo import PRESETS, demo_queries
    from conftest import char_tokenizer

    preset = replace(
        PRESETS["smoke"], tasks=("capitalize", "last_item"), shots=2, n_train=9, n_test=5
    )
    calibration, test = demo_queries(char_tokenizer(), preset)
    assert len(calibration) == 18 and len(test) == 10
    for task in preset.tasks:
        cal = {q.prompt.rsplit("Q: ", 1)[1] for q in calibration if q.task == task}
        held = {q.prompt.rsplit("Q: ", 1)[1] for q in test if q.task == task}
        assert len(cal) == 9 and len(held) == 5 and not cal & held


def _summary(time_vs_plain, plan_acc, checks=(20, 22)):
    return {
        "num_queries": 96,
        "calibration_queries": 320,
        "planned_policy": "planned",
        "planned_check_layers": list(checks),
        "policies": {
            "full": {"accuracy": 0.6875, "time_vs_plain": 1.01},
            "planned": {"accuracy": plan_acc, "time_vs_plain": time_vs_plain},
        },
    }


@pytest.mark.parametrize(
    "summary, line",
    [
        (
            _summary(0.88, 0.6875),
            "12% less time than the plain model at equal accuracy (68.8% vs 68.8%) on 96 "
            "held-out SST-2 queries",
        ),
        (
            _summary(0.9, 0.677),
            "10% less time than the plain model at lower accuracy (67.7% vs 68.8%) on 96 "
            "held-out SST-2 queries",
        ),
        (
            _summary(1.03, 0.6875),
            "3% more time than the plain model at equal accuracy (68.8% vs 68.8%) on 96 "
            "held-out SST-2 queries",
        ),
        (
            _summary(1.0, 0.6875, checks=()),
            "no plan passed the risk test on 320 calibration queries: the plain model runs "
            "(96 held-out SST-2 queries)",
        ),
    ],
)
def test_the_demo_verdict_is_computed_from_the_summary(summary, line):
    from adainfer.demo import verdict

    assert verdict(summary, "SST-2") == line


def test_generate_streams_one_prompt_and_prints_a_batch_as_json(model_dir, capsys):
    """The CLI gives what the library gives: greedy tokens equal with and without drafts."""
    from adainfer import generate, load

    model, tok = load(model_dir)
    expected = generate(model, tok, ["hello", "Q: a\nA:"], max_new_tokens=6, eos_token_id=[])
    args = ["generate", "--model", model_dir, "--max-new-tokens", "6", "--draft-layer", "2"]
    assert main(args + ["--prompt", "hello"]) == 0
    streamed = capsys.readouterr()
    assert streamed.out.startswith(tok.decode(expected.tokens[0], skip_special_tokens=True))
    assert "tokens in" in streamed.err
    assert main(args + ["--prompt", "hello", "--prompt", "Q: a\nA:", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["tokens"] == [t[: len(data["tokens"][i])] for i, t in enumerate(expected.tokens)]
    assert data["draft_layer"] == 2 and len(data["drafted"]) == 2
    assert main(["generate", "--model", model_dir]) == 2  # no prompt: one clear line
    assert "give a --prompt" in capsys.readouterr().err


def test_calibrate_exits_then_generate_lossy(model_dir, tmp_path, capsys):
    """calibrate-exits writes a policy that `generate --exits` uses; prompts may span lines."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["hello\nworld", {"prompt": "Q: a\nA:"}, "abc", "xyz"]))
    policy = tmp_path / "exits.json"
    calibrate = ["calibrate-exits", "--model", model_dir, "--prompts-file", str(prompts)]
    calibrate += ["--risk", "0.5", "--max-new-tokens", "4", "--batch-size", "2"]
    assert main(calibrate + ["--plan-batch-size", "2", "--out", str(policy)]) == 0
    said = capsys.readouterr().out
    assert "held-out tokens" in said and "read on the shortlist (the full LM head" in said
    written = json.loads(policy.read_text())
    assert written["format"] == "adainfer-token-exits/1" and written["costs"]["rows"] == 2
    args = ["generate", "--model", model_dir, "--max-new-tokens", "4", "--json"]
    assert main(args + ["--prompt", "hello", "--exits", str(policy)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["exit_layers"][0]) == len(data["tokens"][0]) == len(data["head_skips"][0])
    # the same policy drafting, lossless: the plain model's greedy tokens
    assert main(args + ["--prompt", "hello", "--draft-exits", str(policy)]) == 0
    drafted = json.loads(capsys.readouterr().out)
    assert main(args + ["--prompt", "hello"]) == 0
    assert drafted["tokens"] == json.loads(capsys.readouterr().out)["tokens"]
    hidden = tmp_path / "hidden.json"  # probes that also read the hidden state
    assert main(calibrate + ["--hidden-state", "--out", str(hidden)]) == 0
    assert json.loads(hidden.read_text())["params"]["hidden_state"] is True
    assert "held-out tokens" in capsys.readouterr().out
    assert main(args + ["--prompt", "hello", "--exits", str(hidden)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["exit_layers"][0]) == len(data["tokens"][0]) == 4
    assert main(calibrate[:3] + ["--out", str(policy)]) == 2  # no prompts: one clear line
    assert "--python-prompts" in capsys.readouterr().err
    strict = calibrate[:5] + ["--epsilon", "0.01", "--max-new-tokens", "4", "--batch-size", "2"]
    assert main(strict + ["--out", str(policy)]) == 0  # a few tokens certify nothing at 1%
    assert "needs at least 299 held-out tokens" in capsys.readouterr().out
    assert main(strict + ["--delta", "0", "--out", str(policy)]) == 2
    assert "delta is a probability" in capsys.readouterr().err
