"""Planning lossless drafting: whether, how deep, how far and over which vocabulary to draft,
measured for one model, dtype, batch size and machine; plain decoding where nothing pays.

Self-speculative decoding (`adainfer.generation`) is only worth running where its rounds
produce tokens faster than plain decoding, and on a CPU that is a close call: a draft nearly
as deep as the model costs nearly a step, an exact LM head several decoder layers, and
verifying k tokens in one forward more than one step. `DraftPlanner.fit` measures both sides
on calibration prompts and picks the setting with the most tokens per unit time:

- acceptance, along the plain greedy path: every calibration prompt is generated plainly,
  then run teacher-forced once more while the hidden state at each candidate depth is kept
  for every generated token; each draft head (the exact head, or a shortlist of the N most
  frequent generated tokens, cross-fitted: a prompt is read with the shortlist built from
  the other fold's generations, plus its own prompt tokens) gives the draft's top-1 and its
  confidence at every token. Along the greedy path a draft at depth d computes exactly these
  states as long as every earlier draft of its round was accepted, so rounds are simulated
  from them: batched as the decoder runs them (a round drafts until no row is confident or
  k drafts are made; each row keeps its leading agreements plus the full model's token).
- costs, interleaved on the clock, each against a paired plain decode step on a calibration
  batch of the planned size: a draft step through d layers, each draft head (with its
  confidence read), and a verification of n tokens from layer d + 1 with the exact head; at
  the shallowest and deepest candidate depth, linear in d between them.

The estimate of a setting is plain decode steps over the simulated rounds' cost (in steps):
its tokens-per-second ratio against plain decoding, leaving the shared prefill out. The best
setting is the plan only if it beats plain by `margin`; otherwise the plan is plain decoding.
Pieces timed one by one can mislead (on a loaded machine, or where the prefill takes a large
share), so a drafting plan is then timed end to end against plain decoding on a few
calibration batches (`time_plan`), and kept only if it measured at least as fast.
Plans are JSON files (`save` / `load_plan`); `adainfer.generate(..., plan=)` applies one.

`ExitDraftPlanner` plans the other kind of drafts, those whose depth a token-exit policy picks
per token (`adainfer.lossy.ExitDraftDecoder`): the same question (does a round of them beat a
plain step, and how many drafts a round) answered from the policy's replay on traced tokens,
its measured step parts and a timed verification (see the class).
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from . import timing
from .arch import find_parts
from .files import write_json
from .generation import DraftHead, SelfSpeculativeDecoder
from .lens import LogitLens
from .lossy import (
    ExitCosts,
    ExitTrace,
    TokenExitPolicy,
    measure_exit_costs,
    trace_exits,
)
from .schema import Int, ListOf, Number, Optional, Record, check
from .stepper import encode, teacher_forced

log = logging.getLogger(__name__)

FORMAT, VERSION = "adainfer.draft-plan", 1
EXIT_FORMAT, EXIT_VERSION = "adainfer.exit-draft-plan", 1  # drafts leaving where a policy says
_LENS_ELEMENTS = 1 << 24  # logits per exact-head read in the trace (positions x vocabulary)


# --------------------------------------------------------------------------- the plan
@dataclass
class DraftPlan:
    """Decoder settings for one model (None draft_layer: plain decoding), with what they were
    planned for and the estimated tokens/s ratio against plain decoding."""

    draft_layer: int | None
    draft_tokens: int = 1
    draft_vocab: list[int] | None = None
    draft_prompt_tokens: bool = False
    draft_confidence: float = 0.0
    estimate: float = 1.0
    model: str | None = None
    num_layers: int | None = None
    vocab_size: int | None = None
    batch_size: int | None = None
    meta: dict = field(default_factory=dict)  # dtype, machine, the best drafting estimate

    @property
    def plain(self) -> bool:
        return self.draft_layer is None

    def decoder_settings(self, model) -> dict:
        """`SelfSpeculativeDecoder` keyword arguments; refuses a model this plan was not
        made for (another depth or vocabulary)."""
        parts = find_parts(model)
        found = (parts.num_layers, parts.head.weight.shape[0])
        if self.num_layers is not None and found != (self.num_layers, self.vocab_size):
            raise ValueError(
                f"this draft plan was made for {self.model} ({self.num_layers} layers, "
                f"vocabulary {self.vocab_size}); the model has {found[0]} layers and "
                f"vocabulary {found[1]}: plan drafting for this model"
            )
        if self.plain:
            return {"draft_layer": None}
        return {
            "draft_layer": self.draft_layer,
            "draft_tokens": self.draft_tokens,
            "draft_vocab": self.draft_vocab,
            "draft_prompt_tokens": self.draft_prompt_tokens,
            "draft_confidence": self.draft_confidence,
        }

    def decoder(self, model, tokenizer) -> SelfSpeculativeDecoder:
        """The decoder this plan sets up (plain for a batch a sliding window would block)."""
        settings = self.decoder_settings(model)
        return SelfSpeculativeDecoder(model, tokenizer, **settings, plain_if_blocked=True)

    def confirmed(self, measured: float) -> DraftPlan:
        """This plan with its measured tokens/s ratio against plain decoding (`time_plan`),
        or plain decoding for the same model where drafting measured slower."""
        meta = {**self.meta, "measured": measured}
        if measured >= 1:
            return replace(self, meta=meta)
        info = dict(model=self.model, num_layers=self.num_layers, vocab_size=self.vocab_size)
        meta["best_drafting"] = self.estimate
        return DraftPlan(draft_layer=None, batch_size=self.batch_size, meta=meta, **info)

    def describe(self) -> str:
        if self.plain:
            return f"plain decoding{_why_plain(self.meta, 'best drafting')}"
        vocab = "exact head" if self.draft_vocab is None else f"{len(self.draft_vocab)} tokens"
        vocab += " + prompt tokens" if self.draft_prompt_tokens else ""
        return (
            f"draft from layer {self.draft_layer}/{self.num_layers}, up to {self.draft_tokens} "
            f"tokens, {vocab}, confidence >= {self.draft_confidence:g}: "
            f"estimated {self.estimate:.2f}x plain{_measured(self.meta)}"
        )


def _why_plain(meta: dict, what: str) -> str:
    best = meta.get("best_drafting")
    return f" ({what} estimated {best:.2f}x{_measured(meta)})" if best else ""


def _measured(meta: dict) -> str:
    return "" if meta.get("measured") is None else f", measured {meta['measured']:.2f}x"


def save_plan(plan: DraftPlan, path, **extra) -> Path:
    """Write `plan` (and `extra` fields: estimates, costs) as JSON, atomically."""
    return write_json(path, {"format": FORMAT, "version": VERSION, "plan": asdict(plan), **extra})


def load_plan(path) -> DraftPlan | ExitDraftPlan:
    """Read a plan that `save_plan` or `ExitDraftPlanner.save` wrote; anything else is a
    clear error."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a draft plan: it is not JSON ({e})") from None
    if isinstance(data, dict) and data.get("format") == EXIT_FORMAT:
        return _load_exit_plan(path, data)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not an adainfer draft plan (no format {FORMAT!r}); make one with "
            "`adainfer plan-drafts`"
        )
    if data.get("version") != VERSION:
        raise ValueError(
            f"{path} is a draft plan of version {data.get('version')}; "
            f"this adainfer reads version {VERSION}"
        )
    try:
        check(data, _FILE, "the file")
        _check_plan(data["plan"])
    except ValueError as e:
        raise ValueError(
            f"{path} is a damaged draft plan: {e}; make one with `adainfer plan-drafts`"
        ) from None
    return DraftPlan(**data["plan"])


