"""Token-by-token generation in which tokens leave early: the layer stepper's second client.

Lossless self-speculative decoding, batched. Each round, every row drafts `draft_tokens`
tokens from the first `draft_layer` layers (the logit lens at that depth), then the full model
verifies all of them in one forward that *starts* at layer `draft_layer + 1`: the draft already
computed the early layers for those positions, and their keys and values are the full model's
own (layer l of a token depends only on layers below it), so they are reused, not recomputed.
Each row keeps its longest verified prefix plus the full model's own next token, so greedy
output is the plain model's, token for token. Rows accept different counts: a rejected
position stays in the cache as a hole that the attention mask hides, and the tail that every
row rejected is cropped.

Two options make a draft cheaper to be wrong about. A *draft vocabulary* reads the draft
through a shortlist of the unembedding (a fixed set of frequent tokens, plus each row's own
prompt tokens) instead of the exact LM head, which costs several decoder layers per token on
a CPU; the verifier still reads the exact head, so greedy output is unchanged, and a sampled
draft's distribution is zero outside the shortlist. *Confidence stopping* ends a round's
drafting once no row's draft reaches `draft_confidence` (its top-1 probability, over the
shortlist when there is one): drafts that would most likely be rejected are not made.

Without a draft layer the decoder runs plain decoding (one full forward per token): the
fallback where drafting cannot pay for itself. Whether and how to draft is planned per model,
dtype, batch size and machine by `adainfer.drafting.DraftPlanner`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.nn import functional
from transformers import (
    DynamicCache,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .arch import find_parts
from .lens import LogitLens
from .stepper import LayerStepper, encode


@dataclass
class GenerationResult:
    """Per row: the new tokens and their text; with drafting, what was drafted and kept."""

    tokens: list[list[int]]
    texts: list[str]
    draft_layer: int | None
    drafted: np.ndarray  # [B] draft tokens proposed
    accepted: np.ndarray  # [B] of those, verified equal to the full model's
    rounds: int = 0  # draft-and-verify rounds (plain decoding: steps)
    wall_time_s: float = 0.0
    exit_layers: list[list[int]] | None = None  # lossy mode: the layer each token left at
    draft_layers: list[list[int]] | None = None  # drafts by exits: the depth of each draft
    head_skips: list[list[bool]] | None = None  # lossy mode: read on the shortlist, not the head

    @property
    def mean_exit_layer(self) -> float:
        layers = [e for row in self.exit_layers or () for e in row]
        return float(np.mean(layers)) if layers else float("nan")

    @property
    def acceptance(self) -> float:
        drafted = int(self.drafted.sum())
        return float(self.accepted.sum()) / drafted if drafted else float("nan")


class Chooser:
    """How a token is picked from logits: greedy, or sampled from the distribution that
    Hugging Face's temperature / top-k / top-p warpers leave."""

    def __init__(
        self,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        generator: torch.Generator | None = None,
    ):
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be above 0 when sampling, got {temperature}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self.do_sample, self.generator = do_sample, generator
        warpers = [TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
        warpers += [TopKLogitsWarper(top_k)] if top_k else []
        warpers += [TopPLogitsWarper(top_p)] if top_p < 1.0 else []
        self.warpers = LogitsProcessorList(warpers)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V] the distribution tokens are sampled from."""
        flat = logits.reshape(-1, logits.shape[-1]).float()
        return self.warpers(None, flat).softmax(-1).reshape(logits.shape)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=self.generator).reshape(probs.shape[:-1])

    def pick(self, logits: torch.Tensor) -> torch.Tensor:
        _check_finite(logits)
        return self.sample(self.probs(logits)) if self.do_sample else logits.argmax(-1)

    def draw(
        self, logits: torch.Tensor, keep_probs: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(token, the distribution it was sampled from, or None): a sampled draft keeps its
        distribution for the acceptance rule (`accept`); anything else is `pick`ed."""
        if not keep_probs:
            return self.pick(logits), None
        q = self.probs(logits)
        return self.sample(q), q

    def accept(self, drafts, draft_probs, logits) -> tuple[torch.Tensor, torch.Tensor]:
        """(leading drafts accepted [A], the token after them [A, k]: the full model's own
        choice at every position, and where it rejects a sampled draft a token from the
        residual distribution max(p - q, 0), so every token follows the full model's
        distribution: speculative sampling)."""
        _check_finite(logits)
        if not self.do_sample:
            full = logits.argmax(-1)
            return (drafts == full).long().cumprod(1).sum(1), full
        p = self.probs(logits)  # [A, k, V]
        p_draft = p.gather(-1, drafts[..., None])[..., 0]
        q_draft = draft_probs.gather(-1, drafts[..., None])[..., 0]
        u = torch.rand(p_draft.shape, generator=self.generator, device=p_draft.device)
        agree = (u * q_draft < p_draft).long().cumprod(1).sum(1)
        residual = (p - draft_probs).clamp(min=0)
        empty = residual.sum(-1, keepdim=True) <= 0  # p == q there: sample from p itself
        residual = torch.where(empty, p, residual)
        return agree, self.sample(residual / residual.sum(-1, keepdim=True))


