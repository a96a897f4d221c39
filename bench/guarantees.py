"""Do the planners' guarantees hold? Coverage measured over many calibration / test splits.

A plan promises that its risk stays within epsilon, except with probability delta over the
calibration queries. This measures how often the promise breaks, for the planner as it was
before risk control (every candidate tested alone: accuracy within 1 point and 97% agreement
or a 95% paired bound, the cheapest kept) and for Learn-then-Test (`adainfer.risk`), and what
each keeps of the layer saving.

The classifier (the default policy: a logistic model per layer on gap, top prob and entropy,
"final" labels) is fitted on the run's pool traces of the task (`traces/train`), and the LTT
order is the candidates' risk estimated there, so neither has seen the queries that calibrate
or judge. Every candidate (stop threshold x check schedule) is replayed once on every query
(the per-layer stop probabilities are computed once; exits follow as numpy), and each split is
a resampling of query indices: 500 splits x 3 calibration sizes take seconds per task.

- `sst2`: the 872 SST-2 validation queries of Qwen2.5-0.5B and Gemma-3-270M (5-shot), at
  calibration sizes 100, 200, 436, the rest judging;
- `reproduce`: every task of the reproduce runs (few-shot, k >= 5 pooled: 800 queries per task
  on SmolLM2 and Qwen, 200 on Gemma), at each size that leaves at least 100 judging queries;
- `loto`: leave one task out: classifier and order from the other tasks' pools, calibration
  drawn from the other tasks' queries, deployment on the left-out task.

"Violation" is the share of splits whose chosen plan has risk above epsilon: on the test split
(as asked), and on the whole query set (the population the splits are drawn from; the
promise is about this one, the test split adds its own noise). A plan that runs the plain
model has risk 0.

    python bench/guarantees.py --out results/guarantees
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np

from adainfer.checks import THRESHOLDS, candidate_schedules
from adainfer.collect import load_collected, select_tasks
from adainfer.features import ALL_FEATURES, DEFAULT_FEATURES
from adainfer.files import write_json, write_text_atomic
from adainfer.offline import Traces, simulate
from adainfer.policies import LayerLogisticExit
from adainfer.report import markdown_table
from adainfer.risk import fixed_sequence, order_by_risk, p_value

RESULTS = Path(__file__).resolve().parents[1] / "results"
# one exit check in decoder layers, batch 8, bf16 (results/bench/bench.json)
CHECK_COST = {"qwen2.5-0.5b": 0.18, "gemma3-270m": 0.47, "smollm2-135m": 0.14}
SIZES = (100, 200, 436)
EPSILONS = (0.01, 0.02, 0.05)
DELTAS = (0.05, 0.1)
MIN_TEST = 100
# the planner before risk control (checks.py at main): tolerance, agreement, confidence, margin
BEFORE = dict(tolerance=0.01, agreement=0.97, confidence=0.95, margin=0.02)


# ------------------------------------------------------------------ replaying every candidate
def fitted_policy(pool: Traces) -> LayerLogisticExit:
    policy = LayerLogisticExit(features=DEFAULT_FEATURES)
    return policy.fit(*pool.training_arrays(policy.features, "final"))


def stop_probability(policy, traces: Traces) -> np.ndarray:
    """[Q, L] the policy's stop probability at every layer (it reads one layer at a time)."""
    Q, L = traces.top1.shape
    cols = [traces.feature_names.index(f) for f in policy.features]
    X = traces.features[:, :, cols].reshape(Q * L, len(cols))
    return policy.predict_proba(X)[:, 1].reshape(Q, L)


