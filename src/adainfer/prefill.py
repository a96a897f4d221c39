"""Prefill scoring with per-row early exit: each prompt's next token, each row stopping at its
own layer. A client of the layer stepper (stepper.py):
- after a layer where a check is scheduled, the last position of every active row goes
  through the logit lens (exact, in a cheaper dtype, or on a token shortlist), features are
  built and the exit policy decides for all active rows at once;
- rows that stop are frozen and leave the batch (the stepper cuts them out of the next
  layer's input); a shortlist or reduced-precision stop is confirmed on the exact head.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from . import features as F
from .arch import ModelParts, find_parts
from .lens import LogitLens
from .policies import Step, planned_checks
from .stepper import LayerOutput, LayerStepper, encode
from .timing import plain_forward, synchronize


@dataclass
class ExitResult:
    """Per-row outcome of a run. Layers are 1-based; unchecked trace entries are NaN / -1."""

    exit_layer: np.ndarray  # [B] layer whose logits gave the answer
    top1: np.ndarray  # [B] answer token id at the exit layer
    num_checks: np.ndarray  # [B] LM-head projections made for exit checks (the final one excluded)
    features: np.ndarray  # [B, L, F] feature trace
    layer_top1: np.ndarray  # [B, L] top-1 token at every checked layer
    seq_len: np.ndarray  # [B] prompt length in tokens
    feature_names: tuple[str, ...]
    num_layers: int
    logits: torch.Tensor | None = None  # [B, V] exit-layer logits (float32), if kept
    layer_choice: np.ndarray | None = (
        None  # [B, L] best of the row's choice tokens per checked layer
    )
    wall_time_s: float = 0.0
    num_short_checks: np.ndarray | None = None  # [B] of num_checks, those on a shortlist only
    shortlist_size: int = 0
    # [B] extra whole-vocabulary projections to confirm a stop (a shortlist check's, agreed or
    # not, or the exact answer after a `check_dtype` check): charged by the true FLOPs ratio
    num_confirms: np.ndarray | None = None

    @property
    def choice_top1(self) -> np.ndarray | None:
        """[B] the best choice token at each row's exit layer (choice-restricted answer)."""
        if self.layer_choice is None:
            return None
        return self.layer_choice[np.arange(len(self)), self.exit_layer - 1]

    def __len__(self) -> int:
        return len(self.exit_layer)

    @staticmethod
    def concat(results: Sequence[ExitResult]) -> ExitResult:
        first = results[0]
        logits = None
        if all(r.logits is not None for r in results):
            logits = torch.cat([r.logits for r in results])

        def merged(
            name, fill, *width
        ):  # a batch without the field (no choice row, say) gets `fill`
            parts = [getattr(r, name) for r in results]
            if all(p is None for p in parts):
                return None
            return np.concatenate(
                [
                    p if p is not None else np.full((len(r), *width), fill)
                    for p, r in zip(parts, results)
                ]
            )

        return ExitResult(
            **{
                name: np.concatenate([getattr(r, name) for r in results])
                for name in (
                    "exit_layer",
                    "top1",
                    "num_checks",
                    "features",
                    "layer_top1",
                    "seq_len",
                )
            },
            feature_names=first.feature_names,
            num_layers=first.num_layers,
            logits=logits,
            layer_choice=merged("layer_choice", -1, first.num_layers),
            wall_time_s=sum(r.wall_time_s for r in results),
            num_short_checks=merged("num_short_checks", 0),
            shortlist_size=max(r.shortlist_size for r in results),
            num_confirms=merged("num_confirms", 0),
        )


