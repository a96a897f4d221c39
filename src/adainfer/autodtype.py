"""`--dtype auto`: bfloat16 or float32, whichever runs the work at hand faster here, measured.

bfloat16 halves the bytes every layer reads, but whether it is faster depends on the CPU:
where the CPU has native bf16 instructions (AVX512-BF16, AMX) bf16 prefill ran 1-2.4x faster
than fp32 (results/bench); on an AMD EPYC with AVX2 only, bf16 prefill ran several times
slower, while bf16 decoding (one token per step, bound by memory traffic) ran about 2x faster
(107 vs 224 ms per token on Qwen2.5-0.5B). So the choice is measured, per machine, model and
kind of work (`prefill`: a batch of prompts in one forward; `decode`: single-token steps on a
KV cache), once, and cached (`dtype-choices.json` in the model cache folder). float32 is kept
unless bfloat16 is clearly faster (by `MARGIN`): fp32 is the exact one.
On a GPU the answer does not need measuring: bfloat16 where supported, else float16.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import DynamicCache

from .files import write_json
from .timing import interleaved, machine, synchronize

log = logging.getLogger(__name__)

WORKS = ("prefill", "decode")
MARGIN = 0.9  # bf16 must take at most this share of fp32's time to be chosen
PROMPT_TOKENS, PREFILL_BATCH, REPEATS = 64, 4, 3  # ~10-30 s a model on 2 cores


def choose(
    model,
    work: str,
    *,
    model_id: str,
    cache_file: str | Path | None = None,
    timer: Callable | None = None,
) -> torch.dtype:
    """The faster dtype for `work` ("prefill" or "decode") on this machine for `model` (loaded
    in float32): from the cache when this machine, torch and model were measured before, else
    measured now (`timer(model, work) -> bf16 seconds / fp32 seconds`) and cached."""
    if work not in WORKS:
        raise ValueError(f"work must be one of {WORKS}, got {work!r}")
    device = model.get_input_embeddings().weight.device
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type != "cpu":
        return torch.float32
    key = _key(model_id, work)
    choices = _read(cache_file)
    if key not in choices:
        ratio = (timer or speed_ratio)(model, work)
        choices = _read(cache_file)  # another process may have written meanwhile
        choices[key] = {"bf16_over_fp32": ratio, "measured": time.strftime("%Y-%m-%d %H:%M")}
        if cache_file is not None:
            write_json(cache_file, choices)
    ratio = choices[key]["bf16_over_fp32"]
    chosen = torch.bfloat16 if ratio <= MARGIN else torch.float32
    log.info("dtype auto for %s: bf16 takes %.2fx fp32's time here -> %s", work, ratio, chosen)
    return chosen


def _key(model_id: str, work: str) -> str:
    m = machine()
    flags = ",".join(f for f, on in sorted((m["cpu_flags"] or {}).items()) if on)
    return f"{m['cpu_model']}|{flags}|threads={m['torch_threads']}|{m['torch']}|{model_id}|{work}"


def _read(cache_file) -> dict:
    if cache_file is None or not Path(cache_file).is_file():
        return {}
    try:
        return json.loads(Path(cache_file).read_text())
    except (json.JSONDecodeError, OSError):
        log.warning("ignoring the unreadable dtype cache %s; measuring again", cache_file)
        return {}


def speed_ratio(model, work: str) -> float:
    """Median over interleaved samples of bf16's time over fp32's for one unit of `work`: a
    forward of PREFILL_BATCH prompts of PROMPT_TOKENS tokens, or one decode step of one row
    after a PROMPT_TOKENS prompt. The bf16 copy is dropped afterwards."""
    # made outside inference mode: a copy cast inside it holds inference tensors, on which
    # bf16 linear layers ran 6.5x slower here (Qwen2.5-0.5B prefill), and bf16 looked slow
    half = copy.deepcopy(model).to(torch.bfloat16)
    vocab = model.config.vocab_size
    ids = torch.randint(vocab, (PREFILL_BATCH if work == "prefill" else 1, PROMPT_TOKENS))
    ids = ids.to(model.get_input_embeddings().weight.device)
    with torch.inference_mode():
        runs = {"fp32": _runner(model, ids, work), "bf16": _runner(half, ids, work)}
        runners = {k: lambda i, r=r: (r(), None) for k, r in runs.items()}
        seconds, _ = interleaved(runners, REPEATS)
    del half
    return float(np.median(seconds["bf16"][0] / seconds["fp32"][0]))


def _runner(model, ids: torch.Tensor, work: str) -> Callable[[], float]:
    if work == "prefill":
        return lambda: _timed(lambda: model(input_ids=ids, logits_to_keep=1))
    cache = DynamicCache(config=model.config)
    model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    step = ids[:, -1:]

    def one_step() -> float:
        seconds = _timed(lambda: model(input_ids=step, cache=cache, use_cache=True))
        cache.crop(-1)  # back to the prompt (transformers 5 crops by a negative count)
        return seconds

    return one_step


def _timed(fn) -> float:
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start
