"""The lm-evaluation-harness model: registered, scoring as `adainfer eval` does, generating
losslessly, reporting its costs, and the shipped task configs reading the local data."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from tokenizers import AddedToken

import adainfer
from adainfer.policies import GapThreshold, NeverExit
from conftest import SHARED_DATA, char_tokenizer, tiny_model

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from adainfer import lmeval  # noqa: E402
from adainfer.lmeval import AdaInferLM, task_dir  # noqa: E402

needs_data = pytest.mark.skipif(
    not (SHARED_DATA / "sst2" / "dev.tsv").is_file(), reason="needs the shared benchmark data"
)


def label_model():
    """A tiny Llama whose tokenizer has the SST-2 label words as single tokens, as a real
    model's has (the character tokenizer spells them out), and whose head reads them large
    enough that they are the top-1 of some prompts: accuracy is then not 0 by construction."""
    model, _ = tiny_model("llama")
    tok = char_tokenizer()
    tok.add_tokens([AddedToken(f" {w}", normalized=False) for w in ("negative", "positive")])
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        model.lm_head.weight[-2:] = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
        model.lm_head.weight[-2:] *= 0.2
    return model.eval(), tok


def requests(kind, args, task="t"):
    return [Instance(kind, {}, a, i, metadata=(task, i, 1)) for i, a in enumerate(args)]


def test_import_adainfer_leaves_lm_eval_alone():
    code = "import sys, adainfer, adainfer.cli; sys.exit('lm_eval' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_registered_next_to_lm_evals_own_models():
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("adainfer") is AdaInferLM
    assert "hf" in model_registry.keys()  # registering ours must not hide lm-eval's


def test_multi_token_continuations_score_each_token_at_its_position():
    model, tok = tiny_model("llama")
    lm = AdaInferLM(pretrained=model, tokenizer=tok, batch_size=3)  # no policy: the plain model
    pairs = [("Q: ab\nA:", " cd"), ("Q: ab\nA:", " x"), ("hello", " world")]
    got = lm.loglikelihood(requests("loglikelihood", pairs))
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        ids = tok(context + continuation, return_tensors="pt")["input_ids"]
        n = len(continuation)  # one token per character
        with torch.no_grad():
            logits = model(ids).logits[0, -n - 1 : -1].float().log_softmax(-1)
        target = ids[0, -n:]
        assert logprob == pytest.approx(float(logits.gather(1, target[:, None]).sum()), abs=1e-4)
        assert greedy == bool((logits.argmax(-1) == target).all())
    scoring = lm.report()["loglikelihood"]
    assert scoring["count"] == 3 + 0 + 6  # " x" reads the prefills of " cd"'s first two tokens
    assert scoring["mean_exit_layer"] == 4 and scoring["agreement_with_plain"] == 1.0
    assert scoring["paired_batches"] >= 1 and scoring["time_vs_plain"] > 0


def test_generation_is_the_plain_models_greedy_text():
    model, tok = tiny_model("gpt2")
    lm = AdaInferLM(pretrained=model, tokenizer=tok, batch_size=2)
    prompts = ["Q: abc\nA:", "Q: hello there\nA:", "x"]
    settings = {"until": ["\n", "zz"], "max_gen_toks": 6, "do_sample": False}
    texts = lm.generate_until(requests("generate_until", [(p, settings) for p in prompts]))
    from adainfer.headroom import greedy_generate

    _, plain = greedy_generate(model, tok, prompts, 6, ["\n", "zz"])
    expected = [lmeval._cut(t, ["\n", "zz"]) for t in tok.batch_decode(plain)]
    assert texts == expected
    gen = lm.report()["generate_until"]
    assert gen["agreement_with_plain"] == 1.0 and gen["mean_exit_layer"] == 4
    assert gen["flops_ratio"] == gen["true_flops_ratio"] == 1.0  # plain decoding: the model's own
    assert list(gen["per_task"]) == ["t"]


def test_lossy_generation_reports_each_tokens_exit():
    from test_lossy import forced

    model, tok = tiny_model("qwen2")
    exits = forced(model, 3)  # every generated token after the first leaves at layer 3
    lm = AdaInferLM(pretrained=model, tokenizer=tok, mode="lossy", exits=exits, batch_size=2)
    settings = {"until": ["zz"], "max_gen_toks": 5, "do_sample": False}
    args = [(p, settings) for p in ["Q: abc\nA:", "hello", "x y z"]]
    texts = lm.generate_until(requests("generate_until", args))
    expected = adainfer.generate(model, tok, [a[0] for a in args], exits=exits, max_new_tokens=5)
    assert texts == expected.texts
    gen = lm.report()["generate_until"]
    assert gen["mean_exit_layer"] == pytest.approx(expected.mean_exit_layer)
    assert gen["mean_exit_layer"] < 4 and gen["flops_ratio"] < 1
    assert gen["true_flops_ratio"] is None  # the lossy decoder does not count its checks
    assert gen["tokens"] == sum(len(t) for t in expected.tokens)


def test_bad_model_arguments_say_what_to_fix():
    model, tok = tiny_model("llama")
    for kwargs, message in [
        (dict(batch_size="auto"), "whole number"),
        (dict(mode="fast"), "lossless, lossy"),
        (dict(mode="lossy"), "needs exits"),
        (dict(exits="x.json"), "mode=lossy"),
        (dict(policy="svm"), "needs training first"),
    ]:
        with pytest.raises(ValueError, match=message):
            AdaInferLM(pretrained=model, tokenizer=tok, **kwargs)
    lm = AdaInferLM(pretrained=model, tokenizer=tok)
    with pytest.raises(NotImplementedError, match="one prefill per token"):
        lm.loglikelihood_rolling([])


def test_task_dir_points_the_configs_at_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("ADAINFER_CACHE", str(tmp_path / "cache"))
    folder = task_dir(tmp_path)
    sst2 = (folder / "adainfer_sst2.yaml").read_text()
    assert f"{tmp_path.resolve()}/sst2/dev.tsv" in sst2 and "../shared/data/" not in sst2
    assert (folder / "_adainfer_mmlu_template").is_file()  # the configs' include, copied too
    with pytest.raises(FileNotFoundError, match="data dir"):
        task_dir(tmp_path / "missing")


@needs_data
def test_lm_eval_accuracy_equals_adainfer_eval_on_the_same_queries():
    """The same 24 held-out SST-2 queries, zero-shot (the prompts are then the same): lm-eval's
    whole-vocabulary top-1 task agrees with `adainfer eval` query by query, its
    multiple-choice task with the engine's choice-restricted answer, and both on the exit
    layers and FLOPs the early exit cost."""
    from adainfer.evaluate import evaluate
    from adainfer.prefill import AdaptiveEngine
    from adainfer.tasks import held_out_indices, load_task, task_queries

    model, tok = label_model()
    policy = GapThreshold(0.002)  # stops rows at layers 1 to 4 of this random model
    sst2 = load_task("sst2", SHARED_DATA)
    _, queries = task_queries(tok, [sst2], shots=0, n_train=0, n_test=24)
    ids = held_out_indices(sst2, 24)  # the queries' rows of dev.tsv, in query order
    engine = AdaptiveEngine(model, tok)
    ours = evaluate(engine, queries, {"gap": policy}, batch_size=8, progress=False)["policies"]
    gold = np.array([q.gold for q in queries])
    answers = engine.run_all(
        [q.prompt for q in queries],
        policy,
        batch_size=8,
        choices=[q.choice_tokens for q in queries],
    )
    top1 = dict(zip(ids, (answers.top1 == gold).tolist()))
    choice = dict(zip(ids, (answers.choice_top1 == gold).tolist()))
    assert 0 < ours["gap"]["accuracy"] < 1 and 0 < np.mean(list(choice.values())) < 1

    lm = AdaInferLM(pretrained=model, tokenizer=tok, policy=policy, batch_size=8)
    tasks = ["adainfer_sst2_top1", "adainfer_sst2"]
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        samples={t: sorted(ids) for t in tasks},  # lm-eval 0.4.13 labels docs right if sorted
        task_manager=TaskManager(include_path=str(task_dir(SHARED_DATA)), include_defaults=False),
        bootstrap_iters=0,
    )
    for task, expected in zip(tasks, (top1, choice)):
        theirs = {s["doc_id"]: bool(s["acc"]) for s in results["samples"][task]}
        assert theirs == expected, task
    assert results["results"][tasks[0]]["acc,none"] == pytest.approx(ours["gap"]["accuracy"])
    report = results["config"]["adainfer"]["loglikelihood"]
    assert report["count"] == 24  # both tasks read the same 24 prefills
    assert 1 < report["mean_exit_layer"] < 4  # some rows left early
    for field in ("mean_exit_layer", "flops_ratio", "true_flops_ratio"):
        assert report[field] == pytest.approx(ours["gap"][field]), field


@needs_data
@pytest.mark.parametrize(
    "task, benchmark",
    [
        ("adainfer_sst2", "sst2"),
        ("adainfer_mmlu_abstract_algebra", "mmlu:abstract_algebra"),
        ("adainfer_mmlu_high_school_geography", "mmlu:high_school_geography"),
        ("adainfer_mmlu_philosophy", "mmlu:philosophy"),
        ("adainfer_mmlu_marketing", "mmlu:marketing"),
        ("adainfer_commonsense_qa", "commonsense_qa"),
        ("adainfer_squad", "squad"),
    ],
)
def test_shipped_configs_render_adainfer_evals_prompts(task, benchmark):
    """Every document of each shipped task reads as `adainfer eval`'s zero-shot prompt and
    gold answer of the same example (the loaders may drop repeated inputs: match by prompt)."""
    from adainfer.tasks import build_prompt, load_task

    manager = TaskManager(include_path=str(task_dir(SHARED_DATA)), include_defaults=False)
    loaded = manager.load([task])["tasks"][task]
    docs = list(loaded.eval_docs)
    gold = {build_prompt(e.input): e.output for e in load_task(benchmark, SHARED_DATA).examples}
    assert len(docs) >= len(gold)
    for doc in docs:
        prompt = loaded.doc_to_text(doc)
        target = loaded.doc_to_target(doc)
        choices = loaded.doc_to_choice(doc) if loaded.OUTPUT_TYPE == "multiple_choice" else None
        assert prompt in gold, prompt
        assert (choices[target] if choices else target) == gold[prompt]


@needs_data
@pytest.mark.parametrize("task", ["adainfer_sst2", "adainfer_sst2_top1"])
def test_few_shot_prompts_follow_the_papers_template(task):
    """Demonstrations read `Q: {x}\nA: {y}\n\n`, one space after `A:`, in both scorings."""
    manager = TaskManager(include_path=str(task_dir(SHARED_DATA)), include_defaults=False)
    loaded = manager.load([task])["tasks"][task]
    loaded.set_config(key="num_fewshot", value=3)
    loaded.set_fewshot_seed(seed=0)
    doc = next(iter(loaded.eval_docs))
    context = loaded.fewshot_context(doc, num_fewshot=3)
    shot = r"Q: [^\n]+\nA: (negative|positive)\n\n"
    assert re.fullmatch(f"({shot}){{3}}Q: [^\n]+\nA:", context), context


@needs_data
def test_command_line_runs_lm_eval_and_prints_the_report(saved_tiny, tmp_path, capsys):
    from adainfer.cli import main

    path = saved_tiny("llama")
    out = tmp_path / "results"
    args = ["--model_args", f"pretrained={path},policy=none", "--tasks", "adainfer_sst2"]
    args += ["--limit", "4", "--batch_size", "4", "--output_path", str(out)]
    assert main(["lm-eval", "--data-dir", str(SHARED_DATA), *args]) == 0
    printed = capsys.readouterr().out
    assert "adainfer_sst2" in printed and "acc" in printed  # lm-eval's own table
    assert "time vs plain" in printed and "| loglikelihood | all |" in printed
    saved = json.loads(next(out.rglob("results_*.json")).read_text())
    assert saved["config"]["adainfer"]["loglikelihood"]["mean_exit_layer"] == 4
    assert np.isfinite(saved["config"]["adainfer"]["loglikelihood"]["time_vs_plain"])


def test_command_line_help_shows_ours_then_lm_evals(capsys):
    from adainfer.cli import main

    with pytest.raises(SystemExit) as e:
        main(["lm-eval", "--help"])
    assert e.value.code == 0
    shown = capsys.readouterr()
    assert "--model adainfer" in shown.out and "usage: lm-eval run" in shown.out
    assert "not adding" not in shown.err  # no data dir needed to read the help


def test_never_exit_is_the_default_policy():
    model, tok = tiny_model("llama")
    assert isinstance(AdaInferLM(pretrained=model, tokenizer=tok, policy="none").policy, NeverExit)