def replay_all(policy, traces: Traces, check_cost: float) -> dict:
    """Every candidate's exit per query: {name: [C, Q]} and the candidates (threshold,
    schedule), C = thresholds x schedules."""
    Q, L = traces.top1.shape
    proba = stop_probability(policy, traces)
    schedules = list(candidate_schedules(L))
    cands, exits, checks = [], [], []
    for t in THRESHOLDS:
        stop = (proba - t + 1e-12) > 0  # as LogisticExit.decision_function decides
        for s in schedules:
            mask = np.zeros(L, bool)
            mask[[l - 1 for l in s]] = True
            hit = stop & mask
            exit_layer = np.where(hit.any(1), hit.argmax(1) + 1, L)
            made = np.cumsum(mask)[exit_layer - 1]  # checks at or before the exit
            cands.append((t, s))
            exits.append(exit_layer)
            checks.append(made)
    exits, checks = np.array(exits), np.array(checks)
    answer = traces.top1[np.arange(Q)[None], exits - 1]  # [C, Q]
    full, gold = traces.top1[:, -1], traces.gold
    return dict(
        candidates=cands,
        exit=exits,
        cost=(exits + check_cost * checks).astype(np.float32),
        consistency=(answer != full).astype(np.float32),
        accuracy=((full == gold) & (answer != gold)).astype(np.float32),
        diff=((answer == gold).astype(np.float32) - (full == gold)),
        num_layers=L,
    )


def check_against_simulate(policy, traces: Traces, replay: dict, picks=(0, 57, -1)) -> None:
    """The vectorised replay equals `offline.simulate` (which equals live runs)."""
    for c in picks:
        t, s = replay["candidates"][c]
        policy.set_params(threshold=t)
        r = simulate(policy, traces, check_layers=s)
        assert (r.exit_layer == replay["exit"][c]).all(), (t, s)


# ------------------------------------------------------------------ the planners, per split
def split_masks(N: int, n: int, splits: int, rng) -> np.ndarray:
    """[splits, N] True for the n calibration queries of each split."""
    return np.argsort(rng.random((splits, N)), axis=1) < n


def calibration_sums(rep: dict, cal: np.ndarray) -> dict:
    """{name: [C, splits]} each candidate's summed loss, cost and paired difference over each
    split's calibration queries (one matrix product per quantity)."""
    M = cal.T.astype(np.float32)  # [N, S]
    sums = {k: rep[k] @ M for k in ("consistency", "accuracy", "cost", "diff")}
    sums["diff_sq"] = np.abs(rep["diff"]) @ M  # the difference is -1, 0 or 1
    sums["n"] = int(cal[0].sum())
    return sums


def plan_before(rep: dict, sums: dict) -> np.ndarray:
    """[splits] the candidate the planner before risk control picks on each split's
    calibration queries (-1: none, the plain model): every candidate tested alone
    (`checks._passing` at main, vectorised)."""
    n, tol = sums["n"], BEFORE["tolerance"]
    mean = sums["diff"] / n
    sd = np.sqrt(np.maximum(sums["diff_sq"] / n - mean**2, 0) * n / (n - 1))
    z = NormalDist().inv_cdf(BEFORE["confidence"])
    agree = 1 - sums["consistency"] / n
    bounded = mean - z * sd / np.sqrt(n) >= -tol
    passing = (mean >= -tol) & ((agree >= BEFORE["agreement"]) | bounded)
    return cheapest(rep, passing, sums)


def plan_ltt(rep, sums, order, risk: str, eps: float, delta: float) -> np.ndarray:
    """[splits] the cheapest candidate LTT accepts on each split (-1: none)."""
    p = p_value(sums[risk][order], sums["n"], eps)  # [C, S] in testing order
    prefix = fixed_sequence(p, delta)  # [S]
    accepted = np.zeros(p.shape, dtype=bool)
    accepted[order] = np.arange(len(order))[:, None] < prefix[None]
    return cheapest(rep, accepted, sums)


def cheapest(rep: dict, ok: np.ndarray, sums: dict) -> np.ndarray:
    """Per split, the allowed candidate of lowest calibration cost, if it beats the plain model
    by the margin (-1 otherwise), as `checks._cheapest` decides."""
    cost = np.where(ok, sums["cost"] / sums["n"], np.inf)
    best = cost.argmin(0)
    L = rep["num_layers"]
    return np.where(cost[best, np.arange(len(best))] <= L * (1 - BEFORE["margin"]), best, -1)


