"""The end-to-end recipe (collect -> fit -> evaluate), shared by the CLI and the demo."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from .checks import THRESHOLDS, PlannedPolicy
from .collect import load_collected
from .features import ALL_FEATURES
from .offline import Traces
from .persist import load_policy
from .policies import POLICIES, ExitPolicy, make_policy


def fit_policy(
    data_dir,
    policy: ExitPolicy,
    tasks: Sequence[str] | None = None,
    check_cost: float | Mapping[int, float] | None = None,
    *,
    target: str = "gold",
    tune_threshold: bool = True,
    **plan_test,
) -> PlannedPolicy:
    """`policy` fitted on collected rows: a `checks.PlannedPolicy` holding a fitted copy of it
    and the model the rows came from (`policy` itself is left as given).

    `target`: what the classifier learns per layer, "gold" (the paper: the top-1 is the gold
    token) or "final" (the top-1 is already the full model's answer; `offline.Traces.labels`).
    With `check_cost` (one exit check, in decoder layers; or {batch size: cost}) it also learns
    where checking pays, per batch size, and (`tune_threshold`, for policies with a stop
    threshold) how sure it must be to stop (`checks.plan_checks_by_batch`); without, it checks
    every layer as in the paper. `plan_test`: the promise a plan keeps, `risk`, `epsilon`,
    `delta` (default: `risk.RISK`, `risk.EPSILON`, `risk.DELTA`; Learn-then-Test, on a share
    of the rows the classifier is not fitted on), or with `risk=None` the agreement test
    (`min_agreement`, `confidence`); see `checks.PlannedPolicy`."""
    table, meta = load_collected(data_dir, tasks)
    if table.num_rows == 0:
        raise ValueError(
            f"no collected rows in {data_dir}" + (f" for tasks {list(tasks)}" if tasks else "")
        )
    collected = [f for f in ALL_FEATURES if f in table.column_names]
    planner = PlannedPolicy(
        policy,
        check_costs=check_cost,
        target=target,
        thresholds=THRESHOLDS if tune_threshold else None,
        **plan_test,
    )
    return planner.fit(Traces.from_table(table, collected, model=meta["model"]))


def resolve_policy(
    spec: str, features: Sequence[str] | None = None, *, ready: bool = False
) -> ExitPolicy:
    """A saved policy file, or a policy name (untrained; `gap`, `never`, `oracle` need no training).
    `ready`: the policy will run as is, so a name that needs training is an error."""
    if spec in POLICIES:
        params = {"features": tuple(features)} if features and spec not in ("gap",) else {}
        policy = make_policy(spec, **params)
        if ready and policy.trainable:
            raise ValueError(
                f"--policy {spec} needs training first: `adainfer fit --data <collected dir> "
                f"--policy {spec} --out {spec}.safetensors`, then pass that file (untrained "
                "names: gap, never, oracle)"
            )
        return policy
    if Path(spec).exists():
        return load_policy(spec)
    raise ValueError(
        f"--policy {spec!r} is neither a saved policy file nor one of {', '.join(POLICIES)}"
    )