def _check_plan(plan: dict) -> None:
    """A draft layer inside the model, and draft tokens inside its vocabulary."""
    layers, vocab = plan.get("num_layers"), plan.get("vocab_size")
    if (layers is None) != (vocab is None):  # decoder_settings checks the model by both
        raise ValueError("num_layers and vocab_size must both be given or both be null")
    if plan.get("draft_layer") is not None and layers is not None and plan["draft_layer"] >= layers:
        raise ValueError(f"draft_layer {plan['draft_layer']} is not above a layer of {layers}")
    ids = plan.get("draft_vocab") or []
    if vocab is not None and ids and max(ids) >= vocab:
        raise ValueError(f"draft_vocab holds token {max(ids)}, outside a vocabulary of {vocab}")


_PLAN = Record(
    {
        "draft_layer": Optional(Int(1)),
        "draft_tokens": Int(1),
        "draft_vocab": Optional(ListOf(Int(0))),
        "draft_prompt_tokens": bool,
        "draft_confidence": Number(low=0, high=1),
        "estimate": Number(low=0),
        "model": Optional(str),
        "num_layers": Optional(Int(1)),
        "vocab_size": Optional(Int(1)),
        "batch_size": Optional(Int(1)),
        "meta": Record({}),  # what it was planned on: reported, never used
    },
    optional=tuple(f.name for f in fields(DraftPlan) if f.name != "draft_layer"),
    extra=False,
)
_FILE = Record({"format": str, "version": int, "plan": _PLAN})


# --------------------------------------------------------------------------- the trace
@dataclass
class DraftTrace:
    """One calibration prompt along its plain greedy path: the generated tokens, the hidden
    state at each candidate depth that predicted each of them, and the prompt's tokens."""

    tokens: np.ndarray  # [n] generated, the first from the prefill
    hidden: torch.Tensor  # [n, D, H]: column j is depth depths[j]
    prompt: np.ndarray  # the prompt's token ids (no padding)


