"""An lm-evaluation-harness model backed by adainfer, registered as "adainfer" on import.

lm-eval (an optional dependency: `pip install 'adainfer[lmeval]'`) asks a model two things:

- `loglikelihood(context, continuation)`: every continuation token is scored by the exit
  layer's distribution of an early-exit prefill of all that precedes it (context plus the
  continuation's earlier tokens), each prefill stopping at its own layer. A one-token choice
  (" positive", " B") is thus scored exactly as `adainfer eval` scores it, and `is_greedy` is
  its whole-vocabulary top-1 test; an n-token continuation costs n prefills.
- `generate_until`: the generation decoder (`adainfer.generate`): lossless by default (plain
  decoding, or the drafts of a `draft_plan` file), or lossy (`mode=lossy` with an `exits`
  file: every token leaves at its own layer).

The same requests also run through the plain Hugging Face model, batch by batch and side by
side (`timing.interleaved`: one forward per input, as lm-eval's own `hf` model scores it;
`model.generate` for generation). `report()` gives, next to lm-eval's metrics: mean exit
layer, both FLOPs ratios (flops.py), time against the plain model as paired ratios, and how
many answers agree with it; `simple_evaluate` puts it in results["config"]["adainfer"]
(lm-eval's `get_model_info` hook).

Task configs for the local copies of SST-2, MMLU, CommonsenseQA and SQuAD ship in
`adainfer/lmeval_tasks`; `task_dir(data_dir)` gives a folder of them reading a data dir.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence
from importlib.resources import files
from pathlib import Path

# lm-eval imports its own models (hf, vllm, ...) only while its registry is empty; ours
# would make it non-empty, so register theirs first (lazily: no model module is imported)
import lm_eval.models  # noqa: F401
import numpy as np
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import Collator
from tqdm.auto import tqdm

from .arch import context_length
from .benchmarks import ENV_VAR
from .files import write_text_atomic
from .flops import paper_ratio, result_ratios
from .headroom import encode as encode_text
from .headroom import eos_ids, greedy_generate
from .models import cache_root, load
from .persist import check_compatible
from .pipeline import resolve_policy
from .policies import NeverExit
from .prefill import AdaptiveEngine
from .report import markdown_table
from .timing import interleaved, machine, synchronize, timed

MODES = ("lossless", "lossy")
DEFAULT_DATA_DIR = "../shared/data"  # the project's layout; the task configs name it so
REPORTS: list[dict] = []  # every report handed to lm-eval, for `adainfer lm-eval` to print


@register_model("adainfer")
class AdaInferLM(TemplateLM):
    """lm-eval model: per-input early exit for scoring, adainfer's decoder for generation.

    Parameters (lm-eval `--model_args key=value,...`)
    ----------
    pretrained : bundled alias (smollm2-135m, ...), local HF folder, .gguf file or hub id;
        from Python also a loaded model (with `tokenizer=`).
    policy : a saved exit policy file (`adainfer fit`), or `gap`; none: the plain model.
    mode : lossless (default) or lossy, for generation; lossy needs `exits`.
    exits : a `TokenExitPolicy` file (`adainfer calibrate-exits`), for mode=lossy.
    draft_plan : a draft plan file (`adainfer plan-drafts`, with or without `--exits`), for
        lossless generation.
    dtype, device : how to load `pretrained` (float32, bfloat16; cpu, cuda).
    batch_size : prompts per forward (lm-eval's `--batch_size`; "auto" is not supported).
    compare_plain : also run the plain model on every request, to report time and agreement.
    allow_other_model : accept a policy fitted for another model.
    max_gen_toks : new tokens per generation when the task does not say.
    """

    def __init__(
        self,
        pretrained="smollm2-135m",
        policy=None,
        mode: str = "lossless",
        exits=None,
        draft_plan=None,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str = 8,
        compare_plain: bool = True,
        allow_other_model: bool = False,
        max_gen_toks: int = 256,
        tokenizer=None,
        max_batch_size=None,  # lm-eval passes it along with batch_size; unused
    ):
        super().__init__()
        self.model, self.tokenizer = _model(pretrained, tokenizer, dtype, _device(device))
        self.policy = _policy(policy, self.model, allow_other_model)
        self.engine = AdaptiveEngine(self.model, self.tokenizer)
        self.mode, self.exits, self.plan = _decoding(mode, exits, draft_plan)
        self.batch_size = _batch_size(batch_size)
        self.compare_plain = _flag(compare_plain)
        self.max_gen_toks = int(max_gen_toks)
        self.settings = dict(
            model=getattr(self.model, "adainfer_id", type(self.model).__name__),
            dtype=str(self.model.dtype).removeprefix("torch."),
            policy=None if _none(policy) else str(policy),
            mode=self.mode,
            exits=None if exits is None else str(exits) if _is_path(exits) else "given",
            draft_plan=None if draft_plan is None else str(draft_plan),
            batch_size=self.batch_size,
        )
        self.scoring, self.generation = _Tally(), _Tally()
        self._tasks: list[str] = []

    # ------------------------------------------------------------ what lm-eval reads
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return context_length(self.model.config) or 2048

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs):
        # the engine tokenizes prompts with special tokens: so must scoring, to score the same
        # ids as `adainfer eval`; a chat-templated string already holds its BOS
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def get_model_info(self) -> dict:
        """lm-eval merges this into results["config"] once the requests have run."""
        report = self.report()
        REPORTS.append(report)
        return {"adainfer": report}

    # ------------------------------------------------------------ scoring
    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # TemplateLM turns requests into token ids and drops their task: keep it for the report
        self._tasks = [r.task_name or "?" for r in requests]
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        if not requests:
            return []
        tasks = self._tasks if len(self._tasks) == len(requests) else ["?"] * len(requests)
        inputs, keyed = {}, []  # model input (context + continuation[:-1]) -> _Input
        for (_, context, continuation), task in zip(requests, tasks):
            whole = (context + continuation)[-(self.max_length + 1) :]
            key = tuple(whole[:-1])
            found = inputs.setdefault(key, _Input())
            found.n, found.tasks = max(found.n, len(continuation)), found.tasks | {task}
            keyed.append((key, continuation))
        for key, continuation in keyed:  # the tokens asked of each scored position
            found = inputs[key]
            for j, token in enumerate(continuation, found.n - len(continuation)):
                found.wanted.setdefault(j, set()).add(token)
        batches = list(
            Collator(list(inputs), sort_fn=lambda k: -len(k)).get_batched(self.batch_size)
        )
        scores = self._score(batches, inputs, disable_tqdm)
        results = []
        for (strings, _, _), (key, continuation) in zip(requests, keyed):
            rows = scores[key][-len(continuation) :]  # the rows predicting the continuation
            logprob = sum(row.logprob[t] for row, t in zip(rows, continuation))
            greedy = all(row.top1 == t for row, t in zip(rows, continuation))
            results.append((float(logprob), bool(greedy)))
            self.cache_hook.add_partial("loglikelihood", strings, results[-1])
        return results

    def _score(self, batches, inputs, disable_tqdm) -> dict:
        """{input: [_Row per position it predicts]}: each input's last n next-token
        distributions, each from its own early-exit prefill; paired with the plain model."""

        def adainfer(i):
            return self._early_exit(batches[i], inputs)

        def plain(i):
            return self._plain_scores(batches[i], inputs)

        runners = {"adainfer": adainfer, **({"plain": plain} if self.compare_plain else {})}
        seconds, outputs = interleaved(
            runners, len(batches), warmup_batches=1, progress=_bar(disable_tqdm, "adainfer")
        )
        scores = {}
        for i, (found, unique) in enumerate(outputs["adainfer"]):
            plain_top1 = outputs["plain"][i] if self.compare_plain else None
            for key, rows in found.items():
                scores[key] = rows
                if plain_top1 is not None:
                    for row, top in zip(rows, plain_top1[key]):
                        row.agrees = row.top1 == top
            self.scoring.add(
                unique,
                [r.tasks for r in unique],
                seconds["adainfer"][0, i],
                seconds["plain"][0, i] if self.compare_plain else None,
            )
        return scores

    def _early_exit(self, batch, inputs) -> tuple[float, tuple[dict, list]]:
        """(seconds, ({input: rows}, the rows)): one early-exit prefill per position to score;
        inputs that share a prefix (choices of one question) share its prefill."""
        prefixes = {}  # row -> (input, position among its last n)
        for key in batch:
            n = inputs[key].n
            for j in range(n):
                prefixes.setdefault(key[: len(key) - n + 1 + j], []).append((key, j))
        order = sorted(prefixes, key=len, reverse=True)
        found = {key: [None] * inputs[key].n for key in batch}
        unique, seconds = [], 0.0
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            result = self.engine.run([list(p) for p in chunk], self.policy)
            seconds += result.wall_time_s
            flops = result_ratios(result, self.engine.parts, self.policy)
            logprobs = torch.log_softmax(result.logits, dim=-1)
            for r, prefix in enumerate(chunk):
                # only the tokens asked of this row: a whole-vocabulary row per prefill would
                # hold gigabytes over a large task
                asked = set().union(*(inputs[key].wanted.get(j, ()) for key, j in prefixes[prefix]))
                row = _Row(
                    logprob={t: float(logprobs[r, t]) for t in asked},
                    top1=int(result.top1[r]),
                    exit_layer=int(result.exit_layer[r]),
                    flops_ratio=float(flops["flops_ratio"][r]),
                    true_flops_ratio=float(flops["true_flops_ratio"][r]),
                    tasks=set().union(*(inputs[key].tasks for key, _ in prefixes[prefix])),
                )
                unique.append(row)
                for key, j in prefixes[prefix]:
                    found[key][j] = row
        return seconds, (found, unique)

    @torch.inference_mode()
    def _plain_scores(self, batch, inputs) -> tuple[float, dict]:
        """(seconds, {input: plain top-1 per scored position}): one plain forward per input,
        reading only the positions scored (lm-eval's `hf` model reads them all)."""
        enc = self.engine.encode([list(k) for k in batch])
        keep = max(inputs[k].n for k in batch)
        start = time.perf_counter()
        logits = self.model(**enc, use_cache=False, logits_to_keep=keep).logits
        synchronize()
        seconds = time.perf_counter() - start
        top1 = logits.argmax(-1).cpu()
        return seconds, {k: top1[i, keep - inputs[k].n :].tolist() for i, k in enumerate(batch)}

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise NotImplementedError(
            "adainfer scores a continuation one early-exit prefill per token, so a whole "
            "document's perplexity would take one prefill per token; use the plain `hf` model "
            "for perplexity tasks"
        )

    # ------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        if not requests:
            return []
        items = [(r.args[0], r.args[1], r.task_name or "?", i) for i, r in enumerate(requests)]
        collator = Collator(
            items,
            sort_fn=lambda x: -len(self.tok_encode(x[0])),
            group_fn=lambda x: x[1],
            group_by="gen_kwargs",
        )
        batches = list(collator.get_batched(self.batch_size))
        texts = [None] * len(items)

        def run(name):
            return lambda i: self._generate(name, batches[i])

        runners = {"adainfer": run("adainfer")}
        if self.compare_plain:
            runners["plain"] = run("plain")
        seconds, outputs = interleaved(
            runners, len(batches), warmup_batches=1, progress=_bar(disable_tqdm, "generate")
        )
        for i, batch in enumerate(batches):
            rows = outputs["adainfer"][i]
            plain = outputs["plain"][i] if self.compare_plain else None
            for j, (context, gen_kwargs, _, index) in enumerate(batch):
                rows[j].agrees = None if plain is None else rows[j].text == plain[j].text
                texts[index] = rows[j].text
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), rows[j].text)
            self.generation.add(
                rows,
                [{x[2]} for x in batch],
                seconds["adainfer"][0, i],
                None if plain is None else seconds["plain"][0, i],
            )
        return texts

    def _generate(self, name: str, batch) -> tuple[float, list]:
        """(seconds, rows) of one batch of requests sharing their generation settings."""
        prompts = [x[0] for x in batch]
        settings = dict(batch[0][1])
        until = settings.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(settings.pop("max_gen_toks", self.max_gen_toks))
        if settings.get("temperature") == 0:  # lm-eval's way of saying greedy
            settings.pop("temperature")
            settings["do_sample"] = False
        eos = eos_ids(self.model, tokenizer=self.tokenizer)
        if name == "plain":
            if settings.get("do_sample"):  # sampled text cannot be compared: no baseline
                return 0.0, None
            seconds, (_, tokens) = timed(
                greedy_generate, self.model, self.tokenizer, prompts, max_new, until
            )
            texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            return seconds, [_Generated(_cut(t, until), len(ids)) for t, ids in zip(texts, tokens)]
        seconds, result = timed(
            _adainfer_generate,
            self.model,
            self.tokenizer,
            prompts,
            plan=self.plan,
            exits=self.exits,
            stop_strings=until,
            max_new_tokens=max_new,
            eos_token_id=eos,
            **settings,
        )
        return seconds, self._generated(prompts, result, until)

    def _generated(self, prompts, result, until) -> list:
        """Per row: its text and the exit layer and paper FLOPs ratio of each new token."""
        L, parts = self.engine.num_layers, self.engine.parts
        lengths = encode_text(self.model, self.tokenizer, prompts)["attention_mask"].sum(-1)
        rows = []
        for i, (text, tokens) in enumerate(zip(result.texts, result.tokens)):
            layers = np.array(
                result.exit_layers[i] if result.exit_layers is not None else [L] * len(tokens)
            )
            seq = int(lengths[i]) + np.arange(len(layers))  # the length each token was read at
            paper = paper_ratio(layers, L, parts.config.hidden_size, _vocab(parts), seq)
            # the true ratio counts every head projection made; the decoder does not count its
            # drafts' and exit checks', so it is known only for plain decoding (the model's own)
            plain = self.exits is None and self.plan is None
            rows.append(
                _Generated(
                    _cut(text, until),
                    len(tokens),
                    exit_layers=layers,
                    flops_ratio=paper,
                    true_flops_ratio=np.ones(len(layers)) if plain else None,
                )
            )
        return rows

    # ------------------------------------------------------------ the report
    def report(self) -> dict:
        """Mean exit layer, FLOPs ratios, time and agreement against the plain model, per
        request type (and per task), with the settings and the machine they were measured on."""
        return {
            **self.settings,
            "num_layers": self.engine.num_layers,
            "loglikelihood": self.scoring.summary(self.engine.num_layers),
            "generate_until": self.generation.summary(self.engine.num_layers),
            "machine": machine(),
        }


