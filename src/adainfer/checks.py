"""Where to check: an exit check is a cost, so the check schedule is part of the policy.

One check (final norm + LM head on the active rows' last position) costs `c` decoder layers,
measured on the model and batch size at hand (`measure_check_cost`; 0.3-4.5 layers on small
models). `plan_checks` replays a fitted policy on calibration traces under candidate schedules
(every s-th layer from layer m, and "no check at all") and keeps the cheapest one whose
accuracy stays within `tolerance` of the full model, counting cost as exit layer + c x checks.
A trained classifier is scored out of fold (cross-fitting), so the plan is judged on queries
the classifier did not see.
If no schedule beats the plain model by `margin`, the plan is empty and the engine runs the
plain forward: adainfer is never slower than the model it wraps because of checks it makes.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.base import clone

from .offline import Replay, Traces, simulate


@dataclass
class CheckPlan:
    check_layers: tuple[int, ...]  # empty: never check, run the plain model
    expected_cost: float  # in decoder layers per query (exit layer + c x checks); plain = L
    expected_accuracy: float
    full_accuracy: float
    check_cost: float  # c, in decoder layers
    candidates: int
    held_out: bool  # cost and accuracy were estimated on queries the policy was not fitted on


def candidate_schedules(num_layers: int, strides=(1, 2, 3, 4, 6)):
    """Every s-th layer from m (m < L); the last layer's head is never a check."""
    seen = set()
    for s in strides:
        for m in range(1, num_layers):
            layers = tuple(range(m, num_layers, s))
            if layers and layers not in seen:
                seen.add(layers)
                yield layers


def _replays(policy, traces: Traces, schedules, folds: int, seed: int):
    """Per schedule: (exit layer, checks, correct) of every query, each from a policy that
    never saw that query when `folds` > 1 (cross-fitting), else from `policy` as fitted.

    Scoring a schedule on the queries the classifier was fitted on flatters it: on Qwen2.5 a
    plan chosen in-sample on 40 SST-2 queries lost one of 16 held-out queries (6 points)."""
    n = len(traces)
    if folds < 2 or not policy.trainable or n < 2 * folds:
        return [simulate(policy, traces, check_layers=s) for s in schedules], False
    fold_of = np.random.default_rng(seed).permutation(n) % folds
    exit_layer = np.zeros((len(schedules), n), dtype=int)
    checks, correct = np.zeros_like(exit_layer), np.zeros(exit_layer.shape, dtype=bool)
    for f in range(folds):
        try:
            fitted = clone(policy).fit(*traces.subset(fold_of != f).training_arrays(policy.features))
        except ValueError:  # a fold whose labels are all equal: score in-sample instead
            return [simulate(policy, traces, check_layers=s) for s in schedules], False
        held = traces.subset(fold_of == f)
        for i, s in enumerate(schedules):
            r = simulate(fitted, held, check_layers=s)
            exit_layer[i, fold_of == f], checks[i, fold_of == f], correct[i, fold_of == f] = r.exit_layer, r.num_checks, r.correct
    return [Replay(e, c, k, None) for e, c, k in zip(exit_layer, checks, correct)], True


def plan_checks(
    policy,
    traces: Traces,
    check_cost: float,
    *,
    tolerance: float = 0.01,
    margin: float = 0.02,
    strides=(1, 2, 3, 4, 6),
    folds: int = 5,
    seed: int = 0,
) -> CheckPlan:
    """The cheapest check schedule for `policy` that keeps accuracy within `tolerance`.

    A trainable policy is judged out of fold (`folds`-fold cross-fitting on the calibration
    queries) so the plan holds on queries it has not seen; the policy itself stays as fitted."""
    return plan_checks_by_batch(policy, traces, {1: check_cost}, tolerance=tolerance, margin=margin,
                                strides=strides, folds=folds, seed=seed)[1]  # fmt: skip


def check_cost_layers(replay, num_layers: int, check_cost: float, shortlist_cost: float | None = None) -> np.ndarray:
    """Per query: layers run plus checks made, in decoder layers.

    With a shortlist (`AdaptiveEngine(shortlist=k)`) a row's first check is exact, the later ones
    cost `shortlist_cost`, and a stop after the first check adds an exact confirmation (the
    replay assumes the shortlist check stops where the exact one would; the engine confirms)."""
    n = replay.num_checks
    if shortlist_cost is None:
        return replay.exit_layer + check_cost * n
    exact = (n >= 1).astype(float) + ((n >= 2) & (replay.exit_layer < num_layers))
    return replay.exit_layer + check_cost * exact + shortlist_cost * np.maximum(n - 1, 0)


def plan_checks_by_batch(policy, traces: Traces, check_costs: Mapping[int, float], *, tolerance: float = 0.01,
                         margin: float = 0.02, strides=(1, 2, 3, 4, 6), folds: int = 5, seed: int = 0,
                         shortlist_costs: Mapping[int, float] | None = None) -> dict[int, CheckPlan]:  # fmt: skip
    """`plan_checks` for several check costs at once (one per batch size: a check costs less,
    relative to a layer, on a larger batch); the replays are shared. `shortlist_costs` plans
    for an engine with shortlist checks (see `check_cost_layers`)."""
    L = traces.num_layers
    full = float((traces.top1[:, -1] == traces.gold).mean())
    schedules = list(candidate_schedules(L, strides))
    replays, held_out = _replays(policy, traces, schedules, folds, seed)
    plans = {}
    for batch_size, c in check_costs.items():
        short = None if shortlist_costs is None else shortlist_costs[batch_size]
        best = CheckPlan((), float(L), full, full, c, len(schedules), held_out)
        for layers, r in zip(schedules, replays):
            cost = float(check_cost_layers(r, L, c, short).mean())
            acc = float(r.correct.mean())
            if acc >= full - tolerance and cost < best.expected_cost:
                best = CheckPlan(layers, cost, acc, full, c, len(schedules), held_out)
        if best.check_layers and best.expected_cost > L * (1 - margin):  # no schedule pays: plain model
            best = CheckPlan((), float(L), full, full, c, len(schedules), held_out)
        plans[batch_size] = best
    return plans


def apply_plans(policy, plans: Mapping[int, CheckPlan]):
    """Give `policy` its schedules: one per batch size (`check_plans_`), and the smallest
    batch size's as its default (`check_layers_`, what offline replays use)."""
    policy.check_plans_ = {int(b): p.check_layers for b, p in sorted(plans.items())}
    policy.check_layers_ = policy.check_plans_[min(policy.check_plans_)]
    return policy


@torch.inference_mode()
def measure_check_cost(engine, prompts, repeats: int = 5, shortlist: int | None = None) -> float:
    """Seconds of one check on len(prompts) rows over seconds of one decoder layer, measured;
    with `shortlist`, of a check on that many candidate tokens per row."""
    from .engine import plain_forward

    enc = engine.encode(prompts)
    hidden = torch.randn(len(prompts), engine.model.config.hidden_size, dtype=engine.model.dtype, device=enc["input_ids"].device)
    vocab = engine.parts.head.weight.shape[0]
    ids = None if shortlist is None else torch.randint(vocab, (len(prompts), shortlist), device=hidden.device)

    def check():
        logits = engine.check_logits(hidden) if ids is None else engine.parts.shortlist_logits(hidden, ids)
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
        cost.append((time.perf_counter() - t0) / 4)
    return float(np.median(cost) / (np.median(plain) / engine.num_layers))