class AdaptiveEngine:
    """Run prompts through a causal LM with per-row early exit.

    Parameters
    ----------
    model, tokenizer : a Hugging Face causal LM and its tokenizer (see `adainfer.load`).
    min_layer, stride : check after layers min_layer, min_layer + stride, ... (1-based).
    check_layers : explicit layers to check; overrides min_layer / stride and the policy's own.
    keep_logits : keep the [B, V] exit-layer logits in the result (memory: B * V floats).
    check_dtype : run the exit checks' LM head in this dtype (e.g. torch.bfloat16 on an fp32
        model: half the bytes read per check); rows that stop get their answer from the exact
        head, and the last layer always uses it.
    shortlist : after a row's first (exact) check, check it on its top-`shortlist` tokens of its
        last exact check only (k rows of the unembedding instead of V). A row the policy would
        stop there gets an exact check, and stops only if the policy agrees on the exact
        features: the answer and the stop decision always come from the whole vocabulary.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        min_layer: int = 1,
        stride: int = 1,
        check_layers: Sequence[int] | None = None,
        keep_logits: bool = True,
        check_dtype: torch.dtype | None = None,
        shortlist: int | None = None,
    ):
        self.parts: ModelParts = find_parts(model)
        self.lens = LogitLens(self.parts)
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if min_layer < 1 or stride < 1:
            raise ValueError("min_layer and stride must be >= 1")
        last_check = max(self.num_layers - 1, 1)  # the last layer's head is the answer
        if min_layer > last_check:  # it ran the plain model, silently
            raise ValueError(
                f"min_layer {min_layer} leaves no layer to check: the model has "
                f"{self.num_layers} layers, checks run after layers 1..{last_check}"
            )
        self.min_layer, self.stride = min_layer, stride
        self.check_layers = None if check_layers is None else self._valid_layers(check_layers)
        self.keep_logits = keep_logits
        self.check_dtype = check_dtype if check_dtype not in (None, model.dtype) else None
        if shortlist is not None and not 2 <= shortlist < self.lens.vocab_size:
            raise ValueError(
                f"shortlist must be between 2 and the vocabulary size, got {shortlist}"
            )
        self.shortlist = shortlist

    @property
    def num_layers(self) -> int:
        return self.parts.num_layers

    def _valid_layers(self, layers: Sequence[int]) -> tuple[int, ...]:
        bad = [l for l in layers if not 1 <= int(l) <= self.num_layers]
        if bad:
            raise ValueError(f"check layers {bad} outside 1..{self.num_layers}")
        return tuple(sorted({int(l) for l in layers}))

    def layers_to_check(self, policy=None, batch_size: int | None = None) -> tuple[int, ...]:
        if self.check_layers is not None:
            return self.check_layers
        planned = planned_checks(policy, batch_size)
        if planned is not None:
            return self._valid_layers(planned)
        return tuple(range(self.min_layer, self.num_layers + 1, self.stride))

    # ---------------------------------------------------------------- tokenization
    def encode(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> dict[str, torch.Tensor]:
        """Left-padded model inputs for prompts given as strings or as token ids (lm-eval
        scores continuations token by token, already tokenized)."""
        return encode(self.model, self.tokenizer, prompts)

    # ---------------------------------------------------------------- the run
    @torch.inference_mode()
    def run(
        self,
        prompts: Sequence[str],
        policy,
        *,
        gold: Sequence[int] | None = None,
        features: Sequence[str] | None = None,
        check_layers: Sequence[int] | None = None,
        choices: Sequence[Sequence[int]] | None = None,
        fast_path: bool = True,
    ) -> ExitResult:
        """One batch of prompts (strings, or token-id lists: `encode`). `features` defaults to
        what the policy needs; `gold` feeds the oracle;
        `choices` (token ids per row, empty for open answers) records the best choice at every
        checked layer. With no check to make, the plain forward runs (`fast_path=False` keeps
        the hooked path, to measure its overhead)."""
        enc = self.encode(prompts)
        names = F.check_names(features or getattr(policy, "features", ()) or F.PAPER_FEATURES)
        needed = tuple(getattr(policy, "features", ()))
        missing = [n for n in needed if n not in names]
        if missing:
            raise ValueError(f"the policy needs features {missing} that this run does not compute")
        if check_layers is not None:
            checks = set(self._valid_layers(check_layers))
        else:
            checks = set(self.layers_to_check(policy, len(prompts)))
        out = _Outputs.new(len(prompts), self.num_layers, names, gold, choices)
        if fast_path and not (checks - {self.num_layers}):
            return self._plain_run(enc, out)
        scorer = _Scorer(self, policy, out, checks, needed)
        stepper = LayerStepper(self.parts, taps=scorer.similarity.streams - {"hidden"})
        start = time.perf_counter()
        stepper.run(enc, scorer, use_cache=False)
        synchronize()
        return out.result(self, enc, time.perf_counter() - start)

    def _plain_run(self, enc, out: _Outputs) -> ExitResult:
        """No check can happen: run the plain model itself (no hooks, no overhead)."""
        start = time.perf_counter()
        logits = plain_forward(self.model, enc)
        elapsed = time.perf_counter() - start
        rows = torch.arange(out.size)
        # no decision to make, so no features: their [B, V] temporaries (entropy) would make this
        # path's peak memory the plain model's plus several B x V floats
        out.record(self.num_layers, rows, logits, None, top1=logits.argmax(-1))
        out.finish(rows, self.num_layers, logits, self.keep_logits)
        return out.result(self, enc, elapsed)

    def run_all(
        self,
        prompts: Sequence[str],
        policy,
        *,
        gold: Sequence[int] | None = None,
        choices: Sequence[Sequence[int]] | None = None,
        batch_size: int = 8,
        features: Sequence[str] | None = None,
        progress: bool | str = False,
    ) -> ExitResult:
        """Many prompts in batches of `batch_size`, concatenated in the input order."""
        if len(prompts) == 0:
            raise ValueError("no prompts given")
        starts = range(0, len(prompts), batch_size)
        desc = progress if isinstance(progress, str) else "adainfer"
        parts = [
            self.run(
                prompts[i : i + batch_size],
                policy,
                gold=None if gold is None else gold[i : i + batch_size],
                choices=None if choices is None else choices[i : i + batch_size],
                features=features,
            )
            for i in tqdm(starts, desc=desc, disable=not progress, unit="batch")
        ]
        return ExitResult.concat(parts)


@dataclass
class _Outputs:
    """Per-row results of one batch, filled layer by layer."""

    size: int
    feature_names: tuple[str, ...]
    trace: torch.Tensor  # [B, L, F] features at every checked layer
    layer_top1: torch.Tensor  # [B, L]
    exit_layer: torch.Tensor  # [B]
    top1: torch.Tensor  # [B]
    num_checks: torch.Tensor  # [B]
    num_short: torch.Tensor  # [B] of those, checks on a shortlist
    num_confirms: torch.Tensor  # [B] whole-vocabulary projections confirming a stop
    gold: torch.Tensor | None  # [B]
    choices: torch.Tensor | None  # [B, C] choice token ids (rows padded by repeating their first)
    layer_choice: torch.Tensor | None  # [B, L] best choice at every checked layer
    logits: torch.Tensor | None = None  # [B, V] float32, made by the first rows to finish
    checked: list[int] = field(default_factory=list)

    @classmethod
    def new(cls, size: int, num_layers: int, names, gold, choices) -> _Outputs:
        if gold is not None and len(gold) != size:
            raise ValueError(f"got {len(gold)} gold tokens for {size} prompts")
        choice_ids = _choice_ids(choices, size)
        long = dict(dtype=torch.long)
        return cls(
            size=size,
            feature_names=names,
            trace=torch.full((size, num_layers, len(names)), float("nan")),
            layer_top1=torch.full((size, num_layers), -1, **long),
            exit_layer=torch.zeros(size, **long),
            top1=torch.full((size,), -1, **long),
            num_checks=torch.zeros(size, **long),
            num_short=torch.zeros(size, **long),
            num_confirms=torch.zeros(size, **long),
            gold=None if gold is None else torch.as_tensor(np.asarray(gold), **long),
            choices=choice_ids,
            layer_choice=None if choice_ids is None else torch.full((size, num_layers), -1, **long),
        )

    def record(self, layer, rows, logits, feats, *, top1, choices: bool = True) -> None:
        """Features, top-1 and best choice of `rows` at `layer` into the trace; `choices`:
        `logits` cover the whole vocabulary (not a shortlist), so the choice tokens are in it."""
        check_finite(logits, layer, rows)
        if feats is not None:
            self.trace[rows, layer - 1] = feats.to(self.trace.device)
        self.layer_top1[rows, layer - 1] = top1.to(self.layer_top1.device)
        if self.choices is not None and choices:
            ids = self.choices[rows].to(logits.device)
            best = logits.gather(1, ids.clamp(min=0)).argmax(-1, keepdim=True)
            self.layer_choice[rows, layer - 1] = ids.gather(1, best)[:, 0].cpu()  # -1: none

    def finish(self, rows, layer: int, logits, keep_logits: bool) -> None:
        """Freeze `rows` at `layer`, answered by their whole-vocabulary `logits`."""
        check_finite(logits, layer, rows)
        self.exit_layer[rows] = layer
        self.top1[rows] = logits.argmax(-1).cpu()
        if not keep_logits:
            return
        logits = logits.float().cpu()
        if self.logits is None and len(rows) == self.size:
            self.logits = logits  # every row at once (plain run, last layer): no second copy
            return
        if self.logits is None:
            self.logits = torch.empty(self.size, logits.shape[-1])
        self.logits[rows] = logits

    def result(self, engine: AdaptiveEngine, enc, elapsed: float) -> ExitResult:
        return ExitResult(
            exit_layer=self.exit_layer.numpy(),
            top1=self.top1.numpy(),
            num_checks=self.num_checks.numpy(),
            features=self.trace.numpy(),
            layer_top1=self.layer_top1.numpy(),
            seq_len=enc["attention_mask"].sum(-1).cpu().numpy(),
            feature_names=self.feature_names,
            num_layers=engine.num_layers,
            logits=self.logits,
            layer_choice=None if self.layer_choice is None else self.layer_choice.numpy(),
            wall_time_s=elapsed,
            num_short_checks=None if engine.shortlist is None else self.num_short.numpy(),
            shortlist_size=engine.shortlist or 0,
            num_confirms=self.num_confirms.numpy(),
        )


class NonFiniteLogits(ValueError):
    """A layer's logits hold NaN or inf: no feature, decision or answer can be read there."""


