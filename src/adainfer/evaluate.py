"""Evaluate exit policies against the full model on the same queries, in the same run.

Every batch runs through the plain Hugging Face model, the full-depth engine and each policy in
turn (interleaved, so machine noise hits them alike), and the summary reports per policy:
top-1 accuracy, mean exit layer, paper and true FLOPs ratios, wall time, and time relative to
the plain model.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from .flops import result_ratios
from .persist import check_compatible
from .policies import ExitPolicy, NeverExit
from .prefill import AdaptiveEngine, ExitResult, plain_forward
from .tasks import Query

FULL = "full"


def evaluate(
    engine: AdaptiveEngine,
    queries: Sequence[Query],
    policies: Mapping[str, ExitPolicy],
    *,
    batch_size: int = 8,
    progress: bool = True,
    allow_other_model: bool = False,
) -> dict:
    if not queries:
        raise ValueError("no queries to evaluate")
    for policy in policies.values():
        check_compatible(policy, engine.model, allow_other_model)
    variants = {FULL: NeverExit(), **policies}
    results: dict[str, list[ExitResult]] = {k: [] for k in variants}
    plain_time = 0.0
    order = ["plain", *variants]
    warm = queries[
        :batch_size
    ]  # one untimed pass of every variant: the first timed run is not a cold one
    plain_forward(engine.model, engine.encode([q.prompt for q in warm]))
    for policy in variants.values():
        engine.run([q.prompt for q in warm], policy, gold=[q.gold for q in warm])
    for n, start in enumerate(
        tqdm(range(0, len(queries), batch_size), desc="eval", unit="batch", disable=not progress)
    ):
        batch = queries[start : start + batch_size]
        prompts, gold = [q.prompt for q in batch], [q.gold for q in batch]
        enc = engine.encode(prompts)
        for name in (
            order[n % len(order) :] + order[: n % len(order)]
        ):  # rotate: drift hits all alike
            if name == "plain":
                t0 = time.perf_counter()
                plain_forward(engine.model, enc)  # timed like engine.run: the forward pass alone
                plain_time += time.perf_counter() - t0
            else:
                # each policy computes its own features only: timed doing its own work
                results[name].append(engine.run(prompts, variants[name], gold=gold))
    gold = np.array([q.gold for q in queries])
    tasks = np.array([q.task for q in queries])
    summary = {
        "num_queries": len(queries),
        "num_layers": engine.num_layers,
        "plain_wall_time_s": plain_time,
        "policies": {},
    }
    for name, parts in results.items():
        r = ExitResult.concat(parts)
        summary["policies"][name] = _summarise(
            r, gold, tasks, result_ratios(r, engine.parts, variants[name]), plain_time
        )
    return summary


def _summarise(r: ExitResult, gold, tasks, flops, plain_time) -> dict:
    correct = r.top1 == gold
    out = {
        "accuracy": float(correct.mean()),
        "mean_exit_layer": float(r.exit_layer.mean()),
        "num_layers": r.num_layers,
        "mean_checks": float(r.num_checks.mean()),
        "flops_ratio": float(flops["flops_ratio"].mean()),
        "true_flops_ratio": float(flops["true_flops_ratio"].mean()),
        "wall_time_s": r.wall_time_s,
        "time_vs_plain": r.wall_time_s / plain_time if plain_time else None,
        "exit_layer_histogram": np.bincount(r.exit_layer, minlength=r.num_layers + 1)[1:].tolist(),
        "per_task": {
            t: {
                "accuracy": float(correct[tasks == t].mean()),
                "mean_exit_layer": float(r.exit_layer[tasks == t].mean()),
                "flops_ratio": float(flops["flops_ratio"][tasks == t].mean()),
            }
            for t in dict.fromkeys(tasks.tolist())
        },
    }
    return out


def layer_accuracy(
    engine: AdaptiveEngine, queries: Sequence[Query], *, batch_size: int = 8, progress=True
) -> np.ndarray:
    """Fraction of queries whose layer-l top-1 is the gold token, for every layer l (1..L)."""
    all_layers = list(range(1, engine.num_layers + 1))
    hits = []
    for start in tqdm(
        range(0, len(queries), batch_size), desc="layers", unit="batch", disable=not progress
    ):
        batch = queries[start : start + batch_size]
        r = engine.run([q.prompt for q in batch], NeverExit(), check_layers=all_layers)
        hits.append(r.layer_top1 == np.array([q.gold for q in batch])[:, None])
    return np.concatenate(hits).mean(0)
