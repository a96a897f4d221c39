"""Where to check: an exit check is a cost, so the check schedule is part of the policy.

One check (final norm + LM head on the active rows' last position) costs `c` decoder layers,
measured on the model and batch size at hand (`measure_check_cost`; 0.08-3.5 layers for the
small models of results/bench, bf16, batch 32 to 1). `plan_checks` replays a fitted policy on
calibration traces under candidate schedules (every s-th layer from layer m, and "no check at
all") and keeps the cheapest one whose accuracy stays within `tolerance` of the full model AND
whose answers agree with the full model's on at least `MIN_AGREEMENT` of the queries, or, if
it changes more answers, whose accuracy loss stays within `tolerance` at `CONFIDENCE` (a one-sided
bound on the paired difference, query by query), counting cost as exit layer + c x checks.
Agreement is the safe test on a small calibration set: on 200 held-out SST-2 queries Qwen2.5's
layers 20-23 answer " positive" for 93% of rows and only the last layer turns 19% of them, a
net 12-point gain that 40 calibration queries showed as none, so accuracy alone let a plan
through that lost 12 points. A trained classifier is also scored out of fold (cross-fitting),
so the plan is judged on queries the classifier did not see.
If no schedule beats the plain model by `margin`, the plan is empty and the engine runs the
plain forward: adainfer is never slower than the model it wraps because of checks it makes.
`PlannedPolicy` is the scikit-learn meta-estimator that fits a policy on traces and keeps its
plans (one per batch size) and stop threshold as its own fitted attributes.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from statistics import NormalDist

import numpy as np
from sklearn.base import clone
from sklearn.utils.metaestimators import available_if
from sklearn.utils.validation import check_is_fitted

from . import risk as risk_control
from .offline import TARGETS, Replay, Traces, simulate
from .policies import ExitPolicy, schedule_for

THRESHOLDS = (
    0.5,
    0.6,
    0.7,
    0.8,
    0.85,
    0.9,
    0.95,
    0.98,
    0.99,
)  # tried for policies with a `threshold`
# Default share of calibration answers a plan must keep equal to the full model's. On 872
# held-out SST-2 queries (bench/plan_quality.py) 0.97 keeps Qwen2.5 within 1 point at 60-70% of
# the oracle's saving (0.99: 51-59%; 0.95: -1.3 points at batch 32) and Gemma-3 +0.5 at 44%.
MIN_AGREEMENT = 0.97
# A plan that changes more answers must show, at this one-sided confidence, that it loses no more
# than `tolerance`: Gemma-3's answers move between layers 14-17 without costing accuracy, which
# the agreement test alone refused (44% of the oracle's saving); with this bound it gets 81% at
# +3.4 points, while Qwen2.5's plans stay those of the agreement test (bench/plan_quality.py).
CONFIDENCE = 0.95


@dataclass
class CheckPlan:
    check_layers: tuple[int, ...]  # empty: never check, run the plain model
    expected_cost: float  # in decoder layers per query (exit layer + c x checks); plain = L
    expected_accuracy: float
    full_accuracy: float
    check_cost: float  # c, in decoder layers
    candidates: int
    held_out: bool  # cost and accuracy were estimated on queries the policy was not fitted on
    expected_agreement: float = 1.0  # share of queries answered as the full model answers
    threshold: float | None = None  # the policy's stop threshold this plan was made for
    # the risk it controls (None: planned by the agreement / loss-bound test, no guarantee):
    # P(risk > epsilon) <= delta over the `tested_on` calibration queries (`risk.py`)
    risk: str | None = None
    epsilon: float | None = None
    delta: float | None = None
    tested_on: int = 0
    p_value: float | None = None  # of this plan's candidate (None: no plan, or not tested)


def candidate_schedules(num_layers: int, strides=(1, 2, 3, 4, 6)):
    """Every s-th layer from m (m < L); the last layer's head is never a check."""
    seen = set()
    for s in strides:
        for m in range(1, num_layers):
            layers = tuple(range(m, num_layers, s))
            if layers and layers not in seen:
                seen.add(layers)
                yield layers