def check_finite(logits: torch.Tensor, layer: int, rows) -> None:
    """Refuse logits with NaN or inf (a broken model, or a dtype that overflows): argmax reads
    NaN as the largest, so the answer would be a token picked by the NaN, the features NaN,
    and a policy might stop on them. The row max carries any NaN or +inf: one reduction."""
    bad = ~torch.isfinite(logits.amax(-1))
    if bool(bad.any()):
        which = torch.as_tensor(rows)[bad.cpu()].tolist()
        raise NonFiniteLogits(
            f"layer {layer} gave non-finite logits (NaN or inf) for row(s) {which[:8]}: the "
            "model's weights are broken or its activations overflow this dtype (try float32)"
        )


def _choice_ids(choices, size: int) -> torch.Tensor | None:
    """[B, C] choice token ids; rows may mix choice tasks and open tasks, so each is padded
    with its first choice (or -1 when it has none)."""
    if choices is None or not any(len(c) for c in choices):
        return None
    choices = [[int(t) for t in c] for c in choices]  # lists, tuples or numpy arrays
    if len(choices) != size:
        raise ValueError(f"got choices for {len(choices)} rows, expected {size}")
    width = max(len(c) for c in choices)
    return torch.tensor([c + [c[0] if c else -1] * (width - len(c)) for c in choices])