@torch.inference_mode()
def trace_drafts(
    model,
    tokenizer,
    prompts: Sequence[str],
    depths: Sequence[int],
    *,
    batch_size: int = 1,
    max_new_tokens: int = 128,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> list[DraftTrace]:
    """Plain greedy generation of every prompt (in batches of `batch_size`), then the
    teacher-forced hidden states at `depths` for every generated token."""
    decoder = SelfSpeculativeDecoder(model, tokenizer)
    traces = []
    for s in progress(range(0, len(prompts), batch_size)):
        batch = list(prompts[s : s + batch_size])
        generated = decoder.generate(batch, max_new_tokens=max_new_tokens).tokens
        traces += _teacher_forced(decoder, batch, generated, depths)
    return traces


def _teacher_forced(decoder, prompts, generated, depths) -> list[DraftTrace]:
    """One forward over prompt + generated tokens, up to the deepest depth; keeps the hidden
    states at the positions that predicted each generated token."""
    inputs, width = teacher_forced(decoder.model, decoder.tokenizer, prompts, generated)
    P = inputs["input_ids"].shape[1] - (width - 1)  # the padded prompts' width
    ids, mask = inputs["input_ids"][:, :P].cpu(), inputs["attention_mask"][:, :P].cpu()
    kept = {}

    def client(seen):
        if seen.layer in depths:
            kept[seen.layer] = seen.hidden[:, -width:].detach()

    decoder.stepper.run(inputs, client, until=max(depths), use_cache=False)
    hidden = torch.stack([kept[d] for d in depths], 2)  # [B, width, D, H]
    return [
        DraftTrace(
            tokens=np.asarray(g, dtype=np.int64),
            hidden=hidden[b, : len(g)].clone(),
            prompt=ids[b][mask[b].bool()].numpy(),
        )
        for b, g in enumerate(generated)
    ]


def frequent_tokens(traces: Sequence[DraftTrace], size: int, vocab_size: int) -> list[int]:
    """The `size` tokens the traces generated most often (ties: the lower id), filled up with
    the lowest ids not yet in (byte-pair vocabularies number their merges by frequency)."""
    counts = np.bincount(
        np.concatenate([t.tokens for t in traces] or [np.zeros(0, np.int64)]),
        minlength=vocab_size,
    )[:vocab_size]
    seen = np.flatnonzero(counts)
    seen = seen[np.lexsort((seen, -counts[seen]))][:size].tolist()
    chosen = set(seen)
    rest = (i for i in range(vocab_size) if i not in chosen)
    return seen + [next(rest) for _ in range(min(size, vocab_size) - len(seen))]


@dataclass
class Reads:
    """Per calibration prompt, [n, D] arrays: does the draft at each depth agree with the
    generated token, and its confidence (top-1 probability over its candidates)."""

    agree: list[np.ndarray]
    conf: list[np.ndarray]


@torch.inference_mode()
def read_drafts(lens: LogitLens, traces: Sequence[DraftTrace], head_for) -> Reads:
    """Read every trace's hidden states with the draft head `head_for(i)` gives prompt i."""
    agree, conf = [], []
    for i, trace in enumerate(traces):
        head = head_for(i)
        extra, valid = _prompt_extra(head, trace.prompt)
        n, D, H = trace.hidden.shape
        flat = trace.hidden.reshape(n * D, H)
        width = (
            lens.vocab_size if head.exact else head.size + (0 if extra is None else extra.shape[1])
        )
        chunk = max(1, _LENS_ELEMENTS // max(1, width))
        best, top = [], []
        ids = head.ids(extra)  # [1, n]: the same candidates at every position
        for h in flat.split(chunk):
            logits = head.logits(h, extra, valid).float()
            pick = logits.argmax(-1)
            best.append(
                pick if ids is None else ids.expand(len(h), -1).gather(1, pick[:, None])[:, 0]
            )
            top.append(logits.softmax(-1).max(-1).values)
        best = torch.cat(best).view(n, D).cpu().numpy()
        agree.append(best == trace.tokens[:, None])
        conf.append(torch.cat(top).view(n, D).cpu().numpy())
    return Reads(agree, conf)


def _prompt_extra(head: DraftHead, prompt: np.ndarray):
    """([1, p], [1, p]) the prompt's tokens outside the head's fixed shortlist."""
    ids = torch.as_tensor(prompt, dtype=torch.long)[None]
    if head.fixed is not None:
        ids = ids.to(head.fixed.device)
    return head.extra_ids(ids, torch.ones_like(ids))


# --------------------------------------------------------------------------- the costs
class _Pieces:
    """The pieces of a decoding round on one prefilled batch, each callable on its own and
    leaving the KV cache as it found it: a plain step, a draft step through d layers, a draft
    head read, a verification of n tokens from layer d + 1."""

    def __init__(self, decoder: SelfSpeculativeDecoder, prompts: Sequence[str]):
        self.decoder, model = decoder, decoder.model
        enc = encode(model, decoder.tokenizer, prompts)
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]
        self.cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            out = model(**enc, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.prefilled = self.cache.get_seq_length()
        self.last, self.token = enc["position_ids"][:, -1:], out.logits[:, -1].argmax(-1)

    def inputs(self, n: int) -> dict:
        B = len(self.ids)
        return {
            "input_ids": self.token[:, None].expand(B, n).contiguous(),
            "attention_mask": torch.cat([self.mask, self.mask.new_ones(B, n)], 1),
            "position_ids": self.last + 1 + torch.arange(n, device=self.mask.device),
        }

    def _restore(self) -> None:
        for layer in self.cache.layers:
            if getattr(layer, "keys", None) is not None:
                layer.crop(-(layer.keys.shape[-2] - self.prefilled))

    def step(self):
        out = self.decoder.model(
            **self.inputs(1), cache=self.cache, use_cache=True, logits_to_keep=1
        )
        out.logits[:, -1].argmax(-1)
        self._restore()

    def draft(self, d: int):
        self.decoder.stepper.run(
            self.inputs(1), lambda seen: None, until=d, cache=self.cache, use_cache=True
        )
        self._restore()

    def head(self, head: DraftHead, hidden: torch.Tensor):
        extra, valid = head.extra_ids(self.ids, self.mask)
        logits = head.logits(hidden, extra, valid)
        logits.argmax(-1)
        logits.float().softmax(-1).max(-1)

    def verify(self, n: int, d: int, hidden: torch.Tensor):
        seen = {}

        def client(layer_out):
            seen["hidden"] = layer_out.hidden

        start = hidden[:, None].expand(-1, n, -1).contiguous()
        self.decoder.stepper.run(
            self.inputs(n),
            client,
            start=d + 1,
            start_hidden=start,
            cache=self.cache,
            use_cache=True,
        )
        self.decoder.lens(seen["hidden"]).argmax(-1)
        self._restore()


@torch.inference_mode()
def measure_costs(
    decoder: SelfSpeculativeDecoder,
    prompts: Sequence[str],
    depths: Sequence[int],
    verify_sizes: Sequence[int],
    heads: dict[str, DraftHead],
    *,
    repeats: int = 15,
    min_sample_s: float = 0.05,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict:
    """Each piece's time over a paired plain step's, interleaved with `timing.interleaved`
    (every sample runs all pieces back to back in a rotating order): the median of the
    per-sample ratios, with its quartiles. Drafts and verifications are timed at the
    shallowest and deepest of `depths`."""
    pieces = _Pieces(decoder, prompts)
    ends = sorted({min(depths), max(depths)})
    hidden = decoder.model.get_input_embeddings()(pieces.token)  # [B, H]: any state will do
    runs = {"step": pieces.step}
    runs |= {f"draft@{d}": (lambda d=d: pieces.draft(d)) for d in ends}
    runs |= {f"head:{k}": (lambda h=h: pieces.head(h, hidden)) for k, h in heads.items()}
    runs |= {
        f"verify{n}@{d}": (lambda n=n, d=d: pieces.verify(n, d, hidden))
        for n in verify_sizes
        for d in ends
    }
    for run in runs.values():  # warm-up
        run()
    seconds, _ = timing.interleaved(
        {name: _sampler(run, min_sample_s) for name, run in runs.items()},
        repeats,
        warmup_batches=0,
        progress=progress,
    )
    step = seconds["step"][0]
    ratios = {name: _quartiles(s[0] / step) for name, s in seconds.items() if name != "step"}
    return {
        "batch_size": len(prompts),
        "depths": ends,
        "verify_sizes": list(verify_sizes),
        "step_s": _quartiles(step),
        "steps": ratios,  # each piece in plain steps
        "repeats": repeats,
        "min_sample_s": min_sample_s,
    }


def _sampler(run: Callable, min_sample_s: float):
    """One sample: calls until `min_sample_s` has passed (at least one); the mean call. Bounded
    in time, unlike a call count fixed in a warm-up, when other jobs slow the machine down."""

    def sample(_: int):
        calls, total = 0, 0.0
        while calls == 0 or total < min_sample_s:
            total += timing.timed(run)[0]
            calls += 1
        return total / calls, None

    return sample


def _quartiles(values) -> dict:
    q1, med, q3 = np.percentile(np.asarray(values, dtype=float), [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3)}


class CostModel:
    """Round costs in plain steps from `measure_costs`'s medians: linear in the depth d
    between the two measured depths."""

    def __init__(self, costs: dict):
        self.costs, self.ends = costs, costs["depths"]
        self.steps = {name: r["median"] for name, r in costs["steps"].items()}

    def _at(self, name: str, d: int) -> float:
        lo, hi = self.ends[0], self.ends[-1]
        a, b = self.steps[f"{name}@{lo}"], self.steps[f"{name}@{hi}"]
        return a if hi == lo else a + (b - a) * (d - lo) / (hi - lo)

    def round(self, d: int, head: str, n: int) -> float:
        """n draft steps at depth d read by `head`, then the verification of n tokens."""
        return n * (self._at("draft", d) + self.steps[f"head:{head}"]) + self._at(f"verify{n}", d)


# --------------------------------------------------------------------------- the estimate
def simulate(
    agree: Sequence[np.ndarray],
    conf: Sequence[np.ndarray],
    *,
    draft_tokens: int,
    confidence: float,
    round_cost: Callable[[int], float],
    max_new_tokens: int,
) -> dict:
    """Rounds of one batch along its greedy paths (per row, [n] agreement and confidence of
    the draft at one depth), run as the decoder runs them: a round drafts until no row still
    going is confident (or `draft_tokens`, or the most tokens a row may still make), every
    row keeps its leading agreements plus the full model's token. Returns the plain decode
    steps the batch takes, the rounds' cost in steps, drafts made and accepted."""
    # a row makes at most max_new_tokens (a longer trace stands for a longer generation)
    lengths = np.minimum([len(a) for a in agree], max_new_tokens)
    width = lengths.max() + draft_tokens
    A = np.zeros((len(agree), width), dtype=bool)
    C = np.zeros((len(agree), width))
    for r, (a, c, n) in enumerate(zip(agree, conf, lengths)):
        A[r, :n], C[r, :n] = a[:n], c[:n]
    t = np.ones(len(agree), dtype=np.int64)  # the first token comes from the prefill
    cost = drafted = accepted = 0.0
    while (active := np.flatnonzero(t < lengths)).size:
        k = int(min(draft_tokens, (max_new_tokens - t[active]).max()))
        cols = t[active, None] + np.arange(k)
        a, c = A[active[:, None], cols], C[active[:, None], cols]
        unsure = (c < confidence).all(0)
        n = int(np.argmax(unsure)) + 1 if confidence > 0 and unsure.any() else k
        lead, kept = _verified(a[:, :n], lengths[active] - t[active])
        t[active] += kept
        cost += round_cost(n)
        drafted += n * len(active)
        accepted += lead.sum()
    return {
        "plain_steps": float(lengths.max() - 1),
        "cost": cost,
        "drafted": drafted,
        "accepted": float(accepted),
    }


def _verified(agree: np.ndarray, left: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(drafts accepted, tokens kept) per row of one verified round, as the decoder settles
    it: the leading agreements of its n drafts ([A, n]), plus the full model's token where
    it rejected one (n drafts verify n positions: all accepted, no token beyond), at most
    the `left` tokens the row may still make."""
    n = agree.shape[1]
    lead = np.where(agree.all(1), n, np.argmin(agree, 1))
    return lead, np.minimum(np.minimum(lead + 1, n), left)


def estimate_grid(
    reads: dict[str, Reads],
    costs: CostModel,
    depths: Sequence[int],
    *,
    draft_tokens: Sequence[int],
    confidences: Sequence[float],
    batch_size: int,
    max_new_tokens: int,
) -> list[dict]:
    """The estimated tokens/s ratio against plain decoding of every (depth, draft tokens,
    head, confidence): plain steps over the simulated rounds' cost, all batches summed."""
    rows = []
    for head, read in reads.items():
        for j, d in enumerate(depths):
            for k in draft_tokens:
                for thr in confidences:
                    total = {"plain_steps": 0.0, "cost": 0.0, "drafted": 0.0, "accepted": 0.0}
                    for s in range(0, len(read.agree), batch_size):
                        sim = simulate(
                            [a[:, j] for a in read.agree[s : s + batch_size]],
                            [c[:, j] for c in read.conf[s : s + batch_size]],
                            draft_tokens=k,
                            confidence=thr,
                            round_cost=lambda n, d=d, head=head: costs.round(d, head, n),
                            max_new_tokens=max_new_tokens,
                        )
                        total = {key: total[key] + sim[key] for key in total}
                    speedup = total["plain_steps"] / total["cost"] if total["cost"] else 0.0
                    rows.append(
                        {
                            "depth": d,
                            "draft_tokens": k,
                            "head": head,
                            "confidence": thr,
                            "speedup": speedup,
                            "acceptance": total["accepted"] / max(total["drafted"], 1),
                        }
                    )
    return sorted(rows, key=lambda r: -r["speedup"])


# --------------------------------------------------------------------------- the check
@torch.inference_mode()
def time_plan(
    plan: DraftPlan | ExitDraftPlan,
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    batch_size: int,
    max_new_tokens: int,
    batches: int = 3,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> dict:
    """The plan's decoder against plain decoding, end to end (the prefill included, which the
    estimates leave out, and every cost as it is in place rather than piece by piece): the
    first `batches` batches of `prompts` at `batch_size`, each generated twice by both, in
    alternating order. Returns the median and quartiles of the per-pair ratios of plain
    seconds over the plan's (its tokens/s ratio: a lossless plan makes the same tokens) and
    the share of rows whose tokens equal plain decoding's (1.0 unless drafting is broken)."""
    decoders = {"plain": SelfSpeculativeDecoder(model, tokenizer)}
    decoders["plan"] = plan.decoder(model, tokenizer)
    groups = [
        [prompts[(i * batch_size + r) % len(prompts)] for r in range(batch_size)]
        for i in range(batches)
    ]

    def runner(decoder):
        def run(i: int):
            result = decoder.generate(groups[i], max_new_tokens=max_new_tokens)
            return result.wall_time_s, result.tokens

        return run

    for decoder in decoders.values():  # warm-up: the drafting path's first call
        decoder.generate(groups[0], max_new_tokens=2)
    runners = {name: runner(d) for name, d in decoders.items()}
    seconds, outputs = timing.interleaved(
        runners, batches, repeats=2, warmup_batches=0, progress=progress
    )
    same = [a == b for x, y in zip(outputs["plain"], outputs["plan"]) for a, b in zip(x, y)]
    return {
        **_quartiles(seconds["plain"] / seconds["plan"]),
        "pairs": 2 * batches,
        "batch_size": batch_size,
        "identical": float(np.mean(same)),
    }


class _Planner:
    """What both planners share: the fitted plan, and its check on the clock."""

    def _fitted(self):
        if not hasattr(self, "plan_"):
            raise ValueError(f"this {type(self).__name__} is not fitted: call fit() first")
        return self.plan_

    def _timed_prompts(self, prompts: Sequence[str]) -> Sequence[str]:
        """Which of the calibration prompts `confirm` times on (all of them here)."""
        return prompts

    def confirm(self, model, tokenizer, prompts: Sequence[str], *, progress=None):
        """Time the fitted plan against plain decoding (`time_plan`, `confirm_batches`
        batches of the calibration `prompts` given to fit, none when 0) where it drafts;
        drafting stays only if it measured at least as fast as plain decoding.
        `confirmation_` keeps the timing (None where nothing was timed); `fit` ends with
        this. A plan already timed is kept."""
        plan = self._fitted()
        if "measured" in plan.meta:
            return self
        self.confirmation_ = None
        if plan.plain or not self.confirm_batches:
            return self
        timed, batch = self._timed_prompts(prompts), plan.batch_size or 1
        if len(set(timed)) < batch * self.confirm_batches:
            warnings.warn(
                f"the check on the clock times {self.confirm_batches} batches of {batch} but has "
                f"only {len(set(timed))} distinct calibration prompts to time on, so it repeats "
                "them and may keep a plan that pays on these prompts only: give at least "
                f"{batch * self.confirm_batches} (or lower confirm_batches)",
                stacklevel=2,
            )
        self.confirmation_ = time_plan(
            plan,
            model,
            tokenizer,
            timed,
            batch_size=batch,
            max_new_tokens=self.max_new_tokens,
            batches=self.confirm_batches,
            progress=progress,
        )
        self.plan_ = plan.confirmed(self.confirmation_["median"])
        log.info("confirmed on the clock: %s", self.plan_.describe())
        return self


# --------------------------------------------------------------------------- the planner
class DraftPlanner(_Planner):
    """Plans lossless drafting for one model, dtype, batch size and machine (scikit-learn
    style: `fit` measures and leaves its results in attributes ending in `_`; the parameters
    are never rewritten).

    Parameters
    ----------
    depths : candidate draft depths; None: the last 30% of the layers (below it drafts agree
        too rarely on the models measured in results/generation/headroom.md).
    draft_tokens : candidate most drafts per round.
    vocab_sizes : candidate draft heads: None is the exact LM head, N a shortlist of the N
        most frequent generated tokens (plus each row's prompt tokens with `prompt_tokens`).
    confidences : candidate confidence thresholds for stopping a round's drafting (0: never).
    margin : drafting is planned only if estimated at least this much faster than plain.
    max_new_tokens : tokens generated per calibration prompt.
    repeats : interleaved timing samples of the costs.
    folds : shortlists are cross-fitted over this many folds of the calibration prompts.
    confirm_batches : calibration batches on which a drafting plan is timed end to end
        against plain decoding before it is kept (`confirm`; 0: trust the estimate).

    Fitted attributes: `plan_` (a `DraftPlan`; `plan_.plain` when nothing pays), `depths_`,
    `vocabs_` ({head: shortlist ids}), `costs_` (`measure_costs`), `acceptance_` ({head: by
    depth}), `estimates_` (every setting, best first), `tokens_` (calibration tokens),
    `confirmation_` (`time_plan`'s, or None).
    """

    def __init__(
        self,
        depths: Sequence[int] | None = None,
        draft_tokens: Sequence[int] = (1, 2, 3, 4),
        vocab_sizes: Sequence[int | None] = (None, 1024, 4096),
        confidences: Sequence[float] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95),
        prompt_tokens: bool = True,
        margin: float = 1.03,
        max_new_tokens: int = 128,
        repeats: int = 15,
        folds: int = 2,
        confirm_batches: int = 3,
    ):
        self.depths = depths
        self.draft_tokens = draft_tokens
        self.vocab_sizes = vocab_sizes
        self.confidences = confidences
        self.prompt_tokens = prompt_tokens
        self.margin = margin
        self.max_new_tokens = max_new_tokens
        self.repeats = repeats
        self.folds = folds
        self.confirm_batches = confirm_batches

    def get_params(self) -> dict:
        names = (
            "depths",
            "draft_tokens",
            "vocab_sizes",
            "confidences",
            "prompt_tokens",
            "margin",
            "max_new_tokens",
            "repeats",
            "folds",
            "confirm_batches",
        )
        return {n: getattr(self, n) for n in names}

    # ------------------------------------------------------------- fit
    def fit(
        self,
        model,
        tokenizer,
        prompts: Sequence[str],
        *,
        batch_size: int = 1,
        progress: Callable[[Iterable], Iterable] = lambda it: it,
    ) -> DraftPlanner:
        """Measure acceptance on `prompts` (in batches of `batch_size`, the size the plan is
        for) and the costs on their first batch, plan (see the module doc), and time a
        drafting plan against plain decoding on the first batches (`confirm`)."""
        if isinstance(prompts, str) or len(prompts) < max(2, batch_size):
            raise ValueError(f"give at least {max(2, batch_size)} calibration prompts")
        decoder = SelfSpeculativeDecoder(model, tokenizer)
        parts, depths = decoder.parts, self._depths(decoder.parts.num_layers)
        traces = trace_drafts(
            model,
            tokenizer,
            prompts,
            depths,
            batch_size=batch_size,
            max_new_tokens=self.max_new_tokens,
            progress=progress,
        )
        vocab_size = min(decoder.lens.vocab_size, len(tokenizer))
        reads, vocabs = self._reads(decoder.lens, traces, vocab_size)
        heads = {
            key: DraftHead(decoder.lens, ids, ids is not None and self.prompt_tokens)
            for key, ids in vocabs.items()
        }
        costs = measure_costs(
            decoder,
            prompts[:batch_size],
            depths,
            range(1, max(self.draft_tokens) + 1),
            heads,
            repeats=self.repeats,
            progress=progress,
        )
        self.tokens_ = int(sum(len(t.tokens) for t in traces))
        meta = {
            "model": _model_name(model),
            "num_layers": parts.num_layers,
            "vocab_size": decoder.lens.vocab_size,
            "batch_size": batch_size,
            "dtype": str(model.dtype).removeprefix("torch."),
            "machine": timing.machine(),
        }
        self.fit_measured(reads, costs, depths, meta, vocabs)
        return self.confirm(model, tokenizer, prompts, progress=progress)

    def fit_measured(
        self, reads: dict[str, Reads], costs: dict, depths, meta: dict, vocabs=None
    ) -> DraftPlanner:
        """Plan from acceptance `reads` ({head: Reads}, per calibration prompt in batch
        order) and `costs` (`measure_costs`'s dict) measured elsewhere: what `fit` does after
        measuring, and how tests plan without a clock. `meta` names the model (num_layers,
        vocab_size, batch_size at least); `vocabs` {head: shortlist ids} (None for "exact")."""
        if vocabs is not None:
            self.vocabs_ = dict(vocabs)
        self.depths_ = list(depths)
        self.costs_ = costs
        self.acceptance_ = {
            head: np.concatenate(r.agree).mean(0).tolist() for head, r in reads.items()
        }
        self.estimates_ = estimate_grid(
            reads,
            CostModel(costs),
            self.depths_,
            draft_tokens=self.draft_tokens,
            confidences=self.confidences,
            batch_size=meta["batch_size"],
            max_new_tokens=self.max_new_tokens,
        )
        self.plan_ = self._choose(self.estimates_, meta)
        log.info("draft plan: %s", self.plan_.describe())
        return self

    def _choose(self, estimates: list[dict], meta: dict) -> DraftPlan:
        keep = ("model", "num_layers", "vocab_size", "batch_size")
        info = {k: meta.get(k) for k in keep}
        extra = {k: v for k, v in meta.items() if k not in keep}
        best = estimates[0] if estimates else None
        if best is None or best["speedup"] < self.margin:
            extra["best_drafting"] = None if best is None else best["speedup"]
            return DraftPlan(draft_layer=None, meta=extra, **info)
        vocab = getattr(self, "vocabs_", {}).get(best["head"])
        if best["head"] != "exact" and vocab is None:
            raise ValueError(f"no shortlist ids for head {best['head']!r}")
        return DraftPlan(
            draft_layer=best["depth"],
            draft_tokens=best["draft_tokens"],
            draft_vocab=vocab,
            draft_prompt_tokens=vocab is not None and self.prompt_tokens,
            draft_confidence=best["confidence"],
            estimate=best["speedup"],
            meta=extra,
            **info,
        )

    def _depths(self, num_layers: int) -> list[int]:
        depths = self.depths
        if depths is None:
            depths = range(max(1, int(np.ceil(0.7 * num_layers))), num_layers)
        depths = sorted({int(d) for d in depths})
        if not depths or not all(1 <= d < num_layers for d in depths):
            raise ValueError(f"depths must lie in 1..{num_layers - 1}, got {self.depths}")
        return depths

    def _reads(self, lens: LogitLens, traces, vocab_size: int):
        """({head: Reads}, {head: shortlist ids or None}): the exact head, and each shortlist
        cross-fitted (a prompt is read with the shortlist of the other folds' generations);
        the shortlist kept for the plan is built from every prompt."""
        reads, vocabs = {}, {}
        fold = np.arange(len(traces)) % max(1, min(self.folds, len(traces)))
        for size in self.vocab_sizes:
            if size is None:
                reads["exact"] = read_drafts(lens, traces, lambda i: DraftHead(lens))
                vocabs["exact"] = None
                continue
            key = str(int(size))
            by_fold = {
                f: DraftHead(
                    lens,
                    frequent_tokens(
                        [t for t, g in zip(traces, fold) if g != f or fold.max() == 0],
                        int(size),
                        vocab_size,
                    ),
                    self.prompt_tokens,
                )
                for f in np.unique(fold)
            }
            reads[key] = read_drafts(lens, traces, lambda i, heads=by_fold: heads[fold[i]])
            vocabs[key] = frequent_tokens(traces, int(size), vocab_size)
        return reads, vocabs

    # ------------------------------------------------------------- use
    def decoder_settings(self, model) -> dict:
        return self._fitted().decoder_settings(model)

    def decoder(self, model, tokenizer) -> SelfSpeculativeDecoder:
        return self._fitted().decoder(model, tokenizer)

    def save(self, path) -> Path:
        """The plan with its estimates (the best 20) and measured costs, as JSON."""
        return save_plan(
            self._fitted(),
            path,
            params=self.get_params(),
            costs=self.costs_,
            depths=self.depths_,
            acceptance=self.acceptance_,
            estimates=self.estimates_[:20],
            confirmation=getattr(self, "confirmation_", None),
        )


def _model_name(model) -> str | None:
    return getattr(model, "adainfer_id", None) or getattr(model.config, "_name_or_path", None)


# --------------------------------------------------------------------------- exit drafts
@dataclass
class ExitDraftPlan:
    """Drafts that leave where a token-exit policy says, up to `draft_tokens` a round, or
    plain decoding (None) where that was estimated not to pay; `estimate` is the tokens/s
    ratio against plain decoding at `batch_size`."""

    policy: TokenExitPolicy
    draft_tokens: int | None
    estimate: float = 1.0
    batch_size: int | None = None
    meta: dict = field(default_factory=dict)

    @property
    def plain(self) -> bool:
        return self.draft_tokens is None

    def decoder(self, model, tokenizer) -> SelfSpeculativeDecoder:
        if self.plain:
            self.policy.check_model(model)  # a plan for another model is refused either way
            return SelfSpeculativeDecoder(model, tokenizer)
        return self.policy.draft_decoder(model, tokenizer, self.draft_tokens, plain_if_blocked=True)

    def confirmed(self, measured: float) -> ExitDraftPlan:
        """This plan with its measured tokens/s ratio against plain decoding (`time_plan`),
        or plain decoding where the drafts measured slower."""
        meta = {**self.meta, "measured": measured}
        if measured >= 1:
            return replace(self, meta=meta)
        meta["best_drafting"] = self.estimate
        return replace(self, draft_tokens=None, estimate=1.0, meta=meta)

    def describe(self) -> str:
        if self.plain:
            return f"plain decoding{_why_plain(self.meta, 'exit drafts')}"
        return (
            f"exit drafts at layers {self.policy.layers_} (threshold "
            f"{self.policy.threshold_:.3g}), up to {self.draft_tokens} tokens a round: "
            f"estimated {self.estimate:.2f}x plain{_measured(self.meta)}"
        )


def simulate_exit_drafts(
    agree: Sequence[np.ndarray],
    depth: Sequence[np.ndarray],
    step_cost: Callable[[np.ndarray], float],
    verify_cost: Callable[[int], float],
    *,
    num_layers: int,
    draft_tokens: int,
    max_new_tokens: int,
) -> dict:
    """Rounds of one batch of exit drafts along its greedy paths (per row, [n] whether the
    token drafted at each position is the full model's and the layer it left at), run as
    `ExitDraftDecoder` runs them: each draft step costs `step_cost(token indexes [A, 2] of
    the rows' drafts: row, position)`, a round stops after a step in which no row left before
    the last layer (or after `draft_tokens`), then `verify_cost(n)`; every row keeps its
    leading agreements plus the full model's token where it rejected one (n drafts verify n
    positions: all accepted, no token beyond). Returns plain decode steps, the rounds' cost in
    steps, drafts made and accepted, and the drafts' summed depth. Teacher-forced reads stand
    in for the drafts' own states (a round's later drafts attend to propagated keys and
    values), so acceptance is as the calibration saw it, not as drafting sees it."""
    # a row makes at most max_new_tokens (a longer trace stands for a longer generation)
    lengths = np.minimum([len(a) for a in agree], max_new_tokens)
    width = lengths.max() + draft_tokens
    A = np.zeros((len(agree), width), dtype=bool)
    D = np.full((len(agree), width), num_layers)  # past its end a row drafts at full depth
    for r, (a, d) in enumerate(zip(agree, depth)):
        A[r, : len(a)], D[r, : len(d)] = a, d
    t = np.ones(len(agree), dtype=np.int64)  # the first token comes from the prefill
    out = {"plain_steps": float(lengths.max() - 1), "cost": 0.0, "drafted": 0.0}
    out |= {"accepted": 0.0, "depth": 0.0}
    while (active := np.flatnonzero(t < lengths)).size:
        k = int(min(draft_tokens, (max_new_tokens - t[active]).max()))
        n = 0
        while n < k:
            cols = t[active] + n
            out["cost"] += step_cost(np.stack([active, cols], 1))
            out["depth"] += D[active, cols].sum()
            n += 1
            if not (D[active, cols] < num_layers).any():
                break
        a = A[active[:, None], t[active, None] + np.arange(n)]
        lead, kept = _verified(a, lengths[active] - t[active])
        t[active] += kept
        out["cost"] += verify_cost(n)
        out["drafted"] += n * len(active)
        out["accepted"] += float(lead.sum())
    return out


class ExitDraftPlanner(_Planner):
    """Plans lossless drafting by a fitted `TokenExitPolicy` (a meta-estimator: it wraps the
    policy and never changes it): how many exit drafts a round may make, or plain decoding
    where none pays, measured for one model, dtype, batch size and machine.

    `fit` traces the calibration prompts along their plain greedy paths and replays the
    policy on every generated token (where it leaves, whether its token is the full
    model's; only the odd prompts, which a policy calibrated on the same prompts set its
    threshold on but never trained its probes or shortlist on), takes the cost of each draft
    step from `ExitCosts` measured at the batch size (the layers run, checks, propagation,
    the head where no check passed) and times verifying n tokens from the policy's first
    check layer on against a plain step (`measure_costs`). Rounds are simulated as
    `simulate_exit_drafts`; the estimate is plain steps over their cost.

    Parameters: `policy`, a fitted TokenExitPolicy; `draft_tokens`, candidate most drafts a
    round; `margin`, drafting is planned only if estimated at least this much faster than
    plain; `max_new_tokens` per calibration prompt; `repeats` timing samples;
    `confirm_batches`, batches of the odd prompts on which a drafting plan is timed end to
    end against plain decoding before it is kept (`confirm`; 0: trust the estimate).
    Fitted: `plan_` (an `ExitDraftPlan`), `estimates_` (per candidate, best first),
    `costs_` ({"exit": ExitCosts fields, "verify": measure_costs' dict}), `confirmation_`."""

    def __init__(
        self,
        policy: TokenExitPolicy,
        draft_tokens: Sequence[int] = (1, 2, 3, 4),
        margin: float = 1.03,
        max_new_tokens: int = 64,
        repeats: int = 15,
        confirm_batches: int = 3,
    ):
        self.policy = policy
        self.draft_tokens = draft_tokens
        self.margin = margin
        self.max_new_tokens = max_new_tokens
        self.repeats = repeats
        self.confirm_batches = confirm_batches

    def get_params(self) -> dict:
        """The parameters (the wrapped policy aside: it is saved with the plan)."""
        names = ("draft_tokens", "margin", "max_new_tokens", "repeats", "confirm_batches")
        return {n: getattr(self, n) for n in names}

    def _timed_prompts(self, prompts: Sequence[str]) -> Sequence[str]:
        """The odd prompts: those the plan was simulated on (see `fit_measured`)."""
        return prompts[1::2]

    def fit(
        self,
        model,
        tokenizer,
        prompts: Sequence[str],
        *,
        batch_size: int = 1,
        progress: Callable[[Iterable], Iterable] = lambda it: it,
    ) -> ExitDraftPlanner:
        if isinstance(prompts, str) or len(prompts) < 2 * batch_size:
            raise ValueError(  # the odd half is simulated, in batches of batch_size
                f"give at least {2 * batch_size} calibration prompts (2 x the batch size)"
            )
        self.policy.check_model(model)
        trace = trace_exits(
            model,
            tokenizer,
            prompts,
            vocab=self.policy.vocab_,
            max_new_tokens=self.max_new_tokens,
            hidden_layers=self.policy.hidden_layers_,
            progress=progress,
        )
        rows = [prompts[i % len(prompts)] for i in range(batch_size)]
        exit_costs = measure_exit_costs(model, tokenizer, rows, self.policy.vocab_)
        verify = self.measure_verification(model, tokenizer, rows, progress=progress)
        meta = {
            "batch_size": batch_size,
            "dtype": str(model.dtype).removeprefix("torch."),
            "machine": timing.machine(),
        }
        self.fit_measured(trace, exit_costs, verify, meta)
        return self.confirm(model, tokenizer, prompts, progress=progress)

    def measure_verification(self, model, tokenizer, rows, **kw) -> dict | None:
        """`measure_costs` of verifying 1..max(draft_tokens) tokens of `rows` from the
        policy's first check layer on (None where it has none: nothing is ever drafted)."""
        if not self.policy.layers_:
            return None
        decoder = SelfSpeculativeDecoder(model, tokenizer)
        sizes = range(1, max(self.draft_tokens) + 1)
        first = [min(self.policy.layers_)]
        return measure_costs(decoder, rows, first, sizes, {}, repeats=self.repeats, **kw)

    def fit_measured(
        self, trace: ExitTrace, exit_costs: ExitCosts, verify: dict | None, meta: dict
    ) -> ExitDraftPlanner:
        """Plan from a trace (`trace_exits` with the policy's vocabulary), the draft steps'
        costs and the verification costs (`measure_costs`, None where the policy has no
        check layer) measured elsewhere; `meta` holds batch_size at least."""
        policy, L = self.policy, trace.num_layers
        if L != policy.num_layers_ or not np.array_equal(trace.vocab, policy.vocab_):
            raise ValueError(
                "the trace was not read with this policy's model and shortlist: trace it with "
                "trace_exits(..., vocab=policy.vocab_) on the policy's model"
            )
        if min(self.draft_tokens, default=0) < 1:
            raise ValueError(f"draft_tokens must all be at least 1, got {self.draft_tokens}")
        self.costs_ = {"exit": asdict(exit_costs), "verify": verify}
        if not policy.layers_:  # no token may leave early: nothing to draft
            self.estimates_ = []
            self.plan_ = self._choose(meta)
            return self
        exits = policy.replay(trace)
        held = trace.prompt % 2 == 1
        if not held.any():
            raise ValueError("planning needs tokens from at least 2 prompts")
        prompts = np.unique(trace.prompt[held])
        # a row generates at most max_new_tokens: a longer trace stands for a longer generation
        rows = [np.flatnonzero(trace.prompt == p)[: self.max_new_tokens] for p in prompts]
        d = min(policy.layers_)
        sizes = range(1, max(self.draft_tokens) + 1)
        verify_steps = {n: verify["steps"][f"verify{n}@{d}"]["median"] for n in sizes}
        self.estimates_ = [
            _estimate_exit_drafts(
                exits,
                rows,
                exit_costs,
                verify_steps,
                policy.layers_,
                num_layers=L,
                batch_size=meta["batch_size"],
                draft_tokens=k,
                max_new_tokens=self.max_new_tokens,
            )
            for k in self.draft_tokens
        ]
        self.estimates_.sort(key=lambda r: -r["speedup"])
        self.plan_ = self._choose(meta)
        log.info("exit-draft plan: %s", self.plan_.describe())
        return self

    def _choose(self, meta: dict) -> ExitDraftPlan:
        best = self.estimates_[0] if self.estimates_ else None
        extra = {k: v for k, v in meta.items() if k != "batch_size"}
        if best is None or best["speedup"] < self.margin:
            extra["best_drafting"] = None if best is None else best["speedup"]
            return ExitDraftPlan(self.policy, None, batch_size=meta["batch_size"], meta=extra)
        return ExitDraftPlan(
            self.policy,
            best["draft_tokens"],
            estimate=best["speedup"],
            batch_size=meta["batch_size"],
            meta=extra,
        )

    def decoder(self, model, tokenizer) -> SelfSpeculativeDecoder:
        return self._fitted().decoder(model, tokenizer)

    def save(self, path) -> Path:
        """The plan, its policy, estimates and measured costs, as JSON, atomically."""
        plan = self._fitted()
        return write_json(
            path,
            {
                "format": EXIT_FORMAT,
                "version": EXIT_VERSION,
                "plan": {
                    "draft_tokens": plan.draft_tokens,
                    "estimate": plan.estimate,
                    "batch_size": plan.batch_size,
                    "meta": plan.meta,
                    "policy": plan.policy.to_dict(),
                },
                "params": {**self.get_params(), "draft_tokens": list(self.draft_tokens)},
                "estimates": self.estimates_,
                "costs": self.costs_,
                "confirmation": getattr(self, "confirmation_", None),
            },
        )


def _estimate_exit_drafts(
    exits: dict,
    rows: list[np.ndarray],
    costs: ExitCosts,
    verify_steps: dict[int, float],
    checks: Sequence[int],
    *,
    num_layers: int,
    batch_size: int,
    draft_tokens: int,
    max_new_tokens: int,
) -> dict:
    """One candidate's estimate: every batch of `rows` (each row's token indexes into the
    `replay` arrays `exits`) simulated, summed; tokens/s against plain decoding."""
    total = dict.fromkeys(("plain_steps", "cost", "drafted", "accepted", "depth"), 0.0)
    for s in range(0, len(rows), batch_size):
        batch = rows[s : s + batch_size]

        def step_cost(at, batch=batch):  # [A, 2] (row, position): one draft step
            idx = [batch[r][p] if p < len(batch[r]) else -1 for r, p in at]
            return _draft_step_cost(exits, idx, costs, num_layers, checks)

        sim = simulate_exit_drafts(
            [~exits["changed"][i] for i in batch],
            [exits["depth"][i] for i in batch],
            step_cost,
            verify_steps.get,
            num_layers=num_layers,
            draft_tokens=draft_tokens,
            max_new_tokens=max_new_tokens,
        )
        total = {key: total[key] + sim[key] for key in total}
    return {
        "draft_tokens": draft_tokens,
        "speedup": total["plain_steps"] / total["cost"] if total["cost"] else 0.0,
        "acceptance": total["accepted"] / max(total["drafted"], 1),
        "mean_depth": total["depth"] / max(total["drafted"], 1),
    }


def _draft_step_cost(exits: dict, idx: list[int], costs: ExitCosts, L: int, checks) -> float:
    """One draft step of the rows whose tokens are `idx` (-1: a row past its end, which
    runs the full model), in plain steps at the batch size `costs` were measured at."""
    idx = np.asarray(idx)
    real, pad = idx[idx >= 0], int((idx < 0).sum())
    depth = np.r_[exits["depth"][real], np.full(pad, L)]
    ran = np.r_[exits["checks"][real], np.full(pad, len(checks))]
    passed = np.r_[exits["passed"][real], np.zeros(pad, dtype=bool)]
    # at batch size 1 each token's own cost; above, every entry holds the step's ratio
    return float(costs.step(depth, ran, passed, L, np.zeros(len(idx), int), list(checks)).mean())


_EXIT_PLAN = Record(
    {
        "draft_tokens": Optional(Int(1)),
        "estimate": Number(low=0),
        "batch_size": Optional(Int(1)),
        "meta": Record({}),
        "policy": Record({}),
    },
    optional=("estimate", "batch_size", "meta"),
    extra=False,
)


def _load_exit_plan(path: Path, data: dict) -> ExitDraftPlan:
    try:
        if data.get("version") != EXIT_VERSION:
            raise ValueError(f"version {data.get('version')}, this adainfer reads {EXIT_VERSION}")
        check(data, Record({"plan": _EXIT_PLAN}), "the file")
        plan = dict(data["plan"])
        plan["policy"] = TokenExitPolicy.from_dict(plan["policy"], "the file's plan.policy")
    except ValueError as e:
        raise ValueError(
            f"{path} is a damaged exit-draft plan: {e}; make one with "
            "`adainfer plan-drafts --exits POLICY`"
        ) from None
    return ExitDraftPlan(**plan)