# ---------------------------------------------------------------------------- one row's outcome
class _Input:
    """A model input to score: its last `n` positions, the tokens asked of each (`wanted`,
    by position among them) and the lm-eval tasks asking."""

    def __init__(self):
        self.n, self.tasks, self.wanted = 0, set(), {}


class _Row:
    """One early-exit prefill: its next-token log-probabilities and what it cost."""

    def __init__(self, logprob, top1, exit_layer, flops_ratio, true_flops_ratio, tasks):
        self.logprob, self.top1, self.exit_layer = logprob, top1, exit_layer
        self.flops_ratio, self.true_flops_ratio = flops_ratio, true_flops_ratio
        self.tasks = tasks  # the lm-eval tasks whose requests read this prefill
        self.agrees: bool | None = None  # top-1 equal to the plain model's at this position


class _Generated:
    """One generated row: its text, tokens and per-token exit layers and FLOPs ratios."""

    def __init__(self, text, tokens, exit_layers=None, flops_ratio=None, true_flops_ratio=None):
        self.text, self.tokens = text, tokens
        self.exit_layers, self.flops_ratio = exit_layers, flops_ratio
        self.true_flops_ratio = true_flops_ratio
        self.agrees: bool | None = None  # text equal to plain greedy decoding's


class _Tally:
    """What one request type cost, summed over lm-eval's calls: per row (a prefill, or a
    generated request), its tasks; per batch, adainfer's and the plain model's seconds."""

    def __init__(self):
        self.rows, self.tasks, self.seconds, self.pairs = [], [], [], []

    def add(self, rows, tasks, seconds, plain_seconds) -> None:
        """`plain_seconds`: the plain model's on the same batch (None: not run)."""
        self.rows += rows
        self.tasks += tasks
        self.seconds.append(float(seconds))
        if plain_seconds is not None:
            self.pairs.append((float(seconds), float(plain_seconds)))

    def summary(self, num_layers: int) -> dict | None:
        if not self.rows:
            return None
        out = {"rows": len(self.rows), **_costs(self.rows, num_layers)}
        out["wall_time_s"] = sum(self.seconds)
        if self.pairs:  # over the batches both ran, side by side
            ours, plain = np.array(self.pairs).T
            out.update(
                paired_batches=len(self.pairs),
                plain_wall_time_s=float(plain.sum()),
                time_vs_plain=float(ours.sum() / plain.sum()),
                paired_time_ratios=_quartiles(ours / plain),
            )
        out["per_task"] = {
            t: _costs([r for r, ts in zip(self.rows, self.tasks) if t in ts], num_layers)
            for t in sorted({t for ts in self.tasks for t in ts})
        }
        return out


