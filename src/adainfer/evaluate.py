"""Evaluate exit policies against the full model on the same queries, in the same run.

Every batch runs through the plain Hugging Face model, the full-depth engine and each policy in
turn (interleaved, so machine noise hits them alike), and the summary reports per policy:
top-1 accuracy, mean exit layer, paper and true FLOPs ratios, wall time, and time relative to
the plain model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from .flops import result_ratios
from .persist import check_compatible
from .policies import ExitPolicy, NeverExit
from .prefill import AdaptiveEngine, ExitResult
from .summary import summarise
from .tasks import Query
from .timing import interleaved, plain_forward, timed

FULL = "full"
FIELDS = (
    "accuracy",
    "mean_exit_layer",
    "mean_checks",
    "flops_ratio",
    "true_flops_ratio",
    "exit_layer_histogram",
)


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
    batches = [queries[i : i + batch_size] for i in range(0, len(queries), batch_size)]
    encoded = {}

    def plain(i):  # timed like engine.run: the forward pass alone
        if i not in encoded:
            encoded[i] = engine.encode([q.prompt for q in batches[i]])
        return timed(plain_forward, engine.model, encoded[i])

    def run(policy):  # each policy computes its own features only: timed doing its own work
        def runner(i):
            qs = batches[i]
            result = engine.run([q.prompt for q in qs], policy, gold=[q.gold for q in qs])
            return result.wall_time_s, result

        return runner

    runners = {"plain": plain, **{name: run(p) for name, p in variants.items()}}
    bar = lambda r: tqdm(r, desc="eval", unit="batch", disable=not progress)  # noqa: E731
    seconds, results = interleaved(runners, len(batches), warmup_batches=1, progress=bar)
    plain_time = float(seconds["plain"].sum())
    gold = np.array([q.gold for q in queries])
    tasks = np.array([q.task for q in queries])
    summary = {
        "num_queries": len(queries),
        "num_layers": engine.num_layers,
        "plain_wall_time_s": plain_time,
        "policies": {},
    }
    for name in variants:
        r = ExitResult.concat(results[name])
        summary["policies"][name] = _summarise(
            r, gold, tasks, result_ratios(r, engine.parts, variants[name]), plain_time
        )
    return summary


def _summarise(r: ExitResult, gold, tasks, flops, plain_time) -> dict:
    correct = r.top1 == gold
    out = summarise(
        r.exit_layer,
        correct,
        flops,
        fields=FIELDS,
        num_layers=r.num_layers,
        num_checks=r.num_checks,
    )
    out.update(
        num_layers=r.num_layers,
        wall_time_s=r.wall_time_s,
        time_vs_plain=r.wall_time_s / plain_time if plain_time else None,
        per_task={
            t: _task_row(r, correct, flops, tasks == t) for t in dict.fromkeys(tasks.tolist())
        },
    )
    return out


def _task_row(r: ExitResult, correct, flops, mask) -> dict:
    return {
        "accuracy": float(correct[mask].mean()),
        "mean_exit_layer": float(r.exit_layer[mask].mean()),
        "flops_ratio": float(flops["flops_ratio"][mask].mean()),
    }


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