def _with_threshold(policy, threshold):
    if threshold is not None:
        policy.set_params(threshold=threshold)
    return policy


def _replays(policy, traces: Traces, schedules, thresholds, folds: int, seed: int, target: str):
    """{threshold: [Replay per schedule]}, each query replayed by a policy that never saw it
    when `folds` > 1 (cross-fitting: clones fitted on the other folds' `target` labels), else
    by `policy` as fitted.

    Scoring a schedule on the queries the classifier was fitted on flatters it: on Qwen2.5 a
    plan chosen in-sample on 40 SST-2 queries lost one of 16 held-out queries (6 points)."""
    n = len(traces)

    def in_sample():
        return {
            t: [
                simulate(_with_threshold(copy.deepcopy(policy), t), traces, check_layers=s)
                for s in schedules
            ]
            for t in thresholds
        }, False

    if folds < 2 or not policy.trainable or n < 2 * folds:
        return in_sample()
    fold_of = np.random.default_rng(seed).permutation(n) % folds
    shape = (len(thresholds), len(schedules), n)
    exit_layer, checks = np.zeros(shape, dtype=int), np.zeros(shape, dtype=int)
    correct, agrees = np.zeros(shape, dtype=bool), np.zeros(shape, dtype=bool)
    for f in range(folds):
        m = fold_of == f
        try:
            fitted = clone(policy).fit(*traces.subset(~m).training_arrays(policy.features, target))
        except ValueError:  # a fold whose labels are all equal: score in-sample instead
            return in_sample()
        held = traces.subset(m)
        for i, t in enumerate(thresholds):
            _with_threshold(fitted, t)
            for j, s in enumerate(schedules):
                r = simulate(fitted, held, check_layers=s)
                exit_layer[i, j, m], checks[i, j, m], correct[i, j, m], agrees[i, j, m] = (
                    r.exit_layer,
                    r.num_checks,
                    r.correct,
                    r.agrees,
                )
    return {
        t: [
            Replay(exit_layer[i, j], checks[i, j], correct[i, j], None, agrees[i, j])
            for j in range(len(schedules))
        ]
        for i, t in enumerate(thresholds)
    }, True


def check_cost_layers(
    replay, num_layers: int, check_cost: float, shortlist_cost: float | None = None
) -> np.ndarray:
    """Per query: layers run plus checks made, in decoder layers.

    With a shortlist (`AdaptiveEngine(shortlist=k)`) a row's first check is exact, the later ones
    cost `shortlist_cost`, and a stop after the first check adds an exact confirmation (the
    replay assumes the shortlist check stops where the exact one would; the engine confirms)."""
    n = replay.num_checks
    if shortlist_cost is None:
        return replay.exit_layer + check_cost * n
    exact = (n >= 1).astype(float) + ((n >= 2) & (replay.exit_layer < num_layers))
    return replay.exit_layer + check_cost * exact + shortlist_cost * np.maximum(n - 1, 0)


def plan_checks(policy, traces: Traces, check_cost: float, **kw) -> CheckPlan:
    """The cheapest check schedule for `policy` that keeps accuracy within `tolerance` (and
    agreement with the full model above `min_agreement`); see `plan_checks_by_batch`."""
    return plan_checks_by_batch(policy, traces, {1: check_cost}, **kw)[1]


@dataclass
class ScheduleReplays:
    """A fitted policy replayed on calibration traces under every candidate schedule and stop
    threshold; planning for several cost models (exact and shortlist checks) reuses them."""

    schedules: list[tuple[int, ...]]
    by_threshold: dict  # {threshold or None: [Replay per schedule]}
    held_out: bool  # replayed out of fold
    full_correct: np.ndarray | None = None  # [Q] the full model's answer is gold


def replay_schedules(
    policy,
    traces: Traces,
    *,
    strides=(1, 2, 3, 4, 6),
    thresholds: Sequence[float] | None = None,
    folds: int = 5,
    seed: int = 0,
    target: str = "gold",
) -> ScheduleReplays:
    """`policy` (fitted) replayed on `traces` under every candidate schedule and stop threshold;
    `target`: the labels it was fitted on, for the clones fitted fold by fold."""
    schedules = list(candidate_schedules(traces.num_layers, strides))
    thresholds = tuple(thresholds) if thresholds and "threshold" in policy.get_params() else (None,)
    replays = _replays(policy, traces, schedules, thresholds, folds, seed, target)
    return ScheduleReplays(schedules, *replays, traces.top1[:, -1] == traces.gold)