def _costs(rows, num_layers: int) -> dict:
    """Means over rows (generated rows: over their tokens) and agreement with plain."""
    if isinstance(rows[0], _Row):
        layers = np.array([r.exit_layer for r in rows], float)
        paper = np.array([r.flops_ratio for r in rows])
        true = np.array([r.true_flops_ratio for r in rows])
    else:
        layers = np.concatenate([r.exit_layers for r in rows]).astype(float)
        paper = np.concatenate([r.flops_ratio for r in rows])
        known = all(r.true_flops_ratio is not None for r in rows)
        true = np.concatenate([r.true_flops_ratio for r in rows]) if known else None
    agree = [r.agrees for r in rows if r.agrees is not None]
    return {
        "count": len(rows),
        "tokens": None if isinstance(rows[0], _Row) else int(sum(r.tokens for r in rows)),
        "mean_exit_layer": float(layers.mean()) if len(layers) else None,
        "num_layers": num_layers,
        "flops_ratio": float(paper.mean()) if len(paper) else None,
        "true_flops_ratio": None if true is None or not len(true) else float(true.mean()),
        "agreement_with_plain": float(np.mean(agree)) if agree else None,
    }


def _quartiles(values) -> dict:
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {"n": len(values), "q1": float(q1), "median": float(median), "q3": float(q3)}