def _check_finite(logits: torch.Tensor) -> None:
    """The full model's logits hold no NaN or inf: greedy argmax would read a NaN as the best
    token, sampling would fail deep in torch.multinomial. One reduction per step."""
    if not bool(torch.isfinite(logits.amax(-1)).all()):
        raise ValueError(
            "the model gave non-finite logits (NaN or inf): its weights are broken or its "
            "activations overflow this dtype (try float32)"
        )


class DraftHead:
    """How a draft reads its token from the layer-d hidden state: the exact LM head, or a
    shortlist of the unembedding, which costs a fraction of the head on a CPU.

    `vocab`: token ids every row may draft (None: the exact head); `prompt_tokens`: each row
    may also draft the tokens of its own prompt (code repeats its identifiers). The fixed
    rows of the unembedding are sliced once, so a read is one small matmul plus, per row, a
    gather of its prompt tokens' rows."""

    def __init__(self, lens: LogitLens, vocab=None, prompt_tokens: bool = False):
        self.lens, self.prompt_tokens = lens, prompt_tokens
        if vocab is None:
            if prompt_tokens:
                raise ValueError("prompt_tokens extends a draft vocabulary: give draft_vocab too")
            self.fixed = None
            return
        head = lens.parts.head
        ids = torch.as_tensor(sorted({int(t) for t in vocab}), dtype=torch.long)
        if len(ids) and not 0 <= int(ids[0]) <= int(ids[-1]) < lens.vocab_size:
            raise ValueError(f"draft_vocab holds ids outside the vocabulary (0..{lens.vocab_size})")
        if not len(ids) and not prompt_tokens:
            raise ValueError("an empty draft_vocab can draft nothing")
        self.fixed = ids.to(head.weight.device)
        self.weight = head.weight.detach()[self.fixed].contiguous()
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.detach()[self.fixed]
        self.in_fixed = torch.zeros(lens.vocab_size, dtype=torch.bool, device=self.fixed.device)
        self.in_fixed[self.fixed] = True

    @property
    def exact(self) -> bool:
        return self.fixed is None

    @property
    def size(self) -> int | None:
        """Tokens in the fixed shortlist (None: the whole vocabulary)."""
        return None if self.fixed is None else len(self.fixed)

    def extra_ids(self, input_ids: torch.Tensor, mask: torch.Tensor):
        """([B, p] each row's prompt tokens outside the fixed shortlist, [B, p] which entries
        are real, not padding), or (None, None) without prompt tokens."""
        if not self.prompt_tokens:
            return None, None
        rows = [
            (lambda u: u[~self.in_fixed[u]])(ids[m.bool()].unique())
            for ids, m in zip(input_ids, mask)
        ]
        width = max(1, max(len(r) for r in rows))
        extra = input_ids.new_zeros(len(rows), width)
        valid = torch.zeros(len(rows), width, dtype=torch.bool, device=input_ids.device)
        for i, r in enumerate(rows):
            extra[i, : len(r)], valid[i, : len(r)] = r, True
        return extra, valid

    def logits(self, hidden: torch.Tensor, extra=None, valid=None) -> torch.Tensor:
        """[A, n] logits of the candidates (`ids` orders them); -inf on padding entries."""
        if self.fixed is None:
            return self.lens(hidden)
        normed = self.lens.normed(hidden)
        parts = [functional.linear(normed, self.weight, self.bias)]
        if extra is not None:
            head = self.lens.parts.head
            bias = None if getattr(head, "bias", None) is None else head.bias[extra]
            if len(extra) == 1:  # one candidate list for every state: one matmul
                rows = functional.linear(normed, head.weight[extra[0]], bias)
            else:
                rows = torch.einsum("ah,akh->ak", normed, head.weight[extra])
                rows = rows if bias is None else rows + bias
            parts.append(rows.masked_fill(~valid, float("-inf")))
        return self.lens.finish(torch.cat(parts, -1))

    def ids(self, extra=None) -> torch.Tensor | None:
        """[A, n] (or [1, n], where every row has the same candidates) token id of each
        candidate column; None for the exact head."""
        if self.fixed is None:
            return None
        if extra is None:
            return self.fixed[None]
        return torch.cat([self.fixed[None].expand(len(extra), -1), extra], -1)

    def full(self, logits: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """[A, V] logits with -inf outside the shortlist: what a sampled draft's distribution
        q is built from (zero outside the shortlist). A padding entry (-inf) never wins."""
        if ids is None:
            return logits
        full = logits.new_full((len(logits), self.lens.vocab_size), float("-inf"))
        return full.scatter_reduce(1, ids.expand(len(logits), -1), logits, "amax")


@dataclass
class _Rows:
    """Decoding state of the rows still generating (all tensors [A, ...])."""

    index: torch.Tensor  # [A] row of each in the batch
    mask: torch.Tensor  # [A, T] 1 for a real position, 0 for padding or a rejected draft
    position: torch.Tensor  # [A] position id of the pending token
    pending: torch.Tensor  # [A] newest token, emitted, not yet in the cache
    cache: DynamicCache = field(repr=False)
    extra: torch.Tensor | None = None  # [A, p] each row's own draft candidates (prompt tokens)
    valid: torch.Tensor | None = None  # [A, p] which of them are real
    chooser: Chooser = field(default_factory=lambda: Chooser(), repr=False)  # picks tokens
    drafting: bool = False  # whether this batch drafts (off: plain decoding)

    def keep(self, keep: torch.Tensor) -> None:
        if bool(keep.all()):
            return
        self.cache.batch_select_indices(keep.nonzero()[:, 0].to(self.mask.device))
        self.index, self.mask = self.index[keep.cpu()], self.mask[keep]
        self.position, self.pending = self.position[keep], self.pending[keep]
        if self.extra is not None:
            self.extra, self.valid = self.extra[keep], self.valid[keep]


class DraftingBlocked(ValueError):
    """Drafting cannot serve this generation (a sliding-window cache would fill)."""


class SelfSpeculativeDecoder:
    """Generation, lossless, with drafts from an early layer (see the module doc).

    Parameters
    ----------
    model, tokenizer : a Hugging Face causal LM and its tokenizer.
    draft_layer : depth of the drafts (1..L-1); None: plain decoding.
    draft_tokens : tokens drafted per round at most before the full model verifies them.
    draft_vocab : token ids the drafts are read over (a shortlist of the unembedding);
        None: the exact LM head.
    draft_prompt_tokens : each row may also draft its own prompt's tokens (with draft_vocab).
    draft_confidence : a round stops drafting after a draft whose top-1 probability (over
        the shortlist, if any) is below this in every row still going; 0: never stops early.
    plain_if_blocked : decode plainly (rather than refuse) a batch that drafting cannot serve
        because a sliding-window cache would fill (a plan's settings are advice, not orders).
    """

    tracks_exits = False  # whether tokens leave at their own layer (the lossy decoder)

    def __init__(
        self,
        model,
        tokenizer,
        *,
        draft_layer: int | None = None,
        draft_tokens: int = 4,
        draft_vocab: Sequence[int] | torch.Tensor | None = None,
        draft_prompt_tokens: bool = False,
        draft_confidence: float = 0.0,
        plain_if_blocked: bool = False,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.plain_if_blocked = plain_if_blocked
        self.parts = find_parts(model)
        self.lens = LogitLens(self.parts)
        self.stepper = LayerStepper(self.parts)
        L = self.parts.num_layers
        if draft_layer is not None and not 1 <= draft_layer < L:
            raise ValueError(f"draft_layer must be between 1 and {L - 1} (the model has {L})")
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens must be at least 1, got {draft_tokens}")
        if not 0 <= draft_confidence <= 1:
            raise ValueError(f"draft_confidence must be in [0, 1], got {draft_confidence}")
        self.draft_layer, self.draft_tokens = draft_layer, draft_tokens
        self.draft_head = DraftHead(self.lens, draft_vocab, draft_prompt_tokens)
        self.draft_confidence = float(draft_confidence)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @torch.inference_mode()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int = 64,
        eos_token_id: int | Sequence[int] | None = None,
        chooser: Chooser | None = None,
        stop_strings: Sequence[str] = (),
        on_tokens: Callable[[int, list[int]], None] | None = None,
    ) -> GenerationResult:
        """Generate for a batch of prompts: greedy, or sampled by `chooser`. A row stops at
        EOS, at `max_new_tokens`, or once its text holds one of `stop_strings` (its text is cut
        before it). `on_tokens(row, tokens)` gets each row's new tokens as they come."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        eos = set(eos_ids(self.model, eos_token_id))
        start = time.perf_counter()
        rows, first = self._prefill(prompts, max_new_tokens, chooser or Chooser())
        stops = _StopStrings(self.tokenizer, stop_strings)
        out = _Output(len(prompts), max_new_tokens, eos, on_tokens, stops)
        if self.tracks_exits:  # the first token comes from the full prefill forward
            out.exit_layers = [[] for _ in prompts]
            out.head_skips = [[] for _ in prompts]
            out.full_depth = self.parts.num_layers
        rows.keep(out.add(rows.index, first[:, None], torch.ones(len(first), dtype=torch.long)))
        while len(rows.index):
            self._advance(rows, out)
            out.rounds += 1
        tokens = out.tokens
        return GenerationResult(
            tokens=tokens,
            texts=[
                stops.cut(t) for t in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
            ],
            draft_layer=self.draft_layer if rows.drafting else None,
            drafted=out.drafted,
            accepted=out.accepted,
            rounds=out.rounds,
            wall_time_s=time.perf_counter() - start,
            exit_layers=out.exit_layers,
            head_skips=out.head_skips,
            draft_layers=out.draft_layers,
        )

    # ---------------------------------------------------------------- steps
    def _prefill(self, prompts, max_new_tokens: int, chooser: Chooser | None = None):
        """The prompts' forward into a fresh cache: the rows' state and their first token."""
        enc = encode(self.model, self.tokenizer, prompts)
        mask, positions = enc["attention_mask"], enc["position_ids"]
        cache = DynamicCache(config=self.model.config)
        drafting = self.draft_layer is not None
        if drafting:
            try:
                self._check_window(cache, mask.shape[1] + max_new_tokens + self.draft_tokens)
            except DraftingBlocked:
                if not self.plain_if_blocked:
                    raise
                drafting = False
        logits = self.model(**enc, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        chooser = chooser or Chooser()
        first = chooser.pick(logits)
        extra, valid = self.draft_head.extra_ids(enc["input_ids"], mask)
        index = torch.arange(len(prompts))
        rows = _Rows(index, mask, positions[:, -1] + 1, first, cache, extra, valid, chooser)
        rows.drafting = drafting
        return rows, first

    @staticmethod
    def _check_window(cache: DynamicCache, longest: int) -> None:
        """Drafting crops and re-appends cache positions, which a sliding-window layer allows
        only before its window fills: refuse a generation that could fill it."""
        windows = [getattr(c, "sliding_window", None) for c in cache.layers]
        windows = [w for w in windows if w is not None]
        if any(type(c) not in (DynamicLayer, DynamicSlidingWindowLayer) for c in cache.layers):
            raise ValueError(
                "self-speculative drafting needs a dynamic KV cache; this model's is "
                f"{sorted({type(c).__name__ for c in cache.layers})}. Use draft_layer=None."
            )
        if windows and longest >= min(windows):
            raise DraftingBlocked(
                f"this model attends within a sliding window of {min(windows)} tokens in some "
                f"layers, and prompt + max_new_tokens + draft_tokens reach {longest}: drafting "
                "cannot roll such a cache back. Generate fewer tokens or use draft_layer=None."
            )

    def _feed(self, rows: _Rows, tokens: torch.Tensor) -> dict:
        """Model inputs that append `tokens` [A, S] after each row's last position."""
        S = tokens.shape[1]
        rows.mask = torch.cat([rows.mask, rows.mask.new_ones(len(tokens), S)], dim=1)
        offsets = torch.arange(S, device=tokens.device)
        return {
            "input_ids": tokens,
            "attention_mask": rows.mask,
            "position_ids": rows.position[:, None] + offsets,
        }

    def _advance(self, rows: _Rows, out: _Output) -> None:
        """One step (plain) or one draft-and-verify round for every row still going."""
        if not rows.drafting:
            self._plain_step(rows, out)
        else:
            self._round(rows, out)

    def _plain_step(self, rows: _Rows, out: _Output) -> None:
        inputs = self._feed(rows, rows.pending[:, None])
        logits = self.model(**inputs, cache=rows.cache, use_cache=True, logits_to_keep=1).logits
        rows.position = rows.position + 1
        rows.pending = rows.chooser.pick(logits[:, -1])
        rows.keep(out.add(rows.index, rows.pending[:, None], torch.ones_like(rows.pending)))

    def _round(self, rows: _Rows, out: _Output) -> None:
        """Draft `k` tokens per row from layer d, verify them from layer d + 1, keep each row's
        verified prefix and the full model's next token."""
        k = min(self.draft_tokens, out.most_left(rows.index))
        fed, drafts, states, probs = [rows.pending], [], [], []
        for j in range(k):
            state = self._draft_step(rows, fed[-1], j)
            states.append(state)
            token, q, sure = self._draft_token(rows, state[:, -1])
            drafts.append(token)
            if q is not None:
                probs.append(q)
            fed.append(token)
            if not sure:
                break
        self._settle(rows, out, fed, drafts, states, probs)

    def _settle(self, rows: _Rows, out: _Output, fed, drafts, states, probs) -> None:
        """Verify a round's drafts (`fed`: the pending token and the drafts; `states`: their
        layer-d states) and keep each row's verified prefix and the full model's next token."""
        k = len(drafts)  # a round that stopped early verifies what it drafted
        logits = self._verify(rows, torch.stack(fed[:k], 1), torch.cat(states, 1))  # [A, k, V]
        drafts = torch.stack(drafts, 1)
        agree, full = rows.chooser.accept(drafts, torch.stack(probs, 1) if probs else None, logits)
        kept = torch.clamp(agree + 1, max=k)  # fed positions that stay: the pending + agreed
        new = torch.where(torch.arange(k)[None] < agree[:, None], drafts, full)
        self._crop_rejected(rows, kept, k)
        rows.position = rows.position + kept
        rows.pending = new.gather(1, (kept - 1)[:, None])[:, 0]
        out.drafted[rows.index.numpy()] += k
        out.accepted[rows.index.numpy()] += agree.cpu().numpy()
        rows.keep(out.add(rows.index, new, kept))

    def _draft_token(self, rows: _Rows, hidden: torch.Tensor):
        """(the draft [A], the distribution it was sampled from [A, V] or None when greedy,
        whether some row's draft is confident enough to draft on) from the layer-d state."""
        head = self.draft_head
        logits = head.logits(hidden, rows.extra, rows.valid)
        ids = head.ids(rows.extra)
        q = None
        if rows.chooser.do_sample:
            q = rows.chooser.probs(head.full(logits, ids))
            token = rows.chooser.sample(q)
            top = q.max(-1).values if self.draft_confidence else None
        else:
            best = logits.argmax(-1)
            token = (
                best if ids is None else ids.expand(len(best), -1).gather(1, best[:, None])[:, 0]
            )
            top = logits.float().softmax(-1).max(-1).values if self.draft_confidence else None
        sure = top is None or bool((top >= self.draft_confidence).any())
        return token, q, sure

    def _draft_step(self, rows: _Rows, token: torch.Tensor, j: int) -> torch.Tensor:
        """Feed `token` through layers 1..d; their cache grows by one position. Returns the
        layer-d hidden state [A, 1, H]."""
        inputs = self._feed(rows, token[:, None])
        inputs["position_ids"] = inputs["position_ids"] + j
        seen = {}

        def client(layer_out):
            seen["hidden"] = layer_out.hidden

        self.stepper.run(inputs, client, until=self.draft_layer, cache=rows.cache, use_cache=True)
        return seen["hidden"]

    def _verify(self, rows: _Rows, fed: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """The full model's next-token logits after each of the `k` fed positions [A, k, V],
        from layer d + 1 on the draft's layer-d states, reusing layers 1..d's cache."""
        d, k = self.draft_layer, fed.shape[1]
        early = rows.cache.layers[:d]
        # the model sizes its mask from layer 1's cache: hide the draft positions from it
        held = [(c.keys[..., -k:, :], c.values[..., -k:, :]) for c in early]
        for c in early:
            c.crop(-k)
        inputs = {
            "input_ids": fed,
            "attention_mask": rows.mask,
            "position_ids": rows.position[:, None] + torch.arange(k, device=fed.device),
        }
        seen = {}

        def client(layer_out):
            seen["hidden"] = layer_out.hidden

        try:
            self.stepper.run(
                inputs, client, start=d + 1, start_hidden=states, cache=rows.cache, use_cache=True
            )
        finally:
            for c, (keys, values) in zip(early, held):
                c.update(keys, values)
        return self.lens(seen["hidden"])

    def _crop_rejected(self, rows: _Rows, kept: torch.Tensor, k: int) -> None:
        """Hide each row's rejected positions (the last k - kept of the k fed) and crop the
        tail that every row rejected."""
        T = rows.mask.shape[1]
        fed = torch.arange(k, device=rows.mask.device)[None]
        rows.mask[:, T - k :] *= (fed < kept[:, None].to(fed.device)).to(rows.mask.dtype)
        unused = k - int(kept.max())
        if unused:
            rows.cache.crop(-unused)
            rows.mask = rows.mask[:, :-unused]


class _Output:
    """Tokens emitted per row, with the stopping rules (EOS, max_new_tokens)."""

    def __init__(self, size: int, max_new_tokens: int, eos: set[int], on_tokens, stops):
        self.tokens: list[list[int]] = [[] for _ in range(size)]
        self.max_new_tokens, self.eos, self.on_tokens = max_new_tokens, eos, on_tokens
        self.stops = stops
        self.drafted = np.zeros(size, dtype=np.int64)
        self.accepted = np.zeros(size, dtype=np.int64)
        self.exit_layers: list[list[int]] | None = None  # per token, where exits are tracked
        self.head_skips: list[list[bool]] | None = None  # per token, with exit_layers
        self.draft_layers: list[list[int]] | None = None  # per draft, where it was drafted
        self.full_depth = 0
        self.rounds = 0

    def add_draft_layers(self, index: torch.Tensor, depths: torch.Tensor) -> None:
        """Record the depth [A, k] of each row's drafts in a round."""
        if self.draft_layers is None:
            self.draft_layers = [[] for _ in self.tokens]
        for i, row in zip(index.tolist(), depths.tolist()):
            self.draft_layers[i] += row

    def most_left(self, index: torch.Tensor) -> int:
        return max(self.max_new_tokens - len(self.tokens[i]) for i in index.tolist())

    def add(
        self,
        index: torch.Tensor,
        new: torch.Tensor,
        count: torch.Tensor,
        layers: torch.Tensor | None = None,
        skipped: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Append the first `count[r]` of `new[r]` to each row (where exits are tracked: left
        at `layers[r]`, else at full depth, and whether a check passed, `skipped[r]`, so the
        full head was not read); the mask of rows still going."""
        going = []
        depth = [self.full_depth] * len(index) if layers is None else layers.tolist()
        skips = [False] * len(index) if skipped is None else skipped.tolist()
        for i, row, n, d, k in zip(index.tolist(), new.tolist(), count.tolist(), depth, skips):
            added, stop = [], False
            for t in row[:n]:
                added.append(t)
                if t in self.eos or len(self.tokens[i]) + len(added) >= self.max_new_tokens:
                    stop = True
                    break
            self.tokens[i] += added
            if self.exit_layers is not None:
                self.exit_layers[i] += [d] * len(added)
                self.head_skips[i] += [k] * len(added)
            if self.on_tokens is not None and added:
                self.on_tokens(i, added)
            going.append(not stop and not self.stops.found(self.tokens[i]))
        return torch.tensor(going, dtype=torch.bool)


class _StopStrings:
    """Rows stop once their text holds a stop string; the text is cut before it."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        if any(not s for s in stop_strings):
            raise ValueError("an empty stop string would stop every row at once")
        self.tokenizer, self.strings = tokenizer, tuple(stop_strings)

    def found(self, tokens: list[int]) -> bool:
        if not self.strings:
            return False
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return any(s in text for s in self.strings)

    def cut(self, text: str) -> str:
        at = [text.find(s) for s in self.strings if s in text]
        return text[: min(at)] if at else text


class TextStream:
    """An `on_tokens` callback that writes one row's text as it comes, and exactly the text
    the result will hold: cut before a stop string, so a tail that may be the start of one
    waits until the next tokens show it is not (as does a character still incomplete)."""

    def __init__(self, tokenizer, stop_strings: Sequence[str] = (), write=None):
        self.stops = _StopStrings(tokenizer, stop_strings)
        self.write = write or _write_stdout
        self.tokens: list[int] = []
        self.shown = ""

    def __call__(self, row: int, tokens: list[int]) -> None:
        self.tokens += tokens
        full = self.stops.tokenizer.decode(self.tokens, skip_special_tokens=True)
        text = self.stops.cut(full)
        if text == full:  # no stop yet: hold back what a stop or a character may still take
            text = text.rstrip("\ufffd")
            text = text[: len(text) - self._maybe_stop(text)]
        self._show(text)

    def end(self) -> None:
        """Write what was held back: the row has ended, so it is the result's text."""
        decode = self.stops.tokenizer.decode
        self._show(self.stops.cut(decode(self.tokens, skip_special_tokens=True)))

    def _show(self, text: str) -> None:
        # written text cannot be taken back: should a later decode rewrite it (a tokenizer's
        # space clean-up), go on from its length rather than stall the stream
        if len(text) > len(self.shown):
            self.write(text[len(self.shown) :])
            self.shown = text

    def _maybe_stop(self, text: str) -> int:
        """The length of the longest end of `text` that begins some stop string."""
        return max(
            (n for s in self.stops.strings for n in range(1, len(s)) if text.endswith(s[:n])),
            default=0,
        )


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def eos_ids(model, eos_token_id=None, *, tokenizer=None) -> list[int]:
    """The tokens that end a row: `eos_token_id` if given, else those of the model's
    generation config (where `model.generate` stops), and the tokenizer's EOS if given."""
    if eos_token_id is None:
        config = getattr(model, "generation_config", None) or model.config
        eos_token_id = getattr(config, "eos_token_id", None)
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    if tokenizer is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted({int(i) for i in ids if i is not None})


SUPPORTED = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id"}


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    draft_layer: int | None = None,
    draft_tokens: int = 4,
    exits=None,
    draft_exits=None,
    draft_vocab: Sequence[int] | None = None,
    draft_prompt_tokens: bool = False,
    draft_confidence: float = 0.0,
    plan=None,
    chat: bool = False,
    stop_strings: Sequence[str] = (),
    seed: int | None = None,
    generation_config=None,
    on_tokens: Callable[[int, list[int]], None] | None = None,
    **settings,
) -> GenerationResult:
    """Generate text for a batch of prompts, lossless: greedy output is the plain model's,
    sampled output follows its distribution.

    `settings` are `GenerationConfig` fields (max_new_tokens, do_sample, temperature, top_k,
    top_p, eos_token_id); a `generation_config` gives their defaults. `chat` wraps each prompt
    in the tokenizer's chat template as a user turn. `draft_layer`, `draft_tokens`,
    `draft_vocab`, `draft_prompt_tokens`, `draft_confidence`: see `SelfSpeculativeDecoder`
    (no draft layer: plain decoding, the default). `plan`: a fitted
    `adainfer.drafting.DraftPlanner` or `ExitDraftPlanner`, or a plan file's plan
    (`adainfer.drafting.load_plan`), that sets all of them for this model, or plain decoding
    where it found that drafting does not pay (or where a sliding-window cache would fill
    during this batch); nothing is measured here. `exits`: a fitted
    `adainfer.TokenExitPolicy` turns on the lossy mode, in which every token leaves at its
    own layer (the result's `exit_layers`); it cannot be combined with drafting.
    `draft_exits`: a fitted `TokenExitPolicy` that drafts instead, lossless: each draft
    leaves where the policy says (the result's `draft_layers`), up to `draft_tokens` a
    round, and the full model verifies them (unplanned: an `ExitDraftPlanner` plan decides
    whether that pays)."""
    config = _settings(generation_config, settings)
    drafting = dict(
        draft_layer=draft_layer,
        draft_tokens=draft_tokens,
        draft_vocab=draft_vocab,
        draft_prompt_tokens=draft_prompt_tokens,
        draft_confidence=draft_confidence,
    )
    decoder = _decoder(model, tokenizer, drafting, plan, exits, draft_exits)
    if chat:
        prompts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
            )
            for p in prompts
        ]

    def setting(name, default):  # unset is None; 0 is a value, checked where it is used
        return default if config.get(name) is None else config[name]

    chooser = Chooser(
        do_sample=bool(config.get("do_sample")),
        temperature=setting("temperature", 1.0),
        top_k=setting("top_k", 0),
        top_p=setting("top_p", 1.0),
        generator=None if seed is None else torch.Generator().manual_seed(seed),
    )
    return decoder.generate(
        prompts,
        max_new_tokens=setting("max_new_tokens", 64),
        eos_token_id=config.get("eos_token_id"),
        chooser=chooser,
        stop_strings=stop_strings,
        on_tokens=on_tokens,
    )