def plan_checks_by_batch(
    policy,
    traces: Traces,
    check_costs: Mapping[int, float],
    *,
    tolerance: float = 0.01,
    margin: float = 0.02,
    strides=(1, 2, 3, 4, 6),
    folds: int = 5,
    seed: int = 0,
    shortlist_costs: Mapping[int, float] | None = None,
    min_agreement: float | None = None,
    thresholds: Sequence[float] | None = None,
    replays: ScheduleReplays | None = None,
    confidence: float | None = None,
    target: str = "gold",
    risk: str | None = None,
    epsilon: float = risk_control.EPSILON,
    delta: float = risk_control.DELTA,
    order_replays: ScheduleReplays | None = None,
) -> dict[int, CheckPlan]:
    """Check plans for several check costs at once (one per batch size: a check costs less,
    relative to a layer, on a larger batch); the replays are shared.

    - A trainable policy is judged out of fold (`folds`-fold cross-fitting on `target` labels),
      so a plan holds on queries the classifier did not see; the policy itself stays as fitted.
    - `min_agreement` (default `MIN_AGREEMENT`; 0: judge by accuracy alone) is the share of
      queries whose answer must be the full model's.
    - `thresholds`: stop thresholds to try for a policy with a `threshold` parameter (the
      probability a logistic policy needs before it stops); one is chosen for all batch sizes,
      the one with the lowest mean cost.
    - `shortlist_costs` plans for an engine with shortlist checks (`check_cost_layers`).
    - `confidence` (default `CONFIDENCE`; 0: the agreement test only): a plan below
      `min_agreement` still passes if the lower confidence bound of its paired accuracy
      difference to the full model (normal approximation) is above `-tolerance`.
    - `replays`: `replay_schedules(policy, traces, ...)` made once, to plan for both kinds of
      check without replaying twice (`strides`, `folds`, `seed`, `thresholds`, `target` are
      then its).
    - `risk` ("consistency" | "accuracy"; None: the agreement / loss-bound test above, which
      promises nothing once hundreds of candidates are tried): Learn-then-Test instead
      (`_ltt_plans`): the candidates, ordered by their risk on `order_replays` (replays on
      other queries than `traces`, which only test), are tested in that order on `traces`; the
      cheapest accepted one has risk <= `epsilon` except with probability `delta`.
    The plans are returned; `PlannedPolicy` is the estimator that fits a policy and keeps them."""
    if risk is not None:
        return _ltt_plans(
            policy,
            traces,
            check_costs,
            shortlist_costs,
            margin,
            replays
            or replay_schedules(policy, traces, strides=strides, thresholds=thresholds, folds=1),
            order_replays,
            risk,
            epsilon,
            delta,
        )
    L = traces.num_layers
    full_correct = traces.top1[:, -1] == traces.gold
    full = float(full_correct.mean())
    agreement = MIN_AGREEMENT if min_agreement is None else min_agreement
    if not 0 <= agreement <= 1:
        raise ValueError(f"min_agreement is a share of queries, between 0 and 1; got {agreement}")
    confidence = CONFIDENCE if confidence is None else confidence
    if not 0 <= confidence < 1:
        raise ValueError(f"confidence is a probability, at least 0 and below 1; got {confidence}")
    z = NormalDist().inv_cdf(confidence) if confidence > 0 else None
    if replays is None:
        replays = replay_schedules(
            policy,
            traces,
            strides=strides,
            thresholds=thresholds,
            folds=folds,
            seed=seed,
            target=target,
        )
    schedules, held_out = replays.schedules, replays.held_out
    best_by_threshold = {}
    for t, results in replays.by_threshold.items():
        # which schedules keep the answers does not depend on the check cost: judged once
        passing = _passing(schedules, results, full_correct, tolerance, agreement, z)
        plans = {}
        for batch_size, c in check_costs.items():
            short = None if shortlist_costs is None else shortlist_costs[batch_size]
            plain = CheckPlan((), float(L), full, full, c, len(schedules), held_out, 1.0, t)
            plans[batch_size] = _cheapest(passing, plain, L, short, margin)
        best_by_threshold[t] = plans
    return _one_threshold(best_by_threshold)