# ---------------------------------------------------------------------------- the report, printed
def report_table(report: dict) -> str:
    """The report as a markdown table: one line per request type and task."""
    header = [
        "requests",
        "task",
        "rows",
        "mean exit layer",
        "paper FLOPs",
        "true FLOPs",
        "time vs plain",
        "agrees with plain",
    ]
    lines = []
    for kind in ("loglikelihood", "generate_until"):
        s = report.get(kind)
        if not s:
            continue
        lines.append(_line(kind, "all", s, s.get("time_vs_plain")))
        lines += [_line(kind, t, c, None) for t, c in s["per_task"].items()]
    title = (
        f"adainfer: {report['model']} ({report['dtype']}), policy {report['policy'] or 'none'}, "
        f"generation {report['mode']}, batch size {report['batch_size']}; time measured side "
        "by side with the plain Hugging Face model on the same requests"
    )
    return title + "\n\n" + markdown_table(header, lines)


def _line(kind, task, s, time_ratio) -> list:
    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    layer = (
        "-" if s["mean_exit_layer"] is None else f"{s['mean_exit_layer']:.2f} / {s['num_layers']}"
    )
    return [
        kind,
        task,
        s["count"],
        layer,
        pct(s["flops_ratio"]),
        pct(s["true_flops_ratio"]),
        "-" if time_ratio is None else f"{time_ratio:.2f}x",
        pct(s["agreement_with_plain"]),
    ]


