"""Does a check plan learned on calibration queries hold on held-out ones?

The speed issue's quality target: on SST-2 5-shot the default policy must stay within 1 point
of the full model's accuracy while getting at least 60% of the oracle's layer saving. `adainfer
bench` times 32 queries per cell, too few to resolve 1 point; this replays the same policies and
planner on the 200 held-out queries of an `adainfer reproduce` run instead, or on more queries
recorded with `adainfer collect --held-out` (`--test-traces`); replay equals live runs
(tests/test_offline.py):

- planning as before this work (in-sample, accuracy only), out of fold, and out of fold with the
  agreement test (`--min-agreement`, default `checks.MIN_AGREEMENT`) or the loss bound
  (`--confidence`, default `checks.CONFIDENCE`), for the paper's SVM, one
  logistic model for all layers and the default policy (a logistic model per layer);
- calibrated on one half of the held-out queries and evaluated on the other, both ways (as
  `adainfer bench` calibrates), or on the task's pool (`--calibrate-on pool`);
- the bound: the settled oracle, how well the features can see it, and each logistic policy's
  accuracy / saving trade-off threshold by threshold.

    adainfer collect --model qwen2.5-0.5b --dtype bfloat16 --task sst2 --shots 5 --n-test 872 \
        --n-train 0 --held-out --data-dir ../shared/data --out results/qwen2.5-0.5b-sst2-872
    python bench/plan_quality.py results/qwen2.5-0.5b --test-traces results/qwen2.5-0.5b-sst2-872 \
        --task sst2 --shots 5 --check-cost 1:1.19,8:0.18,32:0.10

Prints markdown; --out writes it with the numbers as JSON.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
from pathlib import Path

import numpy as np
from sklearn.base import clone

from adainfer.bench import DEFAULT_TARGET
from adainfer.checks import (
    CONFIDENCE,
    MIN_AGREEMENT,
    THRESHOLDS,
    PlannedPolicy,
    _with_threshold,
    check_cost_layers,
)
from adainfer.cli import parse_check_cost
from adainfer.collect import load_collected, select_tasks
from adainfer.features import ALL_FEATURES, DEFAULT_FEATURES
from adainfer.files import write_json, write_text_atomic
from adainfer.offline import Traces, oracle_bounds, simulate
from adainfer.policies import LayerLogisticExit, LogisticExit, SVMExit
from adainfer.report import format_layers, markdown_table
from adainfer.risk import DELTA, EPSILON, RISK, RISKS

# (planning, folds, min agreement): as before the planner was judged out of fold, out of fold,
# and with the agreement / loss-bound test (None: the --min-agreement and --confidence given);
# "ltt": as `adainfer` plans now, Learn-then-Test at --risk, --epsilon, --delta
MODES = (
    ("in-sample, accuracy only", 1, 0.0),
    ("out of fold, accuracy only", 5, 0.0),
    ("out of fold, {}% agreement", 5, None),
    ("ltt", 5, None),
)


POLICIES = {  # short name for --only: (description, classifier, labels, thresholds tried)
    "svm": (
        "SVM (the paper's classifier) on gap, top prob and depth (depth is ours); gold labels",
        lambda: SVMExit(features=("gap", "top_prob", "layer_frac")),
        "gold",
        None,
    ),
    "logistic": (
        "logistic, one model for all layers, on gap, top prob, entropy, depth; final labels; "
        "tuned threshold",
        lambda: LogisticExit(features=DEFAULT_FEATURES),
        DEFAULT_TARGET,
        THRESHOLDS,
    ),
    "layer-logistic": (
        "per-layer logistic on gap, top prob, entropy; final labels; tuned threshold",
        lambda: LayerLogisticExit(features=DEFAULT_FEATURES),
        DEFAULT_TARGET,
        THRESHOLDS,
    ),
}


def fitted(make, target: str, traces: Traces):
    return make().fit(*traces.training_arrays(make().features, target))


def frontier(splits, fits, oracle: float) -> dict:
    """The accuracy / saving trade-off of a policy (`fits`: fitted on each split's calibration
    half) on the held-out queries, threshold by threshold, checking every layer from L/2 (check
    cost aside): the best any plan of it gets."""
    L, rows, body = splits[0][1].num_layers, [], []
    full = float(np.concatenate([ev.top1[:, -1] == ev.gold for _, ev in splits]).mean())
    for t in THRESHOLDS:
        got = [
            simulate(_with_threshold(copy.deepcopy(policy), t), ev, check_layers=range(L // 2, L))
            for policy, (_, ev) in zip(fits, splits)
        ]
        correct, agrees = (
            np.concatenate([r.correct for r in got]),
            np.concatenate([r.agrees for r in got]),
        )
        exit_layer = float(np.concatenate([r.exit_layer for r in got]).mean())
        share = (L - exit_layer) / (L - oracle) if oracle < L else None
        rows.append(
            dict(
                threshold=t,
                accuracy_delta=float(correct.mean()) - full,
                agreement=float(agrees.mean()),
                mean_exit_layer=exit_layer,
                share_of_oracle_saving=share,
            )
        )
        body.append(
            [
                t,
                f"{100 * (correct.mean() - full):+.1f}",
                f"{100 * agrees.mean():.1f}",
                f"{exit_layer:.2f}",
                "-" if share is None else f"{100 * share:.0f}%",
            ]
        )
    text = (
        f"Trade-off of {type(fits[0]).__name__} on the held-out queries, every layer from "
        f"{L // 2} checked:\n\n"
        + markdown_table(
            [
                "threshold",
                "accuracy vs full (points)",
                "agreement with full (%)",
                "exit layer",
                "share of oracle saving",
            ],
            body,
        )
    )
    return {"text": text, "rows": rows}


def settled_bound(test: Traces) -> dict:
    """What any policy could save at no loss, and whether the features can see it.

    The settled layer (after which the top-1 never changes) is the earliest exit that keeps the
    full model's answer; a perfect detector would exit there. Per layer, the cross-validated AUC
    of a logistic regression on all features for "this row's top-1 is already final" says how
    much of that a feature-based policy can find (0.5: nothing)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import cross_val_predict

    L = test.num_layers
    settled = oracle_bounds(test)["settled"]
    aucs = {}
    for layer in range(max(1, L - 8), L):
        y = settled <= layer
        if 5 <= y.sum() <= len(y) - 5:
            p = cross_val_predict(
                LogisticRegression(max_iter=2000),
                test.features[:, layer - 1],
                y,
                cv=5,
                method="predict_proba",
            )[:, 1]
            aucs[layer] = float(roc_auc_score(y, p))
    text = (
        "Settled oracle (earliest layer after which the top-1 never changes; exiting there "
        f"keeps every answer): mean {settled.mean():.2f} of {L}, "
        f"{100 * (settled < L).mean():.0f}% of rows settled before the last layer. "
        "Cross-validated AUC of all features for 'already final' at layer l: "
        + ", ".join(f"{l}: {a:.2f}" for l, a in aucs.items())
        + "."
    )
    return {
        "text": text,
        "numbers": {"mean_settled_layer": float(settled.mean()), "auc_by_layer": aucs},
    }