def _one_threshold(best_by_threshold: dict) -> dict[int, CheckPlan]:
    """One threshold for every batch size: the cheapest on average (ties: the higher, safer
    one)."""
    t = min(
        best_by_threshold,
        key=lambda t: (
            np.mean([p.expected_cost for p in best_by_threshold[t].values()]),
            -(t or 0),
        ),
    )
    return best_by_threshold[t]


def _ltt_plans(
    policy, traces, check_costs, shortlist_costs, margin, replays, order_replays, risk, eps, delta
) -> dict[int, CheckPlan]:
    """Plans by Learn-then-Test (`risk.py`): every (threshold, schedule) candidate is tested in
    the order of its risk on `order_replays`, safest first, on the queries of `replays`; the
    cheapest accepted candidate per batch size (one threshold for all), else the plain model.

    Why an order estimated on other queries: within a schedule a lower threshold only moves
    exits earlier, but across schedules nothing says which is safer without data, and an order
    taken from the testing queries themselves would void the guarantee. How much a better order
    would add is measured in results/guarantees/ (the "hindsight order" rows)."""
    if order_replays is None:
        raise ValueError("Learn-then-Test needs replays on other queries to order the candidates")
    risk_control.check_level(eps, delta)
    L, n = traces.num_layers, len(traces)
    full_correct = traces.top1[:, -1] == traces.gold
    cands = [(t, j) for t in replays.by_threshold for j in range(len(replays.schedules))]

    def losses(by_threshold, full):
        return np.array(
            [
                risk_control.replay_losses(
                    risk, by_threshold[t][j].agrees, by_threshold[t][j].correct, full
                )
                for t, j in cands
            ]
        )

    estimated = losses(order_replays.by_threshold, order_replays.full_correct).mean(1)
    later = [order_replays.by_threshold[t][j].exit_layer.mean() for t, j in cands]
    order = risk_control.order_by_risk(estimated, later)
    sums = losses(replays.by_threshold, full_correct).sum(1)
    accepted = risk_control.learn_then_test(sums, n, order, eps, delta)
    p = risk_control.p_value(sums, n, eps)
    full = float(full_correct.mean())
    level = dict(risk=risk, epsilon=eps, delta=delta, tested_on=n)
    best_by_threshold = {}
    for t in replays.by_threshold:
        mine = [i for i in accepted if cands[i][0] == t]
        passing = [
            _scored(replays.schedules[cands[i][1]], replays.by_threshold[t][cands[i][1]])
            for i in mine
        ]
        p_of = {replays.schedules[cands[i][1]]: float(p[i]) for i in mine}
        plans = {}
        for batch_size, c in check_costs.items():
            short = None if shortlist_costs is None else shortlist_costs[batch_size]
            plain = CheckPlan((), float(L), full, full, c, len(cands), True, 1.0, t, **level)
            plan = _cheapest(passing, plain, L, short, margin)
            plans[batch_size] = replace(plan, p_value=p_of.get(plan.check_layers))
        best_by_threshold[t] = plans
    return _one_threshold(best_by_threshold)


def _passing(schedules, results, full_correct, tolerance: float, agreement: float, z) -> list:
    """(schedule, replay, accuracy, agreement) of each schedule whose replay keeps accuracy within
    `tolerance` of the full model's and agrees with it on `agreement` of the queries, or bounds
    the accuracy loss (`_bounded_loss`)."""
    full = float(full_correct.mean())
    passing = []
    for layers, r in zip(schedules, results):
        acc, agree = float(r.correct.mean()), float(r.agrees.mean())
        if acc >= full - tolerance and (
            agree >= agreement or _bounded_loss(r.correct, full_correct, z, tolerance)
        ):
            passing.append((layers, r, acc, agree))
    return passing


