"""The adaptive-depth engine: run a batch layer by layer, let each row stop at its own layer.

We run the model's own forward (so masks, rotary tables and every architecture detail are
exactly Hugging Face's, computed once) and hook its decoder layers:
- after layer l, the last position of every active row goes through the final norm + LM head
  (only at the layers where a check is scheduled), features are built and the exit policy
  decides for all active rows at once;
- rows that stop are frozen and *removed* from the hidden states the next layer receives; a
  pre-hook slices the per-row arguments (mask, positions, rotary tables) to the rows still
  going, so later layers really compute less;
- when no row is left, or after the last layer, a private exception ends the forward, so the
  remaining layers and the full-sequence final norm never run.
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
from .policies import planned_checks


@dataclass
class Step:
    """What an exit policy sees at one checked layer, for the rows still active."""

    layer: int  # 1-based decoder layer just computed
    num_layers: int
    feature_names: tuple[str, ...]
    features: np.ndarray  # [A, F] at this layer
    history: np.ndarray  # [A, T, F] at every layer checked so far (this one last)
    top1: np.ndarray  # [A] top-1 token id at this layer
    rows: np.ndarray  # [A] index of each active row in the batch
    gold: np.ndarray | None = None  # [A] gold answer token ids, when known (oracle only)


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


class _Done(Exception):
    """Raised from a hook to end the forward pass early."""


def _last_hidden(output):
    return output if torch.is_tensor(output) else output[0]


def _replace_hidden(output, hidden):
    if torch.is_tensor(output):
        return hidden
    return (hidden, *output[1:])


@dataclass
class _Batch:
    """Mutable state of one batched forward pass."""

    size: int
    active: torch.Tensor  # original row indices still running
    feature_names: tuple[str, ...]
    streams: set[str]
    trace: torch.Tensor  # [B, L, F]
    layer_top1: torch.Tensor  # [B, L]
    exit_layer: torch.Tensor
    top1: torch.Tensor
    num_checks: torch.Tensor
    logits: torch.Tensor | None
    gold: torch.Tensor | None
    choices: torch.Tensor | None  # [B, C] choice token ids (rows padded by repeating their first)
    layer_choice: torch.Tensor | None  # [B, L]
    num_short: torch.Tensor | None = None  # [B] checks made on a shortlist
    num_confirms: torch.Tensor | None = None  # [B] whole-vocabulary projections confirming a stop
    shortlist: torch.Tensor | None = None  # [B, k] each row's candidate tokens, once it has some
    checked: list[int] = field(default_factory=list)
    previous: dict[str, torch.Tensor] = field(default_factory=dict)  # last position, layer l-1
    current: dict[str, torch.Tensor] = field(default_factory=dict)  # last position, layer l
    # per-row args cut to the active rows, by id of the full tensor; the full tensor is kept in
    # the entry so that its id cannot be reused by another tensor while the entry lives
    sliced: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    rows_by_seq: tuple = ()  # [A, S] of the layer now running

    def slice_rows(self, value):
        """Cut a per-row argument (dim 0 == batch size) down to the active rows, once per set."""
        if torch.is_tensor(value):
            if value.ndim >= 2 and value.shape[0] == self.size:
                key = id(value)
                if key not in self.sliced:
                    self.sliced[key] = (value, value.index_select(0, self.active.to(value.device)))
                return self.sliced[key][1]
            return value
        if isinstance(value, tuple):
            return tuple(self.slice_rows(v) for v in value)
        if isinstance(value, list):
            return [self.slice_rows(v) for v in value]
        if isinstance(value, dict):
            return {k: self.slice_rows(v) for k, v in value.items()}
        return value


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
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if min_layer < 1 or stride < 1:
            raise ValueError("min_layer and stride must be >= 1")
        self.min_layer, self.stride = min_layer, stride
        self.check_layers = None if check_layers is None else self._valid_layers(check_layers)
        self.keep_logits = keep_logits
        self.check_dtype = check_dtype if check_dtype not in (None, model.dtype) else None
        self._cheap_head = None
        if shortlist is not None and not 2 <= shortlist < self.parts.head.weight.shape[0]:
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

    def check_logits(self, last: torch.Tensor) -> torch.Tensor:
        """Logit lens for an exit check: exact, or with a head cast once to `check_dtype`."""
        if self.check_dtype is None or self.parts.project_out is not None:
            return self.parts.logits(last)
        if self._cheap_head is None:
            self._cheap_head = self.parts.head.weight.detach().to(self.check_dtype)
        logits = torch.nn.functional.linear(
            self.parts.norm(last).to(self.check_dtype), self._cheap_head
        )
        if self.parts.softcap or self.parts.logit_scale != 1.0:
            logits = self.parts.finish(
                logits.float()
            )  # in fp32: tanh on bf16 logits blurs the top gap
        return logits

    # ---------------------------------------------------------------- tokenization
    def encode(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, not one string")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        enc = self.tokenizer(list(prompts), return_tensors="pt", padding=True, padding_side="left")
        lengths = enc["attention_mask"].sum(-1)
        limit = context_length(self.model.config)
        if limit is not None and int(lengths.max()) > limit:
            i = int(lengths.argmax())
            raise ValueError(
                f"prompt {i} has {int(lengths[i])} tokens but the model's context is {limit}; "
                "shorten it or use fewer demonstrations"
            )
        device = self.model.get_input_embeddings().weight.device
        mask = enc["attention_mask"].to(device)
        # positions from the mask, as generate() does: left padding must not shift absolute
        # positions (GPT-2, OPT) and makes every row equal to itself run alone.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {
            "input_ids": enc["input_ids"].to(device),
            "attention_mask": mask,
            "position_ids": positions,
        }

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
        """One batch. `features` defaults to what the policy needs; `gold` feeds the oracle;
        `choices` (token ids per row, empty for open answers) records the best choice at every
        checked layer. With no check to make, the plain forward runs (`fast_path=False` keeps
        the hooked path, to measure its overhead)."""
        enc = self.encode(prompts)
        names = F.check_names(features or getattr(policy, "features", ()) or F.PAPER_FEATURES)
        needed = getattr(policy, "features", ())
        missing = [n for n in needed if n not in names]
        if missing:
            raise ValueError(f"the policy needs features {missing} that this run does not compute")
        column = [names.index(n) for n in needed]
        checks = set(
            self._valid_layers(check_layers)
            if check_layers is not None
            else self.layers_to_check(policy, len(prompts))
        )
        batch = self._new_batch(enc, names, gold, choices)
        L = self.num_layers
        if fast_path and not (checks - {L}):
            return self._plain_run(enc, batch)

        def pre_hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            batch.rows_by_seq = hidden.shape[:2]
            if "hidden" in batch.streams:
                batch.previous.setdefault("hidden", hidden[:, -1])
            if len(batch.active) == batch.size:
                return None
            # args[0] is the (already cut) hidden state; everything else is per-row or shared.
            return (args[:1] + batch.slice_rows(args[1:]), batch.slice_rows(kwargs))

        def stream_hook(stream):
            def hook(module, args, output):
                out = _last_hidden(output)
                if out.ndim == 2:  # OPT runs its MLP on flattened [B*S, H] tokens
                    out = out.view(*batch.rows_by_seq, -1)
                batch.current[stream] = out[:, -1]

            return hook

        def post_hook_for(layer: int):
            def post_hook(module, args, output):
                hidden = _last_hidden(output)
                last = hidden[:, -1]
                if "hidden" in batch.streams:
                    batch.current["hidden"] = last
                sims = {
                    s: (
                        torch.cosine_similarity(
                            batch.current[s].float(), batch.previous[s].float(), dim=-1
                        )
                        if s in batch.previous
                        else torch.zeros(len(last), device=last.device)
                    )
                    for s in batch.streams
                }
                batch.previous.update(batch.current)
                if layer not in checks and layer != L:
                    return None
                rows = batch.active
                if layer == L:
                    logits = self.parts.logits(last)
                    self._record(batch, layer, logits, sims)
                    self._finish(batch, torch.ones(len(rows), dtype=torch.bool), layer, logits)
                    raise _Done
                ids = batch.shortlist[rows] if batch.shortlist is not None else None
                logits = (
                    self.check_logits(last)
                    if ids is None
                    else self.parts.shortlist_logits(last, ids.to(last.device))
                )
                feats, top1 = self._record(batch, layer, logits, sims, ids=ids)
                batch.checked.append(layer)
                batch.num_checks[rows] += 1
                if ids is not None:
                    batch.num_short[rows] += 1
                elif self.shortlist:  # the first exact check gives each row its candidates
                    batch.shortlist = torch.zeros(batch.size, self.shortlist, dtype=torch.long)
                    batch.shortlist[rows] = logits.topk(self.shortlist, dim=-1).indices.cpu()
                stop = self._decide(policy, batch, layer, rows, feats, top1, column, needed)
                if not stop.any():
                    return None
                exact = (
                    None
                    if ids is None and self.check_dtype is None
                    else self.parts.logits(last[stop.to(last.device)])
                )
                if exact is not None:
                    batch.num_confirms[rows[stop]] += 1
                if ids is not None:  # confirm on the whole vocabulary: exact features, same policy
                    sub = rows[stop]
                    feats, top1 = self._record(batch, layer, exact, sims, where=stop)
                    agree = self._decide(policy, batch, layer, sub, feats, top1, column, needed)
                    batch.shortlist[sub[~agree]] = (
                        exact[~agree.to(exact.device)].topk(self.shortlist, dim=-1).indices.cpu()
                    )
                    exact = exact[agree.to(exact.device)]
                    stop[stop.clone()] = agree
                    if not stop.any():
                        return None
                self._finish(
                    batch,
                    stop,
                    layer,
                    exact if exact is not None else logits[stop.to(logits.device)],
                )
                if len(batch.active) == 0:
                    raise _Done
                keep = (~stop).to(hidden.device)
                batch.previous = {k: v[keep] for k, v in batch.previous.items()}
                return _replace_hidden(output, hidden[keep])

            return post_hook

        handles = []
        try:
            for i, layer in enumerate(self.parts.layers):
                handles.append(layer.register_forward_pre_hook(pre_hook, with_kwargs=True))
                handles.append(layer.register_forward_hook(post_hook_for(i + 1)))
                for stream in batch.streams - {"hidden"}:
                    sub = getattr(layer, getattr(self.parts.spec, stream))
                    handles.append(sub.register_forward_hook(stream_hook(stream)))
            start = time.perf_counter()
            try:
                self.parts.base(**enc, use_cache=False)
            except _Done:
                pass
            synchronize()
            elapsed = time.perf_counter() - start
        finally:
            for h in handles:
                h.remove()
        return self._result(enc, batch, elapsed)

    def _result(self, enc, batch: _Batch, elapsed: float) -> ExitResult:
        return ExitResult(
            exit_layer=batch.exit_layer.numpy(),
            top1=batch.top1.numpy(),
            num_checks=batch.num_checks.numpy(),
            features=batch.trace.numpy(),
            layer_top1=batch.layer_top1.numpy(),
            seq_len=enc["attention_mask"].sum(-1).cpu().numpy(),
            feature_names=batch.feature_names,
            num_layers=self.num_layers,
            logits=batch.logits,
            layer_choice=None if batch.layer_choice is None else batch.layer_choice.numpy(),
            wall_time_s=elapsed,
            num_short_checks=None if self.shortlist is None else batch.num_short.numpy(),
            shortlist_size=self.shortlist or 0,
            num_confirms=batch.num_confirms.numpy(),
        )

    def _new_batch(self, enc, names, gold, choices) -> _Batch:
        B, L = enc["input_ids"].shape[0], self.num_layers
        if gold is not None and len(gold) != B:
            raise ValueError(f"got {len(gold)} gold tokens for {B} prompts")
        choice_ids = None
        if choices is not None and any(len(c) for c in choices):
            choices = [[int(t) for t in c] for c in choices]  # lists, tuples or numpy arrays
            if len(choices) != B:
                raise ValueError(f"got choices for {len(choices)} rows, expected {B}")
            # rows may mix choice tasks and open tasks: pad with the row's first choice (or -1)
            width = max(len(c) for c in choices)
            choice_ids = torch.tensor(
                [list(c) + [c[0] if c else -1] * (width - len(c)) for c in choices]
            )
        return _Batch(
            size=B,
            active=torch.arange(B),
            feature_names=names,
            streams=F.needed_streams(names),
            trace=torch.full((B, L, len(names)), float("nan")),
            layer_top1=torch.full((B, L), -1, dtype=torch.long),
            exit_layer=torch.zeros(B, dtype=torch.long),
            top1=torch.full((B,), -1, dtype=torch.long),
            num_checks=torch.zeros(B, dtype=torch.long),
            logits=None,  # [B, V] float32, made by the first rows to finish (if keep_logits)
            gold=None if gold is None else torch.as_tensor(np.asarray(gold), dtype=torch.long),
            choices=choice_ids,
            layer_choice=None if choice_ids is None else torch.full((B, L), -1, dtype=torch.long),
            num_short=torch.zeros(B, dtype=torch.long),
            num_confirms=torch.zeros(B, dtype=torch.long),
        )

    @staticmethod
    def _decide(
        policy, batch: _Batch, layer: int, rows, feats, top1, column, needed
    ) -> torch.Tensor:
        """One vectorised decision for `rows`: a bool mask over them."""
        step = Step(
            layer=layer,
            num_layers=batch.trace.shape[1],
            feature_names=tuple(needed),
            features=feats[:, column].cpu().numpy(),
            history=batch.trace[rows][:, [c - 1 for c in batch.checked]][:, :, column].numpy(),
            top1=top1.cpu().numpy(),
            rows=rows.numpy(),
            gold=None if batch.gold is None else batch.gold[rows].numpy(),
        )
        return torch.as_tensor(np.asarray(policy.decide(step), dtype=bool))

    def _record(
        self, batch: _Batch, layer: int, logits, sims, *, ids=None, where=None, with_features=True
    ):
        """Features, top-1 and best choice at `layer` into the trace, for the active rows (or
        those selected by the mask `where`). With `ids`, `logits` are over each row's shortlist:
        top-1 maps back to token ids, and choices wait for an exact check."""
        rows = batch.active
        if where is not None:
            rows = rows[where]
            sims = {k: v[where.to(v.device)] for k, v in sims.items()}
        if with_features:
            feats, top1 = F.compute(logits, batch.feature_names, layer, self.num_layers, sims)
        else:
            feats, top1 = None, logits.argmax(-1)
        if ids is not None:
            top1 = ids.to(top1.device).gather(1, top1[:, None])[:, 0]
        if feats is not None:
            batch.trace[rows, layer - 1] = feats.to(batch.trace.device)
        batch.layer_top1[rows, layer - 1] = top1.to(batch.layer_top1.device)
        if batch.choices is not None and ids is None:
            ids = batch.choices[rows].to(logits.device)
            best = logits.gather(1, ids.clamp(min=0)).argmax(-1, keepdim=True)
            batch.layer_choice[rows, layer - 1] = ids.gather(1, best)[:, 0].cpu()  # -1: no choices
        return feats, top1

    def _plain_run(self, enc, batch: _Batch) -> ExitResult:
        """No check can happen: run the plain model itself (no hooks, no overhead)."""
        start = time.perf_counter()
        logits = plain_forward(self.model, enc)
        elapsed = time.perf_counter() - start
        # no decision to make, so no features: their [B, V] temporaries (entropy) would make this
        # path's peak memory the plain model's plus several B x V floats
        self._record(batch, self.num_layers, logits, {}, with_features=False)
        self._finish(batch, torch.ones(batch.size, dtype=torch.bool), self.num_layers, logits)
        return self._result(enc, batch, elapsed)

    def _finish(self, batch: _Batch, stop: torch.Tensor, layer: int, logits) -> None:
        """Freeze the rows in `stop` (a mask over the active rows) at this layer; `logits` are
        those rows' whole-vocabulary logits."""
        rows = batch.active[stop]
        batch.exit_layer[rows] = layer
        batch.top1[rows] = logits.argmax(-1).cpu()
        if self.keep_logits:
            logits = logits.float().cpu()
            if batch.logits is None and len(rows) == batch.size:
                batch.logits = (
                    logits  # every row at once (plain run, last layer): no second [B, V] copy
                )
            else:
                if batch.logits is None:
                    batch.logits = torch.empty(batch.size, logits.shape[-1])
                batch.logits[rows] = logits
        batch.active = batch.active[~stop]
        batch.sliced.clear()

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


def context_length(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.inference_mode()
def plain_forward(model, enc: dict) -> torch.Tensor:
    """The unmodified Hugging Face model, one full forward: next-token logits per row, computed
    (not only queued on a GPU) when it returns, so that it can be timed."""
    logits = model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1].float()
    synchronize()
    return logits


def synchronize() -> None:
    """Wait for queued GPU work: a timer read before it would time the queueing only."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def plain_last_logits(engine: AdaptiveEngine, prompts: Sequence[str]) -> torch.Tensor:
    """The plain model's next-token logits for each prompt, tokenized as the engine does."""
    return plain_forward(engine.model, engine.encode(prompts))