def _splits(pool: Traces, test: Traces, calibrate_on: str, seed: int = 0):
    """(calibration, evaluation) pairs: the pool against all held-out queries, or two halves of
    the held-out queries against each other (every query evaluated once, by a plan that never
    saw it)."""
    if calibrate_on == "pool":
        return [(pool, test)]
    half = np.random.default_rng(seed).permutation(len(test)) % 2
    return [(test.subset(half != f), test.subset(half == f)) for f in (0, 1)]


def main(argv=None):
    args = _parser().parse_args(argv)
    pool, test, meta = _load_traces(args)
    if args.check_cost_from:
        run = json.loads((args.run / "traces" / "run.json").read_text())
        costs = bench_check_costs(args.check_cost_from, run, args.task, args.shots)
    else:
        costs = args.check_cost if isinstance(args.check_cost, dict) else {1: args.check_cost}
    policies = {POLICIES[k][0]: POLICIES[k][1:] for k in dict.fromkeys(args.only or POLICIES)}
    splits = _splits(pool, test, args.calibrate_on)
    L = test.num_layers
    full = float((test.top1[:, -1] == test.gold).mean())
    oracle = float(oracle_bounds(test)["first_correct"].mean())
    # each policy is fitted once per calibration half; the planning modes and the frontier share it
    fits = {
        name: [fitted(make, target, cal) for cal, _ in splits]
        for name, (make, target, _) in policies.items()
    }
    rows, body = [], []
    for (name, (_make, target, thresholds)), (mode, folds, agreement) in itertools.product(
        policies.items(), MODES
    ):
        mode, agreement = _mode(mode, agreement, args)
        got_by_bs = _planned_and_replayed(
            fits[name], splits, costs, args, target, thresholds, folds, agreement, mode
        )
        for bs, got in got_by_bs.items():
            row = _row(name, mode, bs, costs[bs], got, args.calibrate_on, L, full, oracle)
            rows.append(row)
            body.append(_table_line(row, got, L))
    table = _table(body)
    head = _head(meta, args, pool, test)
    bound = settled_bound(test)
    fronts = {
        name: frontier(splits, fits[name], oracle)
        for name, (_, _, thresholds) in policies.items()
        if thresholds
    }
    table += "\n\n" + bound["text"] + "".join("\n\n" + f["text"] for f in fronts.values())
    print(head + "\n\n" + table)
    if args.out:
        _write(args, head, table, rows, bound, fronts)