def _scored(layers, r: Replay) -> tuple:
    """(schedule, replay, accuracy, agreement) as `_cheapest` takes them."""
    return layers, r, float(r.correct.mean()), float(r.agrees.mean())


def _cheapest(passing, plain: CheckPlan, num_layers: int, shortlist_cost, margin: float):
    """The passing schedule with the lowest expected cost at `plain`'s check cost, or `plain` (no
    check) when none beats the plain model by `margin`."""
    best = plain
    for layers, r, acc, agree in passing:
        cost = float(check_cost_layers(r, num_layers, plain.check_cost, shortlist_cost).mean())
        if cost < best.expected_cost:
            best = replace(
                plain,
                check_layers=layers,
                expected_cost=cost,
                expected_accuracy=acc,
                expected_agreement=agree,
            )
    return plain if best.expected_cost > num_layers * (1 - margin) else best


def _bounded_loss(correct, full_correct, z: float | None, tolerance: float) -> bool:
    """Is the accuracy loss against the full model within `tolerance` at `z` standard errors of
    the paired per-query difference? (Paired: queries both get right or wrong add no noise.)"""
    if z is None or len(correct) < 2:
        return False
    diff = correct.astype(float) - full_correct
    return diff.mean() - z * diff.std(ddof=1) / np.sqrt(len(diff)) >= -tolerance


def promise(plans) -> str:
    """What the plans guarantee, in one line: the risk bound, or why the plain model runs."""
    tested = [p for p in plans.values() if p.risk is not None]
    if not tested:
        return "no risk guarantee: planned by the agreement / loss-bound test" if plans else ""
    p = tested[0]
    level = f"{p.risk} risk <= {p.epsilon:g} with probability >= {1 - p.delta:g}"
    if any(q.check_layers for q in tested):
        return (
            f"guarantee: {level} (Learn-then-Test on {p.tested_on} calibration queries), for "
            "queries like the calibration ones; a new task is not covered"
        )
    need = risk_control.min_queries(p.epsilon, p.delta)
    more = f"; at least {need} testing queries are needed" if p.tested_on < need else ""
    return (
        f"no plan passed the risk test ({level}, {p.tested_on} testing queries{more}): "
        "the plain model runs"
    )


def known_plan(check_layers: Sequence[int], threshold: float | None = None) -> CheckPlan:
    """A plan known by its layers only (a format-1 policy file, or a schedule chosen by hand):
    its expected cost and accuracy were not recorded (NaN)."""
    nan = float("nan")
    return CheckPlan(
        tuple(int(l) for l in check_layers), nan, nan, nan, nan, 0, False, nan, threshold
    )