# ---------------------------------------------------------------------------- task configs
def task_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """A folder of the shipped task configs (lm-eval's `--include_path`) reading `data_dir`
    (default: $ADAINFER_DATA_DIR, else ../shared/data from the current directory). The
    configs name ../shared/data; a copy naming the data dir's absolute path is written under
    the adainfer cache, once per data dir, so it works from any directory."""
    root = Path(data_dir or os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data dir {root} does not exist: pass --data-dir or set {ENV_VAR} to a folder laid "
            "out like the project's shared/data (sst2/, mmlu/, commonsense_qa/, squad/)"
        )
    shipped = files("adainfer").joinpath("lmeval_tasks")
    key = hashlib.sha256(str(root).encode()).hexdigest()[:12]
    out = cache_root() / "lmeval_tasks" / key
    for config in shipped.iterdir():  # the task .yaml files and the templates they include
        text = config.read_text().replace(f"{DEFAULT_DATA_DIR}/", f"{root}/")
        target = out / config.name
        if not target.is_file() or target.read_text() != text:
            write_text_atomic(target, text)
    return out


# ---------------------------------------------------------------------------- arguments
def _none(value) -> bool:
    return value is None or (isinstance(value, str) and value.lower() in ("", "none", "plain"))


def _is_path(value) -> bool:
    return isinstance(value, (str, os.PathLike))