def judged(rep: dict, chosen: np.ndarray, judge: np.ndarray, eps: float) -> dict:
    """Risk and cost of each split's chosen plan on its judging queries (`judge` [S, N]) and on
    all queries; the plain model where nothing was chosen."""
    L, S = rep["num_layers"], len(chosen)
    c = np.maximum(chosen, 0)
    plain = chosen < 0
    m = judge.sum(1)

    def on(name, mask):
        v = (rep[name][c] * mask).sum(1) / mask.sum(1) if mask is not None else rep[name][c].mean(1)
        return np.where(plain, 0.0 if name != "cost" else L, v)

    full = None  # every query
    cost = on("cost", judge)
    out = {}
    for risk in ("consistency", "accuracy"):
        out[risk] = dict(test=on(risk, judge), population=on(risk, full))
    return dict(
        risks=out,
        accuracy_drop=dict(test=-on("diff", judge), population=-on("diff", full)),
        saving=1 - cost / L,
        plain=plain,
        test_size=int(m[0]),
        splits=S,
    )


def rate(x: np.ndarray) -> float:
    return float(np.mean(x))


def evaluate_population(rep: dict, order_by: dict, sizes, splits: int, seed: int) -> list[dict]:
    """Rows of violation rates and savings, per calibration size, planner, risk and level."""
    N = rep["exit"].shape[1]
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        if N - n < MIN_TEST:
            continue
        cal = split_masks(N, n, splits, rng)
        rows += rows_for(rep, order_by, cal, ~cal, n)
    return rows


def rows_for(rep, order_by, cal, judge, n) -> list[dict]:
    rows = []
    sums = calibration_sums(rep, cal)
    before = judged(rep, plan_before(rep, sums), judge, 0)
    for eps in EPSILONS:
        rows.append(row("before", "accuracy (paired drop)", eps, None, n, before, eps, paired=True))
        rows.append(row("before", "consistency", eps, None, n, before, eps))
    for risk in ("consistency", "accuracy"):
        for eps in EPSILONS:
            for delta in DELTAS:
                chosen = plan_ltt(rep, sums, order_by[risk], risk, eps, delta)
                got = judged(rep, chosen, judge, eps)
                rows.append(row("ltt", risk, eps, delta, n, got, eps))
            # what the order costs: ordered by the judged queries' own risk (not attainable)
            chosen = plan_ltt(rep, sums, hindsight_order(rep, judge, risk), risk, eps, DELTAS[0])
            got = judged(rep, chosen, judge, eps)
            rows.append(row("ltt, hindsight order", risk, eps, DELTAS[0], n, got, eps))
    return rows


def hindsight_order(rep: dict, judge: np.ndarray, risk: str) -> np.ndarray:
    """The candidates ordered by their risk on all judged queries of every split: the order a
    planner could have if it knew the deployment queries, a bound on what ordering can give."""
    on_judged = judge.any(0)
    return order_by_risk(rep[risk][:, on_judged].mean(1), rep["exit"].mean(1))


def row(planner, risk, eps, delta, n, got, eps_, paired=False) -> dict:
    got_risk = got["accuracy_drop"] if paired else got["risks"][risk]
    test, pop = got_risk["test"], got_risk["population"]
    return dict(
        planner=planner,
        risk=risk,
        epsilon=eps,
        delta=delta,
        calibration=int(n),
        judging=got["test_size"],
        splits=got["splits"],
        violation_test=rate(test > eps_ + 1e-12),
        violation_population=None if pop is None else rate(pop > eps_ + 1e-12),
        mean_test_risk=float(np.mean(test)),
        mean_accuracy_drop=float(np.mean(got["accuracy_drop"]["test"])),
        saving=float(np.mean(got["saving"])),
        plain_share=rate(got["plain"]),
    )


# ------------------------------------------------------------------ the data sets
def load(run: Path, tasks=None, test_dir: Path | None = None):
    """(pool traces, judged traces) of `tasks` (few-shot k >= 5)."""
    table, _ = load_collected(run / "traces" / "train")
    pool = Traces.from_table(select_tasks(table, tasks) if tasks else table, ALL_FEATURES)
    table, _ = load_collected(test_dir or run / "traces" / "test")
    test = Traces.from_table(select_tasks(table, tasks) if tasks else table, ALL_FEATURES)
    return pool, test.subset(test.shots >= 5)