def bench_check_costs(path: Path, run: dict, task: str, shots: int) -> dict[int, float]:
    """{batch size: decoder layers per check} that `adainfer bench` measured for the model
    and dtype of `run` (a reproduce run.json) on `task` with `shots` (bench.md's "check")."""
    rows = [
        r
        for r in json.loads(Path(path).read_text())["rows"]
        if (r["model"], r["dtype"], r["task"], r["shots"])
        == (run["model"], run["dtype"], task, shots)
    ]
    if not rows:
        raise SystemExit(
            f"{path} has no {run['model']} {run['dtype']} {task} {shots}-shot cell: run "
            "`adainfer bench` for it first, or give --check-cost"
        )
    return {int(r["batch_size"]): float(r["check_cost_layers"]) for r in rows}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "run",
        type=Path,
        help="output folder of `adainfer reproduce` (with traces/train and traces/test)",
    )
    p.add_argument("--task", default="sst2")
    p.add_argument("--shots", type=int, default=5)
    p.add_argument(
        "--check-cost",
        type=parse_check_cost,
        default={1: 1.0},
        help="decoder layers per check, or BATCH:COST pairs",
    )
    p.add_argument(
        "--check-cost-from",
        type=Path,
        help="take the check costs from an `adainfer bench` bench.json (the run's model, "
        "dtype, --task and --shots; every batch size it timed) instead of --check-cost",
    )
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument(
        "--confidence",
        type=float,
        default=CONFIDENCE,
        help="a plan below the agreement level passes if its accuracy "
        "loss is within the tolerance at this confidence (0: agreement test only) "
        "(default: %(default)s)",
    )
    p.add_argument("--risk", choices=RISKS, default=RISK, help="for the ltt mode")
    p.add_argument("--epsilon", type=float, default=EPSILON, help="for the ltt mode")
    p.add_argument("--delta", type=float, default=DELTA, help="for the ltt mode")
    p.add_argument(
        "--min-agreement",
        type=float,
        default=MIN_AGREEMENT,
        help="for the agreement-tested plans (default: %(default)s)",
    )
    p.add_argument(
        "--calibrate-on",
        choices=("held-out", "pool"),
        default="held-out",
        help="held-out: two halves of the held-out queries, each calibrating the plan for the "
        "other (what `adainfer bench` does); pool: the run's training traces (the task's "
        "demonstration pool)",
    )
    p.add_argument(
        "--test-traces",
        type=Path,
        help="held-out traces to use instead of the run's traces/test, e.g. "
        "`adainfer collect --held-out --n-test 872` for more queries than the run has",
    )
    p.add_argument(
        "--only",
        choices=tuple(POLICIES),
        action="append",
        help="these policies only (repeatable; default: all three)",
    )
    p.add_argument(
        "--out", type=Path, help="write the table (.md) and numbers (.json) here, without suffix"
    )
    return p


def _load_traces(args) -> tuple[Traces, Traces, dict]:
    """(the run's pool traces, the held-out traces, the run's metadata), of the task and shots
    asked for."""
    train, meta = load_collected(args.run / "traces" / "train")
    test_table, test_meta = load_collected(args.test_traces or args.run / "traces" / "test")
    if test_meta["model"] != meta["model"]:
        raise SystemExit(
            f"{args.test_traces} holds traces of {test_meta['model']['model_id']}, the run "
            f"{meta['model']['model_id']}: "
            "plans must be judged on the model they were made for"
        )
    pool = Traces.from_table(select_tasks(train, [args.task]), ALL_FEATURES)
    pool = pool.subset(pool.shots == args.shots)
    test = Traces.from_table(test_table, ALL_FEATURES)
    test = test.subset((test.task == args.task) & (test.shots == args.shots))
    if len(test) == 0 or (args.calibrate_on == "pool" and len(pool) == 0):
        raise SystemExit(
            f"no {args.task} traces in {args.run} (pool {len(pool)}, held-out {len(test)} "
            f"at k={args.shots})"
        )
    return pool, test, meta


def _mode(mode: str, agreement: float | None, args) -> tuple[str, float]:
    """A planning mode's name and agreement level (None: the --min-agreement and --confidence
    given)."""
    if mode == "ltt":
        return f"Learn-then-Test, {args.risk} <= {args.epsilon:g} at delta {args.delta:g}", None
    if agreement is None:
        agreement, mode = args.min_agreement, mode.format(f"{100 * args.min_agreement:g}")
        mode += f" or loss bounded at {100 * args.confidence:g}%" if args.confidence else ""
    return mode, agreement