def _flag(value) -> bool:
    if isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    return bool(value)


def _model(pretrained, tokenizer, dtype, device):
    if isinstance(pretrained, (str, os.PathLike)):
        if tokenizer is not None:
            raise ValueError("tokenizer= goes with a loaded model; a name loads its own")
        return load(pretrained, dtype=dtype, device=device)
    if tokenizer is None:
        raise ValueError("a loaded model needs its tokenizer= too")
    return pretrained, tokenizer


def _policy(policy, model, allow_other_model):
    if _none(policy):
        return NeverExit()  # never checks: the engine runs the plain forward
    if isinstance(policy, (str, os.PathLike)):
        policy = resolve_policy(str(policy), ready=True)
    check_compatible(policy, model, _flag(allow_other_model))
    return policy


def _decoding(mode, exits, draft_plan):
    """(mode, TokenExitPolicy or None, a draft plan (either kind) or None) for generation."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "lossy":
        if exits is None or draft_plan is not None:
            raise ValueError(
                "mode=lossy needs exits=<file from `adainfer calibrate-exits`>, and "
                "no draft_plan (drafting is lossless)"
            )
        from .lossy import TokenExitPolicy

        if _is_path(exits):
            exits = TokenExitPolicy.load(exits)
        return mode, exits, None
    if exits is not None:
        raise ValueError("exits= makes generation lossy: pass mode=lossy to mean it")
    if draft_plan is None:
        return mode, None, None
    from .drafting import load_plan

    return mode, None, load_plan(draft_plan)


def _device(device: str | None) -> str:
    """lm-eval's command line asks for cuda:0 unless told otherwise; like its `hf` model, fall
    back to the CPU where there is no GPU."""
    if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
        return "cpu"
    return str(device)


def _batch_size(value) -> int:
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch_size must be a whole number, got {value!r}") from None
    if size < 1:
        raise ValueError(f"batch_size must be at least 1, got {size}")
    return size


# ---------------------------------------------------------------------------- small helpers
def _adainfer_generate(model, tokenizer, prompts, **kwargs):
    from .generation import generate

    return generate(model, tokenizer, prompts, **kwargs)


def _cut(text: str, until: Sequence[str]) -> str:
    """The text before the first stop string, as lm-eval's own models return it."""
    at = [text.find(s) for s in until if s in text]
    return text[: min(at)] if at else text


def _vocab(parts) -> int:
    return parts.head.weight.shape[0]


def _bar(disable: bool, desc: str):
    return lambda r: tqdm(r, desc=desc, unit="batch", disable=disable)