def orders(policy, pool: Traces, check_cost: float) -> dict:
    """The LTT order per risk: the candidates' risk on the pool, safest first."""
    rep = replay_all(policy, pool, check_cost)
    later = rep["exit"].mean(1)
    return {r: order_by_risk(rep[r].mean(1), later) for r in ("consistency", "accuracy")}


def run_population(name: str, model: str, pool: Traces, test: Traces, sizes, splits, seed):
    policy = fitted_policy(pool)
    rep = replay_all(policy, test, CHECK_COST[model])
    check_against_simulate(policy, test, rep)
    rows = evaluate_population(rep, orders(policy, pool, CHECK_COST[model]), sizes, splits, seed)
    for r in rows:
        r.update(set=name, model=model, queries=len(test))
    return rows


def run_loto(model: str, run: Path, splits: int, seed: int, n: int = 436) -> list[dict]:
    """Leave one task out: calibrate on the other tasks' queries, deploy on the left-out task."""
    pool_all, test_all = load(run)
    rows = []
    rng = np.random.default_rng(seed)
    for task in sorted(set(test_all.task)):
        pool = pool_all.subset(pool_all.task != task)
        policy = fitted_policy(pool)
        rep = replay_all(policy, test_all, CHECK_COST[model])
        others = test_all.task != task
        N = len(test_all)
        cal = np.zeros((splits, N), bool)
        idx = np.flatnonzero(others)
        for j in range(splits):
            cal[j, rng.choice(idx, size=min(n, len(idx)), replace=False)] = True
        judge = np.broadcast_to(~others, (splits, N))
        for r in rows_for(rep, orders(policy, pool, CHECK_COST[model]), cal, judge, cal[0].sum()):
            r.update(set="loto", model=model, left_out=task, queries=int((~others).sum()))
            rows.append(r)
    return rows


# ------------------------------------------------------------------ report
def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def label(r) -> str:
    if r["planner"] == "before":
        return f"before: {r['risk']}"
    order = " (hindsight order)" if "hindsight" in r["planner"] else ""
    return f"LTT {r['risk']}, delta {r['delta']:g}{order}"


def summary(rows, delta: float = 0.05) -> str:
    """The three views of the README: SST-2 per split size, the reproduce tasks aggregated, and
    leave one task out; LTT at `delta`."""
    keep = [r for r in rows if r["delta"] in (None, delta)]
    parts = [sst2_view(keep), reproduce_view(keep), loto_view(keep)]
    return "\n\n".join(p for p in parts if p)


def sst2_view(rows) -> str:
    rows = [r for r in rows if r["set"] == "sst2-872"]
    body = [
        [r["model"], r["calibration"], label(r), r["epsilon"]]
        + [pct(r["violation_test"]), pct(r["violation_population"])]
        + [f"{100 * r['mean_test_risk']:.2f}%", f"{100 * r['mean_accuracy_drop']:+.2f}"]
        + [pct(r["saving"]), pct(r["plain_share"])]
        for r in rows
    ]
    head = ["model", "calibration", "planner: risk", "epsilon", "violation (test split)"]
    head += ["violation (872 queries)", "mean test risk", "accuracy drop (points)"]
    head += ["layers saved", "plain model"]
    return "### SST-2, 872 queries\n\n" + markdown_table(head, body) if body else ""


def grouped(rows, key):
    groups = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return groups


def reproduce_view(rows) -> str:
    rows = [r for r in rows if r["set"].startswith("reproduce:")]
    groups = grouped(rows, lambda r: (r["model"], r["calibration"], label(r), r["epsilon"]))
    body = []
    for (model, n, name, eps), g in groups.items():
        pop = [r["violation_population"] for r in g]
        test = [r["violation_test"] for r in g]
        worst = max(g, key=lambda r: r["violation_population"])
        body.append(
            [model, n, name, eps, len(g), pct(np.mean(test)), pct(np.mean(pop)), pct(max(pop))]
            + [worst["set"].removeprefix("reproduce:"), pct(np.mean([r["saving"] for r in g]))]
        )
    head = ["model", "calibration", "planner: risk", "epsilon", "tasks", "violation (test)"]
    head += ["violation (all queries), mean", "worst task", "which", "layers saved, mean"]
    return "### Reproduce tasks (k >= 5)\n\n" + markdown_table(head, body) if body else ""