class _Scorer:
    """The stepper's client for one batch: checks, decides and freezes rows after a layer."""

    def __init__(self, engine: AdaptiveEngine, policy, out: _Outputs, checks, needed):
        self.engine, self.lens, self.policy, self.out = engine, engine.lens, policy, out
        self.checks, self.needed = checks, needed
        self.column = [out.feature_names.index(n) for n in needed]
        self.similarity = F.LayerSimilarity(F.needed_streams(out.feature_names))
        self.shortlist: torch.Tensor | None = None  # [B, k] candidates, after a first exact check

    def __call__(self, seen: LayerOutput) -> torch.Tensor | None:
        last = seen.hidden[:, -1]
        sims = self.similarity.step(last, seen.before, seen.taps)
        L = self.engine.num_layers
        if seen.layer == L:  # every row still going answers here, with the exact head
            logits = self.lens(last)
            self._record(seen.layer, seen.rows, logits, sims)
            self.out.finish(seen.rows, L, logits, self.engine.keep_logits)
            return torch.zeros(len(seen.rows), dtype=torch.bool)
        if seen.layer not in self.checks:
            return None
        stop = self._check(seen.layer, seen.rows, last, sims)
        if stop is None:
            return None
        self.similarity.keep(~stop)
        return ~stop

    def _check(self, layer: int, rows, last, sims) -> torch.Tensor | None:
        """One exit check of the active rows: the mask of those that stop here, or None."""
        out, k = self.out, self.engine.shortlist
        ids = None if self.shortlist is None else self.shortlist[rows]
        if ids is None:
            logits = self.lens(last, dtype=self.engine.check_dtype)
        else:
            logits = self.lens(last, ids=ids.to(last.device))
        feats, top1 = self._record(layer, rows, logits, sims, ids=ids)
        out.checked.append(layer)
        out.num_checks[rows] += 1
        if ids is not None:
            out.num_short[rows] += 1
        elif k:  # the first exact check gives each row its candidates
            self.shortlist = torch.zeros(out.size, k, dtype=torch.long)
            self.shortlist[rows] = logits.topk(k, dim=-1).indices.cpu()
        stop = self._decide(layer, rows, feats, top1)
        if not stop.any():
            return None
        if ids is None and self.engine.check_dtype is None:
            out.finish(rows[stop], layer, logits[stop.to(logits.device)], self.engine.keep_logits)
            return stop
        return self._confirm(layer, rows, last, sims, stop, shortlisted=ids is not None)

    def _confirm(self, layer, rows, last, sims, stop, *, shortlisted: bool):
        """A stop decided on approximate logits, confirmed on the whole vocabulary in full
        precision: the answer comes from there, and after a shortlist check the policy must
        agree on the exact features (a refusal renews the row's candidates)."""
        exact = self.lens(last[stop.to(last.device)])
        self.out.num_confirms[rows[stop]] += 1
        if shortlisted:
            sub = rows[stop]
            sub_sims = {s: v[stop.to(v.device)] for s, v in sims.items()}
            feats, top1 = self._record(layer, sub, exact, sub_sims)
            agree = self._decide(layer, sub, feats, top1)
            refused = exact[~agree.to(exact.device)]
            self.shortlist[sub[~agree]] = refused.topk(self.engine.shortlist, dim=-1).indices.cpu()
            exact = exact[agree.to(exact.device)]
            stop = stop.clone()
            stop[stop.clone()] = agree
            if not stop.any():
                return None
        self.out.finish(rows[stop], layer, exact, self.engine.keep_logits)
        return stop

    def _record(self, layer, rows, logits, sims, *, ids=None):
        """Features and top-1 of `rows` at `layer`. With `ids`, `logits` are over each row's
        shortlist: top-1 maps back to token ids, and choices wait for an exact check."""
        feats, top1 = F.compute(logits, self.out.feature_names, layer, self.engine.num_layers, sims)
        if ids is not None:
            top1 = ids.to(top1.device).gather(1, top1[:, None])[:, 0]
        self.out.record(layer, rows, logits, feats, top1=top1, choices=ids is None)
        return feats, top1

    def _decide(self, layer: int, rows, feats, top1) -> torch.Tensor:
        """One vectorised decision for `rows`: a bool mask over them."""
        out, column = self.out, self.column
        step = Step(
            layer=layer,
            num_layers=out.trace.shape[1],
            feature_names=self.needed,
            features=feats[:, column].cpu().numpy(),
            history=out.trace[rows][:, [c - 1 for c in out.checked]][:, :, column].numpy(),
            top1=top1.cpu().numpy(),
            rows=rows.numpy(),
            gold=None if out.gold is None else out.gold[rows].numpy(),
        )
        return torch.as_tensor(np.asarray(self.policy.decide(step), dtype=bool))


def plain_last_logits(engine: AdaptiveEngine, prompts: Sequence[str]) -> torch.Tensor:
    """The plain model's next-token logits for each prompt, tokenized as the engine does."""
    return plain_forward(engine.model, engine.encode(prompts))
