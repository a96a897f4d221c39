"""Lossy generation, CALM-style: every generated token leaves at its own layer.

At each candidate layer a linear probe on the token's hidden state (no LM head: one LM-head
read costs 3-10 decoder layers of a decode step here, a probe a dot product) estimates the
chance that the logit lens already gives the full model's token there; the token leaves at
the first candidate layer where that chance reaches the calibrated threshold, and is read
through the lens at that depth. Rows of a batch leave at different layers; the layer stepper
drops them from the layers they skip.

The layers a token skipped still need its keys and values, or later tokens would attend to
holes: they are filled from the exit state ("state propagation"): each skipped layer's own
attention block runs on the exit state just far enough to produce its keys and values (with
its own norm, projections, key norm and rotary embedding), and these are written into the
cache.

`TokenExitPolicy.fit` calibrates on unlabeled prompts: it greedy-decodes them with the full
model, reads every generated token at every candidate layer (teacher-forced), trains the
probes on half the prompts and picks the check layers and threshold by Learn-then-Test
(`adainfer.risk`) on the other half: every candidate (a subset of the check layers and a
threshold) is ordered by its changed-token share on the probes' half, safest first, and
tested in that order on the other half with an exact binomial p-value; the cheapest of the
candidates accepted before the first that is not keeps P(changed share > `risk`) <= `delta`.
The share is per token, teacher-forced, and the test treats tokens as exchangeable draws
(tokens of one prompt are not independent, so the level is nominal); in free generation a
changed token changes what follows, and propagated states are not the skipped layers' own, so
the benchmark measures the real rate.

The same policy can draft instead (`ExitDraftDecoder`, `adainfer.generate(draft_exits=...)`):
each draft token leaves where the probe lets it, a round stops after a draft no check let go,
and the full model verifies the round from the policy's first check layer on, so the output
is the plain model's (lossless) and the policy only sets how deep each draft goes.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

from .arch import UnsupportedModel
from .files import write_json
from .generation import Chooser, SelfSpeculativeDecoder, _Output, _Rows
from .lens import LogitLens
from .risk import DELTA, learn_then_test, order_by_risk, p_value
from .schema import DictOf, Int, ListOf, Number, Optional, Record, check
from .stepper import CACHE_ARGS, LayerOutput, LayerStepper, teacher_forced
from .timing import interleaved, timed

FORMAT = "adainfer-token-exits/1"


# ------------------------------------------------------------------ the exit signal
class ExitSignal:
    """A hidden state read on a small vocabulary: the shortlist head's top-1, and what the
    probe sees (top probability and gap on the shortlist, cosine to the layer's input).

    The shortlist is a [K, H] slice of the unembedding taken once per batch, so a read costs
    K / V of the LM head (K = 4096 of Qwen's 151k tokens: under 3%). It is the calibrated
    vocabulary plus every token of the batch's prompts: a token missing from the shortlist
    cannot be its top-1, and the shortlist would be confidently wrong about it (the names a
    prompt defines are what a completion uses most)."""

    def __init__(self, lens: LogitLens, vocab: torch.Tensor, prompts: Sequence[Sequence[int]] = ()):
        head = lens.parts.head
        vocab = torch.as_tensor(vocab, dtype=torch.long)
        if len(prompts):
            extra = torch.as_tensor([t for p in prompts for t in p], dtype=torch.long)
            vocab = torch.unique(torch.cat([vocab, extra]))
        self.lens, self.vocab = lens, vocab.to(head.weight.device)
        self.weight = head.weight.detach()[self.vocab]
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.detach()[self.vocab]

    def __call__(self, hidden: torch.Tensor, before: torch.Tensor):
        """(features [A, 3] float32, shortlist logits [A, K]) for hidden states [A, H]; the
        token at shortlist position i is `vocab[i]`."""
        normed = self.lens.normed(hidden)
        logits = self.lens.finish(torch.nn.functional.linear(normed, self.weight, self.bias))
        top = logits.float().softmax(-1).topk(2, dim=-1).values
        cos = torch.nn.functional.cosine_similarity(hidden.float(), before.float(), dim=-1)
        return torch.stack([top[:, 0], top[:, 0] - top[:, 1], cos], -1), logits


def frequent_tokens(sequences: Iterable[Sequence[int]], size: int) -> torch.Tensor:
    """The `size` most frequent token ids in `sequences` (fewer if fewer occur)."""
    counts = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences]))
    order = np.argsort(-counts, kind="stable")[: min(size, int((counts > 0).sum()))]
    return torch.as_tensor(np.sort(order))


@dataclass
class ExitTrace:
    """Teacher-forced reads of generated tokens at every layer."""

    vocab: np.ndarray  # [K] the run-time shortlist (the odd prompts' were read on it)
    features: np.ndarray  # [N, L, 3] ExitSignal features per token and layer
    agree: np.ndarray  # [N, L] the shortlist top-1 there is the full model's token
    settled: np.ndarray  # [N] earliest layer from which the full lens top-1 stays final
    prompt: np.ndarray  # [N] prompt index of each token
    hidden: np.ndarray | None = None  # [N, K, H] states at the deepest K layers (float16)

    @property
    def num_layers(self) -> int:
        return self.agree.shape[1]

    def hidden_at(self, layer: int) -> np.ndarray:
        """[N, H] float32 the tokens' hidden states after `layer` (1-based)."""
        K = 0 if self.hidden is None else self.hidden.shape[1]
        if layer <= self.num_layers - K:
            raise ValueError(
                f"the trace keeps hidden states of its deepest {K} layers, not of layer {layer}: "
                f"trace with hidden_layers={self.num_layers - layer + 1} or more"
            )
        return self.hidden[:, layer - 1 - (self.num_layers - K)].astype(np.float32)


@torch.inference_mode()
def trace_exits(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    vocab_size: int = 4096,
    vocab: Sequence[int] | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    training_misses: bool = True,
    hidden_layers: int = 0,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> ExitTrace:
    """Greedy-decode `prompts` with the full model, take the `vocab_size` most frequent
    tokens of the even prompts and their outputs as the vocabulary (or the given `vocab`, a
    fitted policy's), and read each generated token at every layer (teacher-forced) on the
    vocabulary plus its batch's prompt tokens.

    The even prompts train the probes. Read on a shortlist made from their own tokens, none
    of their tokens would ever miss it, so the probes would never learn what a miss looks like
    (the last layer's probe, seeing agreement only, would pass every token, and the check
    that skips the full head could never be planned). With `training_misses` (and no `vocab`
    given, and at least 3 prompts) each half of them (prompts 0 and 2 mod 4) is read on a
    shortlist made from the other half only, so some of their tokens miss it as a new
    prompt's do; the odd prompts, which plan the threshold, are read exactly as without it.
    `hidden_layers`: also keep every token's hidden state at the deepest this-many layers
    (float16; what probes that read the hidden state train on)."""
    decoder = SelfSpeculativeDecoder(model, tokenizer)
    starts = range(0, len(prompts), batch_size)
    batches = [list(prompts[s : s + batch_size]) for s in starts]
    outputs = [decoder.generate(b, max_new_tokens=max_new_tokens).tokens for b in progress(batches)]
    generated = [t for out in outputs for t in out]
    return read_exits(
        decoder,
        prompts,
        generated,
        vocab_size=vocab_size,
        vocab=vocab,
        batch_size=batch_size,
        training_misses=training_misses,
        hidden_layers=hidden_layers,
    )


@torch.inference_mode()
def read_exits(
    decoder,
    prompts: Sequence[str],
    generated: Sequence[Sequence[int]],
    *,
    vocab_size: int = 4096,
    vocab: Sequence[int] | None = None,
    batch_size: int = 8,
    training_misses: bool = True,
    hidden_layers: int = 0,
) -> ExitTrace:
    """`trace_exits` of outputs already generated (`generated[i]`: the full model's greedy
    tokens after `prompts[i]`), read by `decoder` (a `SelfSpeculativeDecoder`)."""
    if len(generated) != len(prompts):
        raise ValueError(
            f"{len(generated)} outputs for {len(prompts)} prompts: give one per prompt, in order"
        )
    prompt_ids = decoder.tokenizer(list(prompts))["input_ids"]

    def made_from(rows):
        return frequent_tokens(
            [*(prompt_ids[i] for i in rows), *(generated[i] for i in rows)], vocab_size
        )

    def read(rows, shortlist, keep=lambda i: True):
        """Rows in batches, each on `shortlist` plus the batch's prompt tokens; the tokens of
        the prompts `keep` passes."""
        shortlist, out = torch.as_tensor(shortlist, dtype=torch.long), []
        for s in range(0, len(rows), batch_size):
            index = list(rows[s : s + batch_size])
            signal = ExitSignal(decoder.lens, shortlist, [prompt_ids[i] for i in index])
            batch, outs = [prompts[i] for i in index], [generated[i] for i in index]
            x = _trace_batch(decoder, signal, batch, outs, index, hidden_layers)
            kept = np.array([keep(i) for i in x[3]], dtype=bool)  # x[3]: the prompts
            out.append(tuple(a[kept] for a in x))
        return out

    # from the probes' half only, so the threshold's half meets tokens it lacks, as new
    # prompts will
    full = made_from(range(0, len(prompts), 2)) if vocab is None else vocab
    quarters = [range(q, len(prompts), 4) for q in (0, 2)]
    if vocab is None and training_misses and all(quarters):
        # the threshold's (odd) prompts in the same batches as without: the same reads
        traced = read(range(len(prompts)), full, keep=lambda i: i % 2 == 1)
        traced += read(quarters[0], made_from(quarters[1]))
        traced += read(quarters[1], made_from(quarters[0]))
    else:
        traced = read(range(len(prompts)), full)
    features, agree, settled, prompt, hidden = (np.concatenate(x) for x in zip(*traced))
    order = np.argsort(prompt, kind="stable")  # every prompt's tokens together, in order
    full = torch.as_tensor(full, dtype=torch.long).numpy()
    kept = _compact(hidden[order]) if hidden_layers else None
    return ExitTrace(full, features[order], agree[order], settled[order], prompt[order], kept)


def _compact(states: np.ndarray) -> np.ndarray:
    """float16 states (half the memory) unless a value would overflow it (Gemma's residual
    stream can pass 65504): then float32."""
    if not len(states) or np.abs(states).max() < np.finfo(np.float16).max:
        return states.astype(np.float16)
    return states


@torch.inference_mode()
def changed_tokens(model, tokenizer, prompts: Sequence[str], outputs, *, batch_size: int = 8):
    """Per row, which generated tokens the full model would not have chosen greedily after
    the same prefix (teacher-forced on the row's own output): the per-token risk a lossy
    generation actually ran, beyond the first difference from plain greedy."""
    changed = []
    for s in range(0, len(prompts), batch_size):
        rows = outputs[s : s + batch_size]
        inputs, width = teacher_forced(model, tokenizer, prompts[s : s + batch_size], rows)
        full = model(**inputs, logits_to_keep=width).logits.argmax(-1).cpu()
        changed += [(full[r, : len(o)] != torch.as_tensor(o)).tolist() for r, o in enumerate(rows)]
    return changed


def _trace_batch(
    decoder, signal: ExitSignal, prompts, generated, index: Sequence[int], hidden_layers=0
):
    """One teacher-forced forward over prompt + generated tokens through the stepper; `index`:
    the prompts' places in the calibration set; hidden states kept at the deepest
    `hidden_layers` layers."""
    parts, lens = decoder.parts, decoder.lens
    lengths = [len(g) for g in generated]
    inputs, width = teacher_forced(parts.model, decoder.tokenizer, prompts, generated)
    B, L = len(prompts), parts.num_layers
    K = min(hidden_layers, L)
    states = torch.zeros(B, width, K, parts.model.config.hidden_size)
    feats = torch.zeros(B, width, L, 3)
    top1 = torch.zeros(B, width, L, dtype=torch.long)
    short = torch.zeros(B, width, L, dtype=torch.long)

    def client(out: LayerOutput):
        hidden = out.hidden[:, -width:].reshape(B * width, -1)
        before = out.hidden.new_empty(0) if out.layer == 1 else client.previous
        top1[:, :, out.layer - 1] = lens(hidden).argmax(-1).view(B, width).cpu()
        if out.layer > 1:
            f, logits = signal(hidden, before)
            feats[:, :, out.layer - 1] = f.view(B, width, -1).cpu()
            short[:, :, out.layer - 1] = signal.vocab[logits.argmax(-1)].view(B, width).cpu()
        if out.layer > L - K:
            states[:, :, out.layer - 1 - (L - K)] = hidden.view(B, width, -1).cpu()
        client.previous = hidden

    LayerStepper(parts).run(inputs, client, use_cache=False)
    keep = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    top1, short = top1[keep].numpy(), short[keep].numpy()
    final = top1[:, -1:]
    stays = np.flip(np.cumprod(np.flip(top1 == final, 1), 1), 1)  # top-1 final from here on
    settled = L - stays.sum(1) + 1
    prompt = np.repeat(np.asarray(index), lengths)
    return feats[keep].numpy(), short == final, settled, prompt, states[keep].numpy()


@torch.inference_mode()
def measure_exit_costs(model, tokenizer, prompts, vocab, *, samples: int = 30) -> ExitCosts:
    """Time a plain KV-cached decode step of `prompts` (one row each) and, back to back with
    it, the full LM head, one exit check and one layer's state propagation on the same rows
    (`timing.interleaved`); each as the median of its times over the step's median. With
    more than one prompt, the same parts on one row too: what of each does not shrink with
    fewer rows (`ExitCosts.fixed`)."""
    decoder = SelfSpeculativeDecoder(model, tokenizer)
    parts, L = decoder.parts, decoder.parts.num_layers
    signal = ExitSignal(decoder.lens, torch.as_tensor(vocab), tokenizer(list(prompts))["input_ids"])
    propagation = StatePropagation(parts) if parts.spec.attn_norm else None
    B = len(prompts)
    runners = _cost_parts(decoder, signal, propagation, list(prompts))
    if B > 1:
        one = _cost_parts(decoder, signal, propagation, list(prompts[:1]))
        runners.update({f"{name}@1": fn for name, fn in one.items()})
    runners = {name: (lambda i, fn=fn: timed(fn)) for name, fn in runners.items()}
    seconds, _ = interleaved(runners, samples, warmup_batches=3)
    median = {name: float(np.median(s)) for name, s in seconds.items()}
    share = {name: median[name] / median["step"] for name in median}
    fixed = {}
    if B > 1:
        median["body"], median["body@1"] = (
            median["step"] - median["head"],
            median["step@1"] - median["head@1"],
        )
        for name in ("body", "head", "check", "propagate"):
            if name in median:
                ratio = median[f"{name}@1"] / median[name]  # 1/B if all per row, 1 if none
                fixed[name] = float(np.clip((ratio - 1 / B) / (1 - 1 / B), 0.0, 1.0))
    return ExitCosts(
        layer=(1 - share["head"]) / L,  # the rest of a step is mostly its layers
        head=share["head"],
        check=share["check"],
        propagate=share.get("propagate", 0.0),
        rows=B,
        fixed=fixed,
    )


def _cost_parts(decoder, signal, propagation, prompts) -> dict[str, Callable[[], object]]:
    """The parts of a decode step of `prompts`, each a call to time."""
    rows, _ = decoder._prefill(prompts, 1)
    model, L = decoder.parts.model, decoder.parts.num_layers
    inputs = decoder._feed(rows, rows.pending[:, None])
    hidden = torch.randn(len(prompts), model.config.hidden_size, dtype=model.dtype)
    hidden = hidden.to(rows.mask.device)
    index = torch.arange(len(prompts))

    def step():
        with propagation.recording() if propagation else nullcontext():
            model(**inputs, cache=rows.cache, use_cache=True, logits_to_keep=1)
        rows.cache.crop(-1)

    out = {
        "step": step,
        "head": lambda: decoder.lens(hidden),
        "check": lambda: signal(hidden, hidden),
    }
    if propagation is not None:
        out["propagate"] = lambda: propagation.keys_values(L, hidden, index)
    return out


# ------------------------------------------------------------------ the policy
class TokenExitPolicy:
    """When a generated token may leave early: a probe per candidate layer, one threshold.

    A token leaves at the first candidate layer whose probe logit reaches `threshold_`, with
    the shortlist's top-1 as its token. The last layer can be a candidate too: there a token
    that passes skips the full LM head (3-10 decoder layers of a decode step here).

    Parameters
    ----------
    risk : epsilon, the share of tokens allowed to differ from the full model's
        (teacher-forced, on prompts like the calibration ones).
    delta : the chance, over the draw of the calibration prompts, that the plan's share is
        above `risk` after all (Learn-then-Test on the held-out half; None: the held-out
        share itself must be <= risk, no guarantee). Not a margin for other prompts.
    vocab_size : size of the shortlist the signal reads (the most frequent calibration tokens).
    min_agreement : a layer is a candidate only where the shortlist top-1 is the full
        model's token for at least this share of training tokens (earlier layers would cost
        a check and almost never pass it).
    max_checks : at most this many candidate layers, the deepest that qualify; the plan
        keeps the subset of them that makes a step cheapest (none: plain decoding).
    cost_batch_size : the decode batch size at which `fit` measures what a layer, the head,
        a check and a propagation cost, and how much of each a row that leaves saves (the
        plan depends on it: at batch 8 a layer skipped by some rows of a step is still read
        for the others; see `ExitCosts`).
    C : inverse L2 strength of each layer's logistic-regression probe; None: 1.0 on the 3
        shortlist features, 0.001 with the hidden state (hundreds of inputs, a few thousand
        tokens: the best of those planned in results/generation/probes).
    hidden_state : the probes also read the token's hidden state at their layer (CALM's
        learned early-exit classifier; a dot product more per check, no LM head). `fit`
        then traces the deepest `2 * max_checks` layers' states, and only those layers can
        be candidates. On Qwen2.5-Coder-0.5B its plans were cheaper at 0.5% risk and no
        better at 1% (results/generation/probes).
    """

    def __init__(
        self,
        risk: float = 0.01,
        *,
        vocab_size: int = 4096,
        min_agreement: float = 0.5,
        max_checks: int = 4,
        cost_batch_size: int = 1,
        delta: float | None = DELTA,
        C: float | None = None,
        seed: int = 0,
        hidden_state: bool = False,
    ):
        self.risk, self.vocab_size = risk, vocab_size
        self.min_agreement, self.max_checks = min_agreement, max_checks
        self.cost_batch_size, self.delta = cost_batch_size, delta
        self.C, self.seed, self.hidden_state = C, seed, hidden_state

    # -------------------------------------------------------------- fitting
    def fit(self, model, tokenizer, prompts: Sequence[str], **trace_kw) -> TokenExitPolicy:
        """Calibrate on unlabeled `prompts` (see the module doc); `trace_kw` go to
        `trace_exits` (max_new_tokens, batch_size, progress)."""
        if isinstance(prompts, str) or len(prompts) < 2:
            raise ValueError("calibration needs a list of at least 2 prompts")
        trace_kw.setdefault("hidden_layers", self.trace_hidden_layers)
        trace = trace_exits(model, tokenizer, prompts, vocab_size=self.vocab_size, **trace_kw)
        rows = [prompts[i % len(prompts)] for i in range(self.cost_batch_size)]
        costs = measure_exit_costs(model, tokenizer, rows, trace.vocab)
        self.model_ = _model_id(model)
        return self.fit_trace(trace, costs)

    def fit_trace(self, trace: ExitTrace, costs: ExitCosts | None = None) -> TokenExitPolicy:
        """Probes on the even prompts' tokens; the check layers and threshold on the odd
        prompts' tokens, planned against `costs` (None: only layers count, checks are free):
        the candidates ordered on half of the odd prompts, tested on the other half. (The
        probes' own tokens cannot order them: the probes were fitted on them, and the
        shortlist was built from those prompts.)"""
        if not 0 <= self.risk < 1:
            raise ValueError(f"risk must be in [0, 1), got {self.risk}")
        train, _, test = _thirds(trace.prompt)  # test holds every odd prompt's if too few
        if not train.any() or not test.any():
            raise ValueError("calibration needs tokens from at least 2 prompts")
        chosen = [layer - 1 for layer in self.candidates(trace)]
        self.model_ = getattr(self, "model_", "")
        self.num_layers_, self.vocab_ = trace.num_layers, trace.vocab
        costs = costs or ExitCosts.layers_only(trace.num_layers)
        self.costs_ = asdict(costs)
        probes = [self._probe(self._inputs(trace, i)[train], trace.agree[train, i]) for i in chosen]
        width = 3 + (trace.hidden.shape[2] if self.hidden_state and self.max_checks else 0)
        self.coef_ = np.array([w for w, _ in probes]).reshape(len(chosen), width)
        self.intercept_ = np.array([b for _, b in probes])
        self.layers_ = [i + 1 for i in chosen]
        scores = self._scores(trace, chosen)
        halves = _halves(trace, scores, chosen, costs.rows)
        layers, self.threshold_, self.calibration_ = _plan(
            *halves, self.layers_, trace.num_layers, self.risk, self.delta, costs
        )
        self.calibration_.update(
            _report(trace.settled[test], self.calibration_, trace.num_layers, costs, halves[2])
        )
        keep = [self.layers_.index(x) for x in layers]
        self.layers_, self.coef_, self.intercept_ = layers, self.coef_[keep], self.intercept_[keep]
        return self

    def candidates(self, trace: ExitTrace) -> list[int]:
        """The layers `fit_trace` trains probes at and picks its checks from: the deepest
        `max_checks` whose shortlist top-1 is the full model's on at least `min_agreement`
        of the probes' tokens (the even prompts'); never layer 1, and with `hidden_state`
        only layers whose states the trace kept."""
        rates = trace.agree[_thirds(trace.prompt)[0]].mean(0)
        rates[0] = -1  # layer 1 has no input to compare with
        if self.hidden_state and self.max_checks:
            if trace.hidden is None:
                raise ValueError(
                    "hidden_state probes read hidden states the trace lacks: trace with "
                    f"trace_exits(..., hidden_layers={self.trace_hidden_layers})"
                )
            rates[: trace.num_layers - trace.hidden.shape[1]] = -1
        qualify = [i + 1 for i, r in enumerate(rates) if r >= self.min_agreement]
        return qualify[max(len(qualify) - self.max_checks, 0) :]

    def _probe(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
        """A logistic regression on standardised features, folded back to raw features."""
        from sklearn.linear_model import LogisticRegression

        if y.all() or not y.any():  # one class: a constant verdict
            return np.zeros(x.shape[1]), 20.0 if y.all() else -20.0
        mean, scale = x.mean(0), x.std(0) + 1e-6
        clf = LogisticRegression(C=self._C, max_iter=2000, random_state=self.seed)
        clf.fit((x - mean) / scale, y)
        w = clf.coef_[0] / scale
        return w, float(clf.intercept_[0] - (w * mean).sum())

    def _inputs(self, trace: ExitTrace, col: int) -> np.ndarray:
        """[N, F] what the probe at layer `col` + 1 reads: the shortlist features, and with
        `hidden_state` the hidden state after them."""
        x = trace.features[:, col]
        return np.concatenate([x, trace.hidden_at(col + 1)], 1) if self.hidden_state else x

    def _scores(self, trace: ExitTrace, cols: Sequence[int]) -> np.ndarray:
        """[N, C] probe logits of the trace's tokens at the probes' layers `cols` (0-based)."""
        scores = np.zeros((len(trace.prompt), len(cols)))
        for j, (col, w, b) in enumerate(zip(cols, self.coef_, self.intercept_, strict=True)):
            scores[:, j] = self._inputs(trace, col) @ w + b
        return scores

    @property
    def trace_hidden_layers(self) -> int:
        """How many of the deepest layers' hidden states `fit` traces (its candidates lie
        among them)."""
        return 2 * self.max_checks if self.hidden_state else 0

    @property
    def hidden_layers_(self) -> int:
        """How many of the deepest layers' hidden states a trace needs for `replay`."""
        if not (self.hidden_state and self.layers_):
            return 0
        return self.num_layers_ - min(self.layers_) + 1

    # -------------------------------------------------------------- use
    def replay(self, trace: ExitTrace) -> dict[str, np.ndarray]:
        """What the policy does to each traced token, teacher-forced: the layer it leaves at
        ("depth"; num_layers where no check passed), the checks it ran, whether one passed
        (its token then comes from the shortlist, not the full head) and whether its token
        differs from the full model's ("changed")."""
        cols = [layer - 1 for layer in self.layers_]
        scores = self._scores(trace, cols)
        return _left(scores, trace.agree[:, cols], self.threshold_, self.layers_, trace.num_layers)

    def decision_function(
        self, layer: int, features: torch.Tensor, hidden: torch.Tensor | None = None
    ) -> torch.Tensor:
        """[A] probe logits at a candidate `layer` for ExitSignal features [A, 3] (and, with
        `hidden_state`, the rows' hidden states there [A, H])."""
        w, b = self._torch(features.device)
        c = self.layers_.index(layer)
        score = features @ w[c, :3] + b[c]
        if self.hidden_state:
            if hidden is None:
                raise ValueError("this policy's probes read the hidden state: pass it")
            score = score + hidden.to(w.device, torch.float32) @ w[c, 3:]
        return score

    def _torch(self, device):
        cached = getattr(self, "_weights", None)
        if cached is None or cached[0].device != torch.device(device):
            w = torch.tensor(self.coef_, dtype=torch.float32, device=device)
            b = torch.tensor(self.intercept_, dtype=torch.float32, device=device)
            self._weights = cached = (w, b)
        return cached

    def check_model(self, model) -> None:
        layers, vocab = model.config.num_hidden_layers, model.get_output_embeddings().weight
        if layers != self.num_layers_ or int(self.vocab_.max()) >= vocab.shape[0]:
            raise ValueError(
                f"this exit policy was calibrated on {self.model_ or 'another model'} "
                f"({self.num_layers_} layers); the model has {layers} layers and "
                f"{vocab.shape[0]} tokens: calibrate one for this model"
            )
        size = model.config.hidden_size
        if self.hidden_state and len(self.coef_) and self.coef_.shape[1] != 3 + size:
            raise ValueError(
                f"this exit policy's probes read {self.coef_.shape[1] - 3}-dim hidden states; "
                f"the model's are {size}-dim: calibrate one for this model"
            )

    def decoder(self, model, tokenizer) -> EarlyExitDecoder:
        """The lossy decoder that generates with this policy (`adainfer.generate(exits=...)`)."""
        return EarlyExitDecoder(model, tokenizer, self)

    def draft_decoder(
        self, model, tokenizer, draft_tokens: int = 4, *, plain_if_blocked: bool = False
    ) -> SelfSpeculativeDecoder:
        """The lossless decoder whose drafts leave where this policy says
        (`adainfer.generate(draft_exits=...)`); plain decoding where the calibration
        certified no exit (no check layer), so nothing could leave early to draft.
        `plain_if_blocked`: see `SelfSpeculativeDecoder` (a plan's drafts are advice)."""
        if not self.layers_:
            self.check_model(model)
            return SelfSpeculativeDecoder(model, tokenizer)
        return ExitDraftDecoder(
            model, tokenizer, self, draft_tokens, plain_if_blocked=plain_if_blocked
        )

    # -------------------------------------------------------------- files
    def to_dict(self) -> dict:
        """The fitted policy as JSON-ready data (what `save` writes)."""
        return {
            "format": FORMAT,
            "params": self._file_params(),
            "model": self.model_,
            "num_layers": self.num_layers_,
            "layers": self.layers_,
            "coef": self.coef_.tolist(),
            "intercept": self.intercept_.tolist(),
            "threshold": self.threshold_,
            "calibration": self.calibration_,
            "costs": self.costs_,
            "vocab": self.vocab_.tolist(),
        }

    def save(self, path) -> None:
        write_json(path, self.to_dict())

    def _file_params(self) -> dict:
        """The parameters as earlier adainfer versions read them: C as the value used,
        `hidden_state` only where set."""
        params = {k: getattr(self, k) for k in _PARAM_SPECS if k not in ("confidence", "C")}
        params["C"] = self._C
        if not self.hidden_state:
            del params["hidden_state"]
        return params

    @property
    def _C(self) -> float:
        return self.C if self.C is not None else (1e-3 if self.hidden_state else 1.0)

    @classmethod
    def from_dict(cls, data, where: str = "the file") -> TokenExitPolicy:
        """The policy `to_dict` gave; anything else is a ValueError naming the field under
        `where` (its vocabulary indexes the LM head, its layers the decoder)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"format {_get(data, 'format')!r}, expected {FORMAT!r}")
        check(data, _FILE, where)
        _check_layers(data)
        params = dict(data["params"])
        if "confidence" in params:  # a file from before Learn-then-Test: its test's level
            confidence = params.pop("confidence")
            params.setdefault("delta", None if confidence is None else 1 - confidence)
        policy = cls(**params)
        policy.model_, policy.layers_ = data["model"], list(data["layers"])
        policy.num_layers_ = data["num_layers"]
        coef = np.asarray(data["coef"], dtype=np.float64)
        policy.coef_ = coef.reshape(len(data["layers"]), -1) if len(coef) else np.zeros((0, 3))
        policy.intercept_ = np.asarray(data["intercept"], dtype=np.float64)
        policy.vocab_ = np.asarray(data["vocab"], dtype=np.int64)
        policy.costs_ = dict(data["costs"])
        policy.threshold_, policy.calibration_ = float(data["threshold"]), data["calibration"]
        return policy

    @classmethod
    def load(cls, path) -> TokenExitPolicy:
        """A policy that `save` wrote; a damaged or edited file is a ValueError naming it."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            raise ValueError(
                f"{path} is not a readable adainfer token-exit policy ({err}); make one with "
                "`adainfer calibrate-exits`"
            ) from None


def _get(data, key):
    return data.get(key) if isinstance(data, dict) else None


def _check_layers(data: dict) -> None:
    """Layers ascending inside the model, one probe (3 weights) and intercept per layer."""
    layers, n = data["layers"], data["num_layers"]
    if layers != sorted(set(layers)) or any(not 1 <= l <= n for l in layers):
        raise ValueError(f"layers {layers} are not ascending layers of 1..{n}")
    if len(data["coef"]) != len(layers) or len(data["intercept"]) != len(layers):
        raise ValueError("layers, coef and intercept differ in length")
    if data["params"].get("hidden_state"):
        if len({len(w) for w in data["coef"]}) > 1 or any(len(w) <= 3 for w in data["coef"]):
            raise ValueError("each layer's coef must hold 3 weights and the hidden state's")
    elif any(len(w) != 3 for w in data["coef"]):
        raise ValueError("each layer's coef must hold 3 weights (top_prob, gap, cosine)")
    if not data["vocab"]:
        raise ValueError("the vocabulary is empty")


_PARAM_SPECS = {
    "risk": Number(low=0, high=1),
    "vocab_size": Int(1),
    "min_agreement": Number(low=0, high=1),
    "max_checks": Int(0),
    "cost_batch_size": Int(1),
    "delta": Optional(Number(low=0, high=1)),
    "confidence": Optional(Number(low=0, high=1)),  # files before Learn-then-Test
    "C": Optional(Number(low=0)),
    "seed": int,
    "hidden_state": bool,
}
_FILE = Record(
    {
        "format": str,
        "params": Record(_PARAM_SPECS, optional=tuple(_PARAM_SPECS), extra=False),
        "model": Optional(str),
        "num_layers": Int(1),
        "layers": ListOf(Int(1)),
        "coef": ListOf(ListOf(float)),
        "intercept": ListOf(float),
        "threshold": Number(finite=False),  # inf: no token passes (plain decoding)
        "calibration": DictOf(Optional(Number(finite=False, nan=True))),
        "costs": Record(
            {
                **{k: Number(low=0) for k in ("layer", "head", "check", "propagate")},
                "rows": Int(1),
                "fixed": DictOf(Number(low=0, high=1)),
            },
            optional=("rows", "fixed"),  # files from before batch-aware costs
        ),
        "vocab": ListOf(Int(0)),
    }
)


@dataclass
class ExitCosts:
    """What the parts of a decode step of `rows` rows cost, as shares of one plain step.

    At `rows` > 1 a part run on fewer rows (rows that left skip the layers above) is cheaper
    only by its per-row share: its weights are read once whatever the rows (on this CPU a
    layer at batch 8 takes about 1.3x its batch-1 time, not 8x). `fixed` holds per part
    ("body": the layers and the rest of a step, "head", "check", "propagate") the share that
    does not shrink: the part on n of `rows` rows costs cost * (f + (1 - f) * n / rows), and
    nothing when no row runs it."""

    layer: float  # one decoder layer
    head: float  # the full LM head read
    check: float  # one exit check (shortlist read and probe)
    propagate: float  # one skipped layer's keys and values from the exit state
    rows: int = 1  # the batch size these were timed at
    fixed: dict[str, float] = field(default_factory=dict)

    @classmethod
    def layers_only(cls, num_layers: int) -> ExitCosts:
        """Free checks and head: only layers count (what the per-token oracle counts)."""
        return cls(layer=1 / num_layers, head=0.0, check=0.0, propagate=0.0)

    def step(self, exit_layer, checks, passed, num_layers: int, steps=None, at=()) -> np.ndarray:
        """[N] cost of each token's step: the layers it ran and the ones it filled, its checks,
        the full head unless a check passed, and the rest of a plain step. With `steps` (the
        decode step of each token) and `rows` > 1, the parts are costed per step on the rows
        that ran them, with the check layers `at`; each token then carries the ratio of the
        steps' total cost to plain steps'."""
        if self.rows > 1 and steps is not None:
            return self._batched(np.asarray(exit_layer), passed, steps, at, num_layers)
        rest = 1 - num_layers * self.layer - self.head
        skipped = num_layers - exit_layer
        return (
            rest
            + exit_layer * self.layer
            + skipped * self.propagate
            + checks * self.check
            + np.where(passed, 0.0, self.head)
        )

    def _part(self, name: str, n: np.ndarray, num_layers: int) -> np.ndarray:
        """What part `name` costs on n rows of a step (n an array)."""
        fixed = self.fixed.get("body" if name in ("layer", "rest") else name, 0.0)
        cost = 1 - num_layers * self.layer - self.head if name == "rest" else getattr(self, name)
        return np.where(n > 0, cost * (fixed + (1 - fixed) * n / self.rows), 0.0)

    def _batched(self, depth, passed, steps, at, L: int) -> np.ndarray:
        _, g = np.unique(steps, return_inverse=True)
        G = int(g.max()) + 1 if len(g) else 0
        n = np.bincount(g, minlength=G)
        hist = np.zeros((G, L + 2))
        np.add.at(hist, (g, depth), 1)
        active = hist[:, ::-1].cumsum(1)[:, ::-1]  # [:, l]: rows still running at layer l
        ran = active[:, 1 : L + 1]
        late = np.bincount(g, weights=~np.asarray(passed, dtype=bool), minlength=G)
        cost = (
            self._part("rest", n, L)
            + self._part("layer", ran, L).sum(1)
            + self._part("propagate", n[:, None] - ran, L).sum(1)
            + self._part("check", active[:, list(at)], L).sum(1)
            + self._part("head", late, L)
        )
        plain = self._part("rest", n, L) + L * self._part("layer", n, L) + self._part("head", n, L)
        return np.full(len(depth), cost.sum() / plain.sum() if G else 1.0)


@dataclass
class _Half:
    """One half of the calibration tokens: probe logits and whether each candidate layer's
    shortlist top-1 is the full model's token, [N, C] each."""

    scores: np.ndarray
    agree: np.ndarray
    steps: np.ndarray | None = None  # [N] the decode step of each token (see `_decode_steps`)

    def replay(self, subset, threshold, layers, num_layers, costs: ExitCosts):
        """(changed [N], exit depth [N], passed [N], step cost [N]) of one candidate."""
        sub = list(subset)
        at = [layers[c] for c in sub]
        x = _left(self.scores[:, sub], self.agree[:, sub], threshold, at, num_layers)
        cost = costs.step(x["depth"], x["checks"], x["passed"], num_layers, self.steps, at)
        return x["changed"], x["depth"], x["passed"], cost


def _thirds(prompt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token masks: the probes' (even prompts); the odd prompts that order the candidate
    layers (1 mod 4) and those that test them (3 mod 4), both all the odd prompts when there
    are too few to cut (the order is then no longer fixed in advance)."""
    train, held = prompt % 2 == 0, prompt % 2 == 1
    order, test = held & (prompt % 4 == 1), held & (prompt % 4 == 3)
    if not test.any():
        order = test = held
    return train, order, test


def _halves(trace: ExitTrace, scores: np.ndarray, cols, rows: int) -> list[_Half]:
    """The three `_Half`s `_plan` takes, of probe logits `scores` [N, C] on the trace's
    layers `cols` (0-based), decode steps counted for `rows` prompts at a time."""
    return [
        _Half(scores[m], trace.agree[m][:, list(cols)], _decode_steps(trace.prompt[m], rows))
        for m in _thirds(trace.prompt)
    ]


def _decode_steps(prompt: np.ndarray, rows: int) -> np.ndarray:
    """[N] which decode step each token is in, were the prompts (their tokens in a row, in
    order) decoded `rows` at a time: the batch's rank times the longest output, plus the
    token's position in its prompt's output."""
    if not len(prompt):
        return np.zeros(0, dtype=np.int64)
    new = np.r_[True, prompt[1:] != prompt[:-1]]
    starts = np.flatnonzero(new)
    position = np.arange(len(prompt)) - np.repeat(starts, np.diff(np.r_[starts, len(prompt)]))
    rank = np.cumsum(new) - 1
    return rank // rows * (int(position.max()) + 1) + position


def _plan(train, order: _Half, held: _Half, layers, num_layers, epsilon, delta, costs, grid=100):
    """The check layers (a subset of the candidates) and probe threshold that make a step
    cheapest on the `held` tokens among the candidates Learn-then-Test accepts there, tested
    in the order of their changed share on the `order` tokens (thresholds from the `train`
    tokens' scores; see the module doc); no checks at all (plain decoding) when none is
    accepted or none beats a plain step."""
    candidates, estimated, later = [], [], []
    for size in range(1, len(layers) + 1):
        for subset in combinations(range(len(layers)), size):
            scores = train.scores[:, list(subset)]
            for t in np.unique(np.quantile(scores, np.linspace(0, 1, grid))):
                changed, depth, _, _ = order.replay(subset, t, layers, num_layers, costs)
                candidates.append((subset, float(t)))
                estimated.append(changed.mean())
                later.append(depth.mean())
    n = len(held.scores)
    replays = [held.replay(c, t, layers, num_layers, costs) for c, t in candidates]
    losses = np.array([r[0].sum() for r in replays])
    if epsilon <= 0 or not candidates:
        accepted = np.array([], dtype=int)
    elif delta is None:
        accepted = np.flatnonzero(losses <= epsilon * n)
    else:
        order = order_by_risk(estimated, later)
        accepted = learn_then_test(losses, n, order, epsilon, delta)
    step = {i: float(replays[i][3].mean()) for i in accepted}
    best = min(step, key=step.get, default=None)
    report = {"candidates": len(candidates), "accepted": int(len(accepted)), "tokens": n}
    if best is None or step[best] >= 1.0:  # a plain step costs 1
        plain = np.full(n, num_layers)
        none = np.zeros(n, dtype=bool)
        return [], float("inf"), {**report, **_outcome(plain, none, none, 1.0, num_layers)}
    subset, threshold = candidates[best]
    changed, depth, passed, _ = replays[best]
    p = None if delta is None else float(p_value(losses[best], n, epsilon))
    outcome = _outcome(depth, changed, passed, step[best], num_layers)
    return [layers[c] for c in subset], threshold, {**report, **outcome, "p_value": p}


def _outcome(depth, changed, passed, step_cost, num_layers: int) -> dict:
    """What a plan does on the held-out tokens (step cost in plain steps)."""
    return {
        "changed_share": float(np.mean(changed)) if len(changed) else 0.0,
        "mean_exit_layer": float(depth.mean()) if len(depth) else float(num_layers),
        "exited_share": float((depth < num_layers).mean()) if len(depth) else 0.0,
        "head_skipped_share": float(passed.mean()) if len(passed) else 0.0,
        "step_cost": float(step_cost),
    }


def _left(scores, agree, threshold: float, at: Sequence[int], num_layers: int) -> dict:
    """Where each token leaves given its probe logits and shortlist agreement [N, C] at the
    check layers `at`: "depth" (num_layers where no check passed), "checks" run, "passed"
    (its token then comes from the shortlist, not the full head) and "changed" (its token
    is not the full model's)."""
    C = len(at)
    if not C:
        none = np.zeros(len(scores), dtype=bool)
        return dict(depth=np.full(len(none), num_layers), checks=np.zeros(len(none), int),
                    passed=none, changed=none)  # fmt: skip
    first = _first_pass(scores, threshold)
    passed = first < C
    return {
        "depth": np.where(passed, np.asarray(at)[np.minimum(first, C - 1)], num_layers),
        "checks": np.where(passed, first + 1, C),
        "passed": passed,
        "changed": _changed(first, agree),
    }


def _first_pass(scores: np.ndarray, threshold: float) -> np.ndarray:
    """[N] index of the first candidate layer whose score reaches `threshold` (C: none)."""
    passed = scores >= threshold
    return np.where(passed.any(1), passed.argmax(1), scores.shape[1])


def _changed(exit_at: np.ndarray, agree: np.ndarray) -> np.ndarray:
    left = exit_at < agree.shape[1]
    got = agree[np.arange(len(agree)), np.minimum(exit_at, agree.shape[1] - 1)]
    return left & ~got.astype(bool)


def _report(settled, outcome: dict, L: int, costs: ExitCosts, held: _Half) -> dict:
    """The plan's layer saving next to the per-token oracle's (free checks, known answers),
    and the oracle's step cost: each token at its settled layer, read by the full head."""
    oracle = float((L - settled).mean())
    saved = L - outcome["mean_exit_layer"]
    none = np.zeros(len(settled), dtype=bool)
    step = costs.step(settled, 0, none, L, held.steps) if len(settled) else np.ones(1)
    return {
        "oracle_mean_settled": float(settled.mean()),
        "share_of_oracle_saving": saved / oracle if oracle > 0 else float("nan"),
        "oracle_step_cost": float(step.mean()),
    }


def _model_id(model) -> str:
    return getattr(model, "adainfer_id", None) or getattr(model.config, "_name_or_path", "")


# ------------------------------------------------------------------ the decoder
class EarlyExitDecoder(SelfSpeculativeDecoder):
    """Lossy generation: each token leaves at the first candidate layer where the policy's
    probe passes its threshold (see the module doc). Same interface as the lossless decoder;
    the result's `exit_layers` says where each token left."""

    tracks_exits = True

    def __init__(self, model, tokenizer, policy: TokenExitPolicy):
        super().__init__(model, tokenizer)
        policy.check_model(model)
        self.policy, self.threshold = policy, policy.threshold_
        self.checks = set(policy.layers_)
        self.vocab = torch.as_tensor(policy.vocab_)
        self.propagation = StatePropagation(self.parts)

    def _prefill(self, prompts, max_new_tokens: int, chooser=None):
        ids = self.tokenizer(list(prompts))["input_ids"]
        self.signal = ExitSignal(self.lens, self.vocab, ids)  # this batch's shortlist
        return super()._prefill(prompts, max_new_tokens, chooser)

    def _advance(self, rows: _Rows, out: _Output) -> None:
        """One decode step in which every row leaves at its own layer."""
        step = self._exit_step(rows, rows.pending, 0)
        rows.position = rows.position + 1
        rows.pending = step.token.to(rows.pending.device)
        count = torch.ones_like(rows.pending)
        added = out.add(rows.index, rows.pending[:, None], count, step.layer, step.passed)
        rows.keep(added)

    def _exit_step(self, rows: _Rows, token: torch.Tensor, j: int, draft_from=None) -> _Step:
        """Feed `token` [A] at `j` positions past the pending one; each row leaves at its own
        layer, the layers it skipped get its keys and values from its exit state. A draft
        (`draft_from`: the layer its verification starts above) also keeps every row's state
        at that layer and, when sampling, the distribution each token was drawn from."""
        inputs = self._feed(rows, token[:, None])
        inputs["position_ids"] = inputs["position_ids"] + j
        step = _Step(len(rows.index), self.parts.num_layers)
        if rows.chooser.do_sample and draft_from is not None:
            step.probs = torch.zeros(len(rows.index), self.parts.head.weight.shape[0])
        exits = self._client(step, rows.chooser)

        def both(seen: LayerOutput):
            if seen.layer == draft_from:  # no row leaves below it: every row is here
                step.start = seen.hidden
            return exits(seen)

        with self.propagation.recording():
            self.stepper.run(inputs, both, watch=self.checks, cache=rows.cache, use_cache=True)
        self.propagation.fill(rows.cache, step.layer, step.state)
        late = step.token < 0  # reached the last layer without passing: the full head
        step.passed = ~late
        if bool(late.any()):
            logits = self.lens(step.state[late.to(step.state.device)])
            token, q = rows.chooser.draw(logits, step.probs is not None)
            step.token[late] = token.cpu()
            if q is not None:
                step.probs[late] = q.to(step.probs.dtype).cpu()
        return step

    def _client(self, step: _Step, chooser: Chooser):
        L = self.parts.num_layers

        def client(seen: LayerOutput):
            hidden = seen.hidden[:, -1]
            if step.state is None:
                step.state = hidden.new_empty(step.size, hidden.shape[-1])
            leave = torch.zeros(len(hidden), dtype=torch.bool)
            if seen.layer in self.checks:
                features, logits = self.signal(hidden, seen.before)
                score = self.policy.decision_function(seen.layer, features, hidden)
                leave = (score >= self.threshold).cpu()
            gone = seen.rows[leave]
            if len(gone):
                picked, q = chooser.draw(logits[leave.to(logits.device)], step.probs is not None)
                if q is not None:  # a sampled draft: its distribution over the whole vocabulary
                    step.probs[gone.to(step.probs.device)] = q.new_zeros(
                        len(q), step.probs.shape[1]
                    ).index_copy_(1, self.signal.vocab, q)
                step.token[gone] = self.signal.vocab[picked].cpu()
            stop = torch.ones_like(leave) if seen.layer == L else leave
            step.state[seen.rows[stop]] = hidden[stop.to(hidden.device)]
            step.layer[seen.rows[stop]] = seen.layer
            return None if not bool(leave.any()) else ~leave

        return client


class ExitDraftDecoder(EarlyExitDecoder):
    """Lossless generation in which the exit policy drafts: every drafted token leaves at its
    own layer, where the policy's probe passes (CALM's exits as LayerSkip's drafter), and a
    round stops drafting after a token that no check let leave early. The full model then
    verifies every row's drafts in one forward from the policy's first check layer on, which
    every draft passed through exactly; keys and values the drafts left above it (computed,
    or propagated from exit states) are dropped first, so the verified cache is the model's
    own. Greedy output is the plain model's; sampled output follows its distribution."""

    tracks_exits = False

    def __init__(
        self,
        model,
        tokenizer,
        policy: TokenExitPolicy,
        draft_tokens: int = 4,
        *,
        plain_if_blocked: bool = False,
    ):
        super().__init__(model, tokenizer, policy)
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens must be at least 1, got {draft_tokens}")
        self.draft_layer, self.draft_tokens = min(self.checks), draft_tokens
        self.plain_if_blocked = plain_if_blocked  # see SelfSpeculativeDecoder

    def _advance(self, rows: _Rows, out: _Output) -> None:
        """Draft up to k tokens per row, each from its own exit layer, then verify them."""
        if not rows.drafting:  # a sliding window would fill: plain steps (plain_if_blocked)
            return self._plain_step(rows, out)
        L, d = self.parts.num_layers, self.draft_layer
        k = min(self.draft_tokens, out.most_left(rows.index))
        fed, drafts, states, probs, depths = [rows.pending], [], [], [], []
        for j in range(k):
            step = self._exit_step(rows, fed[-1], j, draft_from=d)
            states.append(step.start)
            drafts.append(step.token.to(rows.pending.device))
            depths.append(step.layer)
            if step.probs is not None:
                probs.append(step.probs.to(rows.pending.device))
            fed.append(drafts[-1])
            if not bool((step.layer < L).any()):
                break  # no row's draft left early: the policy is sure of none
        for c in rows.cache.layers[d:]:  # the verifier writes these layers' own keys and values
            c.crop(-len(drafts))
        out.add_draft_layers(rows.index, torch.stack(depths, 1))
        self._settle(rows, out, fed, drafts, states, probs)


@dataclass
class _Step:
    """Where each row of one decode step left, its state there and its token (-1: to be read
    by the full head)."""

    size: int
    num_layers: int
    state: torch.Tensor | None = None
    probs: torch.Tensor | None = None  # [A, V] what each token was sampled from (drafts only)
    start: torch.Tensor | None = None  # [A, 1, H] every row's state where verification starts
    passed: torch.Tensor | None = None  # [A] a check passed: the token is the shortlist's

    def __post_init__(self):
        self.layer = torch.full((self.size,), self.num_layers, dtype=torch.long)
        self.token = torch.full((self.size,), -1, dtype=torch.long)


class _Recorded(Exception):
    def __init__(self, keys, values):
        self.keys, self.values = keys, values


class _Recorder:
    """A cache that stops the attention block once it has computed its keys and values."""

    def update(self, keys, values, *args, **kwargs):
        raise _Recorded(keys, values)


class StatePropagation:
    """Keys and values of skipped layers, computed from a token's exit state by each skipped
    layer's own attention block (norm, projections, key norm, rotary embedding), stopped
    before attention itself: CALM's state propagation without re-implementing any model."""

    def __init__(self, parts):
        self.parts = parts
        attn = getattr(parts.layers[0], parts.spec.attn)
        names = inspect.signature(attn.forward).parameters
        self.cache_arg = next((n for n in names if n in CACHE_ARGS), None)
        self.norm = parts.spec.attn_norm
        if self.cache_arg is None or self.norm is None:
            raise UnsupportedModel(
                f"lossy generation fills skipped layers' keys and values through the attention "
                f"block, which {type(attn).__name__} does not let adainfer do (no cache "
                "argument or no pre-attention norm); use lossless generation"
            )
        self.rotary = [m for n, m in parts.base.named_children() if "rotary" in n]
        self.layer_types = getattr(parts.config, "layer_types", None)
        self._positions: dict = {}

    def recording(self):
        """While the forward runs: keep the rotary tables it computes, per layer type."""
        from contextlib import ExitStack

        self._positions = {}

        def hook(module, args, kwargs, output):
            kind = args[2] if len(args) > 2 else kwargs.get("layer_type")
            self._positions[kind] = output

        stack = ExitStack()
        for m in self.rotary:
            stack.callback(m.register_forward_hook(hook, with_kwargs=True).remove)
        return stack

    def fill(self, cache, exit_layer: torch.Tensor, state: torch.Tensor) -> None:
        """Write, for every layer above each row's exit layer, the keys and values computed
        from its exit state at its newest position (the stepper left zeros there, or the layer
        did not run at all when every row had left)."""
        L = self.parts.num_layers
        deepest = int(exit_layer.max())
        for layer in range(int(exit_layer.min()) + 1, L + 1):
            rows = (exit_layer < layer).nonzero()[:, 0]
            keys, values = self.keys_values(layer, state[rows.to(state.device)], rows)
            c = cache.layers[layer - 1]
            if layer <= deepest:  # the layer ran (for the rows that got that far)
                at = rows.to(c.keys.device)
                c.keys[at, :, -1:], c.values[at, :, -1:] = keys, values
            else:  # no row reached this layer: every row left below it
                c.update(keys, values)

    def keys_values(self, layer: int, state: torch.Tensor, rows: torch.Tensor):
        """[r, heads, 1, D] keys and values of `layer` for exit states [r, H] of `rows`."""
        block = self.parts.layers[layer - 1]
        attn = getattr(block, self.parts.spec.attn)
        kwargs = {self.cache_arg: _Recorder(), "attention_mask": None}
        table = self._table(layer)
        if table is not None:
            kwargs["position_embeddings"] = tuple(
                t if t.shape[0] == 1 else t[rows.to(t.device)] for t in table
            )
        try:
            attn(getattr(block, self.norm)(state[:, None]), **kwargs)
        except _Recorded as got:
            return got.keys, got.values
        raise UnsupportedModel(f"{type(attn).__name__} never wrote its keys and values")

    def _table(self, layer: int):
        if not self._positions:
            return None
        if self.layer_types is not None and self.layer_types[layer - 1] in self._positions:
            return self._positions[self.layer_types[layer - 1]]
        return next(iter(self._positions.values()))