def loto_view(rows) -> str:
    rows = [r for r in rows if r["set"] == "loto"]
    groups = grouped(rows, lambda r: (r["model"], label(r), r["epsilon"]))
    body = []
    for (model, name, eps), g in groups.items():
        bad = [r["left_out"] for r in g if r["violation_test"] > 0.05 + 1e-9]
        body.append(
            [model, name, eps, len(g), pct(np.mean([r["violation_test"] for r in g]))]
            + [
                f"{len(bad)}: {', '.join(bad)}" if bad else "0",
                pct(np.mean([r["saving"] for r in g])),
            ]
        )
    head = [
        "model",
        "planner: risk",
        "epsilon",
        "tasks left out",
        "violation on the left-out task, mean",
    ]
    head += ["tasks with violation > 5%", "layers saved, mean"]
    return (
        "### Leave one task out (calibrated on the other tasks)\n\n" + markdown_table(head, body)
        if body
        else ""
    )


def table(rows, keys) -> str:
    head = keys + [
        "violation (test)",
        "violation (all queries)",
        "mean test risk",
        "saving",
        "plain",
    ]
    body = [
        [r[k] if r[k] is not None else "-" for k in keys]
        + [
            f"{100 * r['violation_test']:.1f}%",
            "-" if r["violation_population"] is None else f"{100 * r['violation_population']:.1f}%",
            f"{100 * r['mean_test_risk']:.2f}%",
            f"{100 * r['saving']:.1f}%",
            f"{100 * r['plain_share']:.0f}%",
        ]
        for r in rows
    ]
    return markdown_table(head, body)


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--splits", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", choices=("sst2", "reproduce", "loto"), action="append")
    p.add_argument("--out", type=Path, help="folder for coverage.json and coverage.md")
    p.add_argument("--report-only", action="store_true", help="rebuild summary.md from --out")
    args = p.parse_args(argv)
    if args.report_only:
        rows = json.loads((args.out / "coverage.json").read_text())["rows"]
        write_text_atomic(args.out / "summary.md", summary(rows) + "\n")
        return
    parts = args.only or ("sst2", "reproduce", "loto")
    rows, started = [], time.time()
    if "sst2" in parts:
        for model in ("qwen2.5-0.5b", "gemma3-270m"):
            pool, test = load(RESULTS / model, ["sst2"], RESULTS / f"{model}-sst2-872")
            pool = pool.subset(pool.shots == 5)
            rows += run_population("sst2-872", model, pool, test, SIZES, args.splits, args.seed)
            print(f"sst2 {model}: {time.time() - started:.0f} s", flush=True)
    if "reproduce" in parts:
        for model in ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"):
            pool_all, test_all = load(RESULTS / model)
            for task in sorted(set(test_all.task)):
                pool, test = (
                    pool_all.subset(pool_all.task == task),
                    test_all.subset(test_all.task == task),
                )
                rows += run_population(
                    f"reproduce:{task}", model, pool, test, SIZES, args.splits, args.seed
                )
            print(f"reproduce {model}: {time.time() - started:.0f} s", flush=True)
    if "loto" in parts:
        for model in ("smollm2-135m", "gemma3-270m", "qwen2.5-0.5b"):
            rows += run_loto(model, RESULTS / model, args.splits, args.seed)
            print(f"loto {model}: {time.time() - started:.0f} s", flush=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "coverage.json", dict(settings=vars_of(args), rows=rows))
        keys = ["set", "model", "planner", "risk", "epsilon", "delta", "calibration", "judging"]
        write_text_atomic(args.out / "coverage.md", table(rows, keys) + "\n")
        write_text_atomic(args.out / "summary.md", summary(rows) + "\n")
    print(json.dumps(dict(rows=len(rows), seconds=round(time.time() - started)), indent=1))


def vars_of(args) -> dict:
    return dict(
        splits=args.splits,
        seed=args.seed,
        sizes=list(SIZES),
        epsilons=list(EPSILONS),
        deltas=list(DELTAS),
        check_cost=CHECK_COST,
        before=BEFORE,
        min_test=MIN_TEST,
    )


if __name__ == "__main__":
    main()
