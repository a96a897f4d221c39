"""Where to check: an exit check is a cost, so the check schedule is part of the policy.

One check (final norm + LM head on the active rows' last position) costs `c` decoder layers,
measured on the model and batch size at hand (`measure_check_cost`; 0.3-4.5 layers on small
models). `plan_checks` replays a fitted policy on calibration traces under candidate schedules
(every s-th layer from layer m, and "no check at all") and keeps the cheapest one whose
accuracy stays within `tolerance` of the full model, counting cost as exit layer + c x checks.
If no schedule beats the plain model by `margin`, the plan is empty and the engine runs the
plain forward: adainfer is never slower than the model it wraps because of checks it makes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .offline import Traces, simulate


@dataclass
class CheckPlan:
    check_layers: tuple[int, ...]  # empty: never check, run the plain model
    expected_cost: float  # in decoder layers per query (exit layer + c x checks); plain = L
    expected_accuracy: float
    full_accuracy: float
    check_cost: float  # c, in decoder layers
    candidates: int


def candidate_schedules(num_layers: int, strides=(1, 2, 3, 4, 6)):
    """Every s-th layer from m (m < L); the last layer's head is never a check."""
    seen = set()
    for s in strides:
        for m in range(1, num_layers):
            layers = tuple(range(m, num_layers, s))
            if layers and layers not in seen:
                seen.add(layers)
                yield layers


def plan_checks(
    policy,
    traces: Traces,
    check_cost: float,
    *,
    tolerance: float = 0.01,
    margin: float = 0.02,
    strides=(1, 2, 3, 4, 6),
) -> CheckPlan:
    """The cheapest check schedule for `policy` that keeps accuracy within `tolerance`."""
    L = traces.num_layers
    full = float((traces.top1[:, -1] == traces.gold).mean())
    best = CheckPlan((), float(L), full, full, check_cost, 0)
    n = 0
    for layers in candidate_schedules(L, strides):
        n += 1
        r = simulate(policy, traces, check_layers=layers)
        cost = float((r.exit_layer + check_cost * r.num_checks).mean())
        acc = float(r.correct.mean())
        if acc >= full - tolerance and cost < best.expected_cost:
            best = CheckPlan(layers, cost, acc, full, check_cost, 0)
    if best.check_layers and best.expected_cost > L * (1 - margin):
        best = CheckPlan((), float(L), full, full, check_cost, 0)  # no schedule pays: plain model
    best.candidates = n
    return best


@torch.inference_mode()
def measure_check_cost(engine, prompts, repeats: int = 5) -> float:
    """Seconds of one check on len(prompts) rows over seconds of one decoder layer, measured."""
    from .engine import plain_forward

    enc = engine.encode(prompts)
    hidden = torch.randn(len(prompts), engine.model.config.hidden_size, dtype=engine.model.dtype, device=enc["input_ids"].device)
    plain, check = [], []
    plain_forward(engine.model, enc)  # warm-up
    for _ in range(repeats):
        t0 = time.perf_counter()
        plain_forward(engine.model, enc)
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(4):
            engine.check_logits(hidden).float().softmax(-1).topk(2, dim=-1)
        check.append((time.perf_counter() - t0) / 4)
    return float(np.median(check) / (np.median(plain) / engine.num_layers))