class PlannedPolicy(ExitPolicy):
    """An exit policy with its check schedule (one per batch size) and stop threshold planned on
    calibration traces: a meta-estimator shaped like scikit-learn's `TunedThresholdClassifierCV`.

    `fit(traces)` fits a clone of `policy` on the traces' rows (one per query and layer, labelled
    per `target`), then, with `check_costs`, plans with `plan_checks_by_batch`. The engine and
    the offline replay use it as the policy it wraps: `decide`, `predict`, `decision_function`,
    `cost_flops` and `features` are `policy_`'s, the check schedule for a batch comes from
    `plans_` (`planned_checks`).

    Parameters
    ----------
    policy : the exit policy to fit and plan (left as given; `policy_` is a fitted copy).
    check_costs : one exit check in decoder layers (`measure_check_cost`), one number or
        {batch size: cost}. None: no plan, check every layer as the paper does (the policy is
        still fitted and records its target and model).
    shortlist_costs : {batch size: cost of a shortlist check}: plan for an engine with
        `shortlist` checks (`check_cost_layers`).
    target : "gold" | "final": what the classifier learns per layer (`offline.Traces.labels`).
    thresholds : stop thresholds to try, for a policy with a `threshold` parameter (one is chosen
        for every batch size); None keeps the policy's own.
    risk, epsilon, delta : the promise a plan keeps: its risk ("consistency": the share of
        answers that differ from the full model's, label-free; "accuracy": the share of answers
        the full model gets right and the plan wrong) is at most `epsilon`, except with
        probability `delta` over the calibration queries, for queries like them (Learn-then-Test,
        `risk.py`). The traces are split: `1 - test_share` of them fit the classifier and order
        the candidates, `test_share` test them. None: the agreement / loss-bound test of
        `min_agreement`, `confidence` and `tolerance` on out-of-fold replays (no guarantee).
    test_share : the share of the traces that tests the plans (with `risk`).
    min_agreement, confidence, tolerance : the test without `risk` (`plan_checks_by_batch`).
    margin : the saving a plan must make over the plain model.
    strides, folds, seed : the candidate schedules and the cross-fitting of the replays.
    prefit : `policy` is already fitted: use a copy of it as it is (a saved policy planned for
        new costs); with `folds` > 1 clones of it are still fitted fold by fold to judge plans.

    Fitted attributes
    -----------------
    policy_ : the fitted policy, with the chosen stop threshold set.
    plans_ : {batch size: CheckPlan}, ascending; {} without `check_costs`.
    threshold_ : the stop threshold `policy_` runs with (None: it has none).
    target_ : the labels `policy_` was fitted on (None: it learns nothing).
    model_ : signature of the model the traces came from (`Traces.model`), or None.
    """

    def __init__(
        self,
        policy,
        *,
        check_costs: float | Mapping[int, float] | None = None,
        shortlist_costs: Mapping[int, float] | None = None,
        target: str = "gold",
        thresholds: Sequence[float] | None = None,
        min_agreement: float | None = None,
        confidence: float | None = None,
        tolerance: float = 0.01,
        margin: float = 0.02,
        strides: Sequence[int] = (1, 2, 3, 4, 6),
        folds: int = 5,
        seed: int = 0,
        prefit: bool = False,
        risk: str | None = risk_control.RISK,
        epsilon: float = risk_control.EPSILON,
        delta: float = risk_control.DELTA,
        test_share: float = 0.5,
    ):
        self.policy = policy
        self.check_costs = check_costs
        self.shortlist_costs = shortlist_costs
        self.target = target
        self.thresholds = thresholds
        self.min_agreement = min_agreement
        self.confidence = confidence
        self.tolerance = tolerance
        self.margin = margin
        self.strides = strides
        self.folds = folds
        self.seed = seed
        self.prefit = prefit
        self.risk = risk
        self.epsilon = epsilon
        self.delta = delta
        self.test_share = test_share

    def fit(self, traces: Traces, replays: ScheduleReplays | None = None):
        """Fit on calibration `traces` (`offline.Traces`). `replays`: without `risk`,
        `replay_schedules(...)` of the fitted policy on these traces, made once to plan for
        exact and shortlist checks without replaying twice (its `strides`, `folds`, `seed`,
        `thresholds`, `target` then apply); with `risk`, the same on the testing share
        (`split`)."""
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; choose from {', '.join(TARGETS)}")
        if self.risk is not None and self.check_costs is not None:
            policy, plans = self._fit_ltt(traces, replays)
        else:
            policy, plans = self._fit_tested(traces, replays)
        chosen = {p.threshold for p in plans.values()} - {None}
        if chosen:  # one for every batch size, set on the copy as GridSearchCV's best_estimator_
            policy.set_params(threshold=chosen.pop())
        self.policy_ = policy
        self.plans_ = {int(b): p for b, p in sorted(plans.items())}
        self.threshold_ = policy.get_params().get("threshold")
        self.target_ = self.target if policy.trainable else None
        self.model_ = traces.model
        return self

    def split(self, traces: Traces) -> tuple[Traces, Traces]:
        """(fitting and ordering traces, testing traces) for Learn-then-Test: a seeded split,
        so the plans are tested on queries the classifier and the order never saw."""
        if not 0 < self.test_share < 1:
            raise ValueError(
                f"test_share is a share of the traces, between 0 and 1; got {self.test_share}"
            )
        n = len(traces)
        tests = np.random.default_rng(self.seed).permutation(n) < round(self.test_share * n)
        if tests.all() or not tests.any():
            raise ValueError(f"{n} calibration queries cannot be split to fit and to test plans")
        return traces.subset(~tests), traces.subset(tests)

    def _fit_ltt(self, traces: Traces, replays: ScheduleReplays | None):
        """The classifier fitted and the candidates ordered on one share of the traces, the plans
        tested on the other (`plan_checks_by_batch` with `risk`)."""
        fitting, testing = self.split(traces)
        policy = self._fitted_policy(fitting)
        replay = dict(strides=self.strides, thresholds=self.thresholds, seed=self.seed)
        order = replay_schedules(policy, fitting, folds=self.folds, target=self.target, **replay)
        plans = plan_checks_by_batch(
            policy,
            testing,
            self._check_costs(),
            margin=self.margin,
            shortlist_costs=self.shortlist_costs,
            replays=replays or replay_schedules(policy, testing, folds=1, **replay),
            order_replays=order,
            risk=self.risk,
            epsilon=self.epsilon,
            delta=self.delta,
        )
        return policy, plans

    def _fit_tested(self, traces: Traces, replays: ScheduleReplays | None):
        """The classifier fitted on all traces, plans by the agreement / loss-bound test (or
        none without check costs)."""
        policy = self._fitted_policy(traces)
        plans = {}
        if self.check_costs is not None:
            plans = plan_checks_by_batch(
                policy,
                traces,
                self._check_costs(),
                tolerance=self.tolerance,
                margin=self.margin,
                strides=self.strides,
                folds=self.folds,
                seed=self.seed,
                shortlist_costs=self.shortlist_costs,
                min_agreement=self.min_agreement,
                thresholds=self.thresholds,
                replays=replays,
                confidence=self.confidence,
                target=self.target,
            )
        return policy, plans

    def _fitted_policy(self, traces: Traces):
        if self.prefit:
            return copy.deepcopy(self.policy)
        policy = clone(self.policy)
        if policy.trainable:
            policy.fit(*traces.training_arrays(policy.features, self.target))
        return policy

    def _check_costs(self) -> dict[int, float]:
        costs = self.check_costs
        costs = dict(costs) if isinstance(costs, Mapping) else {1: costs}
        # a negative or NaN cost makes checks look free (or is never compared): refuse it
        bad = {b: c for b, c in costs.items() if not (int(b) >= 1 and 0 <= float(c) < np.inf)}
        if bad or not costs:
            raise ValueError(
                f"check_costs: batch sizes must be >= 1 and costs finite and >= 0, got {bad}"
            )
        return {int(b): float(c) for b, c in costs.items()}

    @classmethod
    def from_plans(cls, policy, plans: Mapping, *, target=None, model=None) -> PlannedPolicy:
        """A fitted PlannedPolicy from known plans ({batch size: CheckPlan, or check layers}) for
        `policy` as fitted: a policy file read back, or a schedule chosen by hand."""
        planned = cls(policy, target=target or "gold", prefit=True)
        planned.policy_ = policy
        planned.plans_ = {
            int(b): p if isinstance(p, CheckPlan) else known_plan(p)
            for b, p in sorted(plans.items())
        }
        planned.threshold_ = policy.get_params().get("threshold")
        planned.target_, planned.model_ = target, model
        return planned

    # ---------------------------------------------------------------- what the engine asks
    def planned_checks(self, batch_size: int | None = None) -> tuple[int, ...] | None:
        """The plan of the largest planned batch size not above `batch_size` (else the
        smallest); without a batch size, the smallest size's. None when nothing was planned."""
        check_is_fitted(self, "plans_")
        return schedule_for({b: p.check_layers for b, p in self.plans_.items()}, batch_size)

    @property
    def features(self) -> tuple[str, ...]:
        return getattr(self, "policy_", self.policy).features

    def decide(self, step) -> np.ndarray:
        return self.policy_.decide(step)

    def predict(self, X) -> np.ndarray:
        return self.policy_.predict(X)

    def decision_function(self, X) -> np.ndarray:
        return self.policy_.decision_function(X)

    @available_if(lambda self: hasattr(self.policy, "predict_proba"))
    def predict_proba(self, X) -> np.ndarray:
        return self.policy_.predict_proba(X)

    def cost_flops(self) -> float:
        return self.policy_.cost_flops()
