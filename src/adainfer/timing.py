"""Measurement: time (the plain model's forward, variants interleaved side by side), peak
memory, and the machine a timing was taken on. A ground floor: imports nothing from adainfer,
so a benchmark script can measure without loading the engine's modules.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import subprocess
import threading
import time
from collections.abc import Callable, Mapping

import numpy as np
import torch

# CPU flags that decide how fast a CPU runs these models: bf16 matmuls run natively only with
# avx512_bf16 or amx_bf16, else they are emulated; avx512f / avx2 set the fp32 kernels' width
SPEED_FLAGS = ("avx512_bf16", "amx_bf16", "avx512f", "avx2")


# ----------------------------------------------------------------------------- time
def synchronize() -> None:
    """Wait for queued GPU work: a timer read before it would time the queueing only."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@torch.inference_mode()
def plain_forward(model, enc: dict) -> torch.Tensor:
    """The unmodified Hugging Face model, one full forward: next-token logits per row, computed
    (not only queued on a GPU) when it returns, so that it can be timed."""
    logits = model(**enc, use_cache=False, logits_to_keep=1).logits[:, -1].float()
    synchronize()
    return logits


def timed(fn: Callable, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result) of one call, GPU work included."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    synchronize()
    return time.perf_counter() - start, result


def interleaved(
    runners: Mapping[str, Callable[[int], tuple[float, object]]],
    num_batches: int,
    *,
    repeats: int = 1,
    warmup_batches: int | None = None,
    progress: Callable | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Time every variant on every batch, side by side: `runners[name](i)` runs batch i and
    returns (seconds, output).

    Every batch runs through all variants back to back, in an order that rotates with the batch
    and the repeat, so drift on a shared machine hits all variants alike. First an untimed
    warm-up: the first `warmup_batches` batches through every variant (None: a whole pass).
    Returns seconds [repeats, batches] per variant, and each variant's outputs of the last
    repeat, in batch order. `progress` wraps the batch range (e.g. tqdm)."""
    names = list(runners)
    warm = num_batches if warmup_batches is None else min(warmup_batches, num_batches)
    for i in range(warm):
        for name in names:
            runners[name](i)
    seconds = {v: np.zeros((repeats, num_batches)) for v in names}
    outputs: dict[str, list] = {v: [] for v in names}
    for r in range(repeats):
        batches = range(num_batches) if progress is None else progress(range(num_batches))
        for i in batches:
            shift = (r + i) % len(names)
            for name in names[shift:] + names[:shift]:
                seconds[name][r, i], out = runners[name](i)
                if r == repeats - 1:
                    outputs[name].append(out)
    return seconds, outputs


@torch.inference_mode()
def measure_check_cost(engine, prompts, repeats: int = 5, shortlist: int | None = None) -> float:
    """Seconds of one exit check on len(prompts) rows over seconds of one decoder layer,
    measured on `engine` (an AdaptiveEngine: its model, tokenizer and logit lens, read in its
    check_dtype); with `shortlist`, of a check on that many candidate tokens per row."""
    enc = engine.encode(prompts)
    hidden = torch.randn(
        len(prompts),
        engine.model.config.hidden_size,
        dtype=engine.model.dtype,
        device=enc["input_ids"].device,
    )
    vocab = engine.lens.vocab_size
    ids = (
        None
        if shortlist is None
        else torch.randint(vocab, (len(prompts), shortlist), device=hidden.device)
    )

    def check():
        if ids is None:
            logits = engine.lens(hidden, dtype=engine.check_dtype)
        else:
            logits = engine.lens(hidden, ids=ids)
        return logits.float().softmax(-1).topk(2, dim=-1)

    plain, cost = [], []
    plain_forward(engine.model, enc)  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain_forward(engine.model, enc)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(4):
            check()
        synchronize()
        cost.append((time.perf_counter() - t0) / 4)
    return float(np.median(cost) / (np.median(plain) / engine.num_layers))


# ----------------------------------------------------------------------------- peak memory
def rss() -> int:
    """The process's resident set, in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_large_blocks():
    """Make glibc hand big blocks back at free, so RSS follows live tensors (CPU only)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: fixed, no growth
    except (OSError, AttributeError):
        pass


def resident_memory(device) -> int:
    """Bytes in use now: the process's resident set on CPU, allocated tensors on GPU."""
    return torch.cuda.memory_allocated() if torch.device(device).type == "cuda" else rss()


def peak_memory(fn, device) -> int:
    """Peak bytes allocated by fn() above what was in use before it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    before, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.0005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(0, max(peak[0], rss()) - before)


# ----------------------------------------------------------------------------- the machine
def machine() -> dict:
    """What a timing depends on, recorded next to it: cores, threads, the CPU (model name and
    its speed-relevant flags: None where they cannot be read), the GPU and torch."""
    model, flags = _cpu()
    return {
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": model,
        "cpu_flags": None if flags is None else {f: f in flags for f in SPEED_FLAGS},
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


@functools.cache  # the CPU does not change under a running process
def _cpu() -> tuple[str | None, frozenset[str] | None]:
    """(model name, flags) from /proc/cpuinfo, else from `lscpu`; None for what neither gives."""
    fields = _fields(_read("/proc/cpuinfo"))
    if "model name" not in fields:
        fields = {**_fields(_lscpu()), **fields}
    model = fields.get("model name")
    flags = fields.get("flags", fields.get("features"))  # x86 says flags, ARM features
    return model or None, None if flags is None else frozenset(flags.split())


def _fields(text: str) -> dict[str, str]:
    """'key: value' lines as {lowercased key: value}, the first of each key (one per core)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, found, value = line.partition(":")
        if found:
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _lscpu() -> str:
    try:
        return subprocess.run(
            ["lscpu"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