def _planned_and_replayed(fits, splits, costs, args, target, thresholds, folds, agreement, mode):
    """{batch size: [(plan, replay)] per split}: each split's fitted policy planned on its
    calibration queries as `adainfer` plans, replayed on its evaluation queries."""
    per_bs = {bs: [] for bs in costs}
    for policy, (cal, ev) in zip(fits, splits):
        ltt = mode.startswith("Learn-then-Test")
        test = dict(risk=args.risk, epsilon=args.epsilon, delta=args.delta) if ltt else {}
        planned = PlannedPolicy(
            # the agreement modes: fitted once per split, shared by the modes and the frontier;
            # LTT fits it on the share of the calibration half that does not test
            clone(policy) if ltt else policy,
            prefit=not ltt,
            check_costs=costs,
            target=target,
            tolerance=args.tolerance,
            folds=folds,
            min_agreement=agreement,
            confidence=args.confidence,
            thresholds=thresholds,
            **({"risk": None} | test),
        ).fit(cal)
        for bs, plan in planned.plans_.items():
            per_bs[bs].append((plan, simulate(planned, ev, batch_size=bs)))
    return per_bs


def _row(name, mode, bs, cost, got, calibrate_on, L, full, oracle) -> dict:
    """The numbers of one policy, planning mode and batch size, over every split's held-out
    replays (`got`: (plan, replay) per split)."""
    correct = np.concatenate([r.correct for _, r in got])
    agrees = np.concatenate([r.agrees for _, r in got])
    exits = np.concatenate([r.exit_layer for _, r in got])
    cost_layers = np.concatenate([check_cost_layers(r, L, cost) for _, r in got])
    exit_layer = float(exits.mean())
    return dict(
        policy=name,
        mode=mode,
        batch_size=bs,
        check_cost=cost,
        calibrate_on=calibrate_on,
        plans=[
            dict(
                check_layers=list(p.check_layers),
                threshold=p.threshold,
                calibration_accuracy=p.expected_accuracy,
                calibration_agreement=p.expected_agreement,
            )
            for p, _ in got
        ],
        full_accuracy=full,
        accuracy=float(correct.mean()),
        agreement=float(agrees.mean()),
        mean_exit_layer=exit_layer,
        oracle_exit_layer=oracle,
        share_of_oracle_saving=(L - exit_layer) / (L - oracle) if oracle < L else None,
        cost_layers=float(cost_layers.mean()),
    )


def _table_line(row: dict, got, L: int) -> list:
    """`row` as a line of the markdown table, with each split's plan."""
    # one cell for all splits' plans: joined by "|" they became extra columns
    plans = "; ".join(
        f"{format_layers(p.check_layers)} @ {p.threshold if p.threshold is not None else '-'}"
        for p, _ in got
    )
    acc, full, share = row["accuracy"], row["full_accuracy"], row["share_of_oracle_saving"]
    return [
        row["policy"],
        row["mode"],
        row["batch_size"],
        f"{row['check_cost']:.2f}",
        plans,
        f"{100 * acc:.1f} / {100 * full:.1f}",
        f"{100 * (acc - full):+.1f}",
        f"{100 * row['agreement']:.1f}",
        f"{row['mean_exit_layer']:.2f} / {row['oracle_exit_layer']:.2f} / {L}",
        "-" if share is None else f"{100 * share:.0f}%",
        f"{row['cost_layers']:.2f}",
    ]


def _table(body) -> str:
    return markdown_table(
        [
            "policy",
            "planning",
            "batch",
            "check cost",
            "check layers @ threshold (per calibration split)",
            "held-out acc (policy / full)",
            "delta",
            "agreement with full (%)",
            "exit layer (policy / oracle / L)",
            "share of oracle saving",
            "cost, layers",
        ],
        body,
    )


def _head(meta, args, pool: Traces, test: Traces) -> str:
    """What was judged, and how the plans were calibrated."""
    where = {
        "pool": f"the {len(pool)} pool queries",
        "held-out": "one half of the held-out queries, evaluated on the other half, both ways",
    }
    return (
        f"{meta['model']['model_id']}, {args.task} {args.shots}-shot, {len(test)} held-out "
        "queries; plans calibrated on "
        f"{where[args.calibrate_on]}; tolerance {args.tolerance}"
        + (f", or within it at {100 * args.confidence:g}% confidence" if args.confidence else "")
    )


def _write(args, head: str, table: str, rows, bound: dict, fronts: dict):
    """The table as `args.out`.md, the numbers as `args.out`.json."""
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(Path(f"{args.out}.md"), f"{head}\n\n{table}\n")
    write_json(
        Path(f"{args.out}.json"),
        {
            "run": str(args.run),
            "task": args.task,
            "shots": args.shots,
            "rows": rows,
            "settled_bound": bound["numbers"],
            "frontier": {n: f["rows"] for n, f in fronts.items()},
        },
    )


if __name__ == "__main__":
    main()