def _decoder(model, tokenizer, drafting: dict, plan, exits, draft_exits) -> SelfSpeculativeDecoder:
    """The decoder the arguments ask for: lossy with `exits`; else lossless, drafting as the
    exit policy, the plan or the draft settings say (plain decoding without any)."""
    asked = drafting["draft_layer"] is not None or drafting["draft_vocab"] is not None
    given = [("exits", exits), ("draft_exits", draft_exits), ("plan", plan)]
    chosen = [name for name, x in given if x is not None]
    if len(chosen) + asked > 1:
        got = " and ".join(chosen + ["draft settings"] * asked)
        raise ValueError(
            "choose one of: lossy exits, drafts by an exit policy (draft_exits), a plan, "
            f"draft settings (draft_layer, draft_vocab); not both {got}"
        )
    if exits is not None:
        return exits.decoder(model, tokenizer)
    if draft_exits is not None:
        return draft_exits.draft_decoder(model, tokenizer, drafting["draft_tokens"])
    if plan is not None:
        return plan.decoder(model, tokenizer)
    return SelfSpeculativeDecoder(model, tokenizer, **drafting)


def _settings(generation_config, settings: dict) -> dict:
    """The generation settings that apply: explicit ones over the config's; anything the
    decoder cannot honour (beams, penalties, ...) is an error rather than silently ignored."""
    unknown = set(settings) - SUPPORTED
    if unknown:
        raise ValueError(
            f"unsupported generation settings {sorted(unknown)}; use {sorted(SUPPORTED)}"
        )
    config = {}
    if generation_config is not None:
        changed = generation_config.to_diff_dict()
        ignored = {"transformers_version", "bos_token_id", "pad_token_id", "_from_model_config"}
        unsupported = {
            k: v for k, v in changed.items() if k not in SUPPORTED | ignored and v is not None
        }
        if unsupported:
            raise ValueError(
                f"the generation config sets {sorted(unsupported)}, which adainfer's decoder does "
                f"not support; it honours {sorted(SUPPORTED)}"
            )
        config = {k: getattr(generation_config, k) for k in SUPPORTED}
    return {**config, **settings}
