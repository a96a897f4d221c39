"""`adainfer bench`: saved layers measured as saved wall-clock time, next to the plain model.

For each model, dtype, task and batch size, in one process, the variants run interleaved
(the order rotates every repeat, so machine noise hits them alike):
- plain:  the unmodified Hugging Face model, one forward pass;
- never:  adainfer's engine with a never-exit policy (no check can pay, so it runs the plain
          forward: what a user gets);
- hooks:  the hooked engine running every layer with no check (the engine's own overhead);
- policy: adainfer with the default policy, or a given one. The default: a logistic
          classifier per layer on gap, top prob and entropy that predicts "this layer's answer
          is already the full model's", with its stop threshold and its check schedule (one per
          batch size) planned out of fold on calibration traces for the measured check cost,
          keeping `min_agreement` (97%) of the full model's answers, or bounding the accuracy
          lost to 1 point at `confidence` (95%);
- oracle: the oracle exit (earliest layer whose top-1 is gold) through the same engine.
Reported per row: accuracy, exit layer, checks, paper and true FLOPs ratios, median wall time,
time ratios against plain, prompts per second and peak memory (bytes above the resident set
before the call: CUDA allocator peak on GPU, sampled RSS with glibc returning large blocks at
once on CPU).
Results are written after every cell. Run again with the same settings, the grid resumes at
the first missing cell; with another `min_agreement` or `confidence`, it re-plans every cell and
re-times only those whose plan changed; a grid with other settings in the output folder is never
overwritten.
"""

from __future__ import annotations

import gc
import json
import re
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .checks import (
    CONFIDENCE,
    MIN_AGREEMENT,
    THRESHOLDS,
    PlannedPolicy,
    replay_schedules,
)
from .collect import collect, load_collected
from .features import ALL_FEATURES, DEFAULT_FEATURES
from .files import write_json, write_text_atomic
from .flops import result_ratios
from .offline import Traces
from .persist import load_policy, save_policy
from .policies import LayerLogisticExit, NeverExit, OracleExit
from .prefill import AdaptiveEngine, ExitResult
from .summary import summarise
from .tasks import task_queries
from .timing import (
    interleaved,
    machine,
    measure_check_cost,
    peak_memory,
    plain_forward,
    release_large_blocks,
    resident_memory,
    timed,
)

VARIANTS = ("plain", "never", "hooks", "policy", "oracle")
DEFAULT_TARGET = "final"  # keep the full model's answers (see offline.Traces.labels)


def default_policy():
    """A logistic regression per layer, so its stop threshold is a probability the planner can
    tune. On Qwen2.5 SST-2 the paper's gold-labelled SVM exits 4 layers early and loses 12
    points; planned to keep 99% of the answers, one logistic model for all layers gets 45% of
    the oracle's saving, per-layer models 51-59%; at the default 97%, 60-70% within 1 point
    (872 held-out queries, bench/plan_quality.py)."""
    return LayerLogisticExit(features=DEFAULT_FEATURES)


# ----------------------------------------------------------------------------- one cell
def _time_variants(engine, batches, policy, repeats: int, shortlist=None):
    """Seconds of every (repeat, batch) per variant, [repeats, batches]; and each variant's
    results of the last repeat. Interleaved batch by batch (timing.interleaved), after an untimed
    warm-up pass."""

    def run(eng, pol, with_gold=False, **kw):
        def runner(i):
            gold = batches[i]["gold"] if with_gold else None
            result = eng.run(batches[i]["prompts"], pol, gold=gold, **kw)
            return result.wall_time_s, result

        return runner

    runners = {
        "plain": lambda i: timed(plain_forward, engine.model, batches[i]["enc"]),
        "never": run(engine, NeverExit()),
        "hooks": run(engine, NeverExit(), fast_path=False),
        "policy": run(engine, policy),
        "oracle": run(engine, OracleExit(), with_gold=True),
    }
    if shortlist is not None:  # (engine with shortlist checks, its policy)
        runners["shortlist"] = run(*shortlist)
    seconds, outputs = interleaved(runners, len(batches), repeats=repeats)
    outputs.pop("plain")
    return seconds, outputs


SUMMARY_FIELDS = ("accuracy", "mean_exit_layer", "mean_checks", "flops_ratio", "true_flops_ratio")


MIN_PAIRED = 9  # paired (batch, repeat) ratios per cell at least


def bench_cell(
    engine,
    queries,
    policy,
    *,
    batch_size: int,
    repeats: int,
    device,
    shortlist=None,
    min_paired: int = MIN_PAIRED,
) -> dict:
    """One model, dtype, task and batch size. `shortlist`: (engine with shortlist checks, the
    policy planned for it), timed as one more variant.

    A cell with few batches gets more repeats, up to `min_paired` paired ratios: a handful of
    ratios cannot tell two variants that run the same plain forward apart from a real
    difference of several percent."""
    batches = _batches(engine, queries, batch_size)
    repeats = max(repeats, -(-min_paired // len(batches)))
    seconds, results = _time_variants(engine, batches, policy, repeats, shortlist)
    gold = np.array([q.gold for q in queries])
    row = {"batch_size": batch_size, "n": len(queries), "repeats": repeats}
    for v in (v for v in results if v != "hooks"):  # hooks: timed for its overhead only
        r = ExitResult.concat(results[v])
        f = result_ratios(
            r, engine.parts, {"policy": policy, "shortlist": shortlist and shortlist[1]}.get(v)
        )
        row[v] = summarise(
            r.exit_layer, r.top1 == gold, f, fields=SUMMARY_FIELDS, num_checks=r.num_checks
        )
    row["full_accuracy"] = row.pop("never")["accuracy"]
    row.update(_times(seconds))
    row["prompts_per_s_plain"] = len(queries) / row["time_plain_s"]
    row["prompts_per_s_policy"] = len(queries) / row["time_policy_s"]
    row.update(_memory(engine, batches[0], policy, device))
    return row


def _batches(engine, queries, batch_size: int) -> list[dict]:
    """The queries in batches of `batch_size`: prompts, gold tokens and the encoded batch."""
    batches = []
    for i in range(0, len(queries), batch_size):
        qs = queries[i : i + batch_size]
        prompts = [q.prompt for q in qs]
        batches.append(
            {"prompts": prompts, "gold": [q.gold for q in qs], "enc": engine.encode(prompts)}
        )
    return batches


def _times(seconds: dict) -> dict:
    """Each variant's median time of a full pass and its time ratios to the plain model."""
    times = {}
    for v, t in seconds.items():
        times[f"time_{v}_s"] = float(np.median(t.sum(1)))  # median over repeats of a full pass
        if v != "plain":
            # each batch against the plain model on the same batch, back to back: the median of
            # these paired ratios shrugs off a slow moment that a ratio of totals would absorb
            paired = (t / seconds["plain"]).ravel()
            times[f"{v}/plain"] = float(np.median(paired))
            times[f"{v}/plain_iqr"] = [float(q) for q in np.percentile(paired, [25, 75])]
            # every ratio kept, so runs can be pooled
            times[f"{v}/plain_paired"] = [round(float(q), 4) for q in paired]
    times["paired_samples"] = int(seconds["plain"].size)
    return times


def _memory(engine, batch: dict, policy, device) -> dict:
    """MB held before the call (the model and everything else) and each variant's peak above
    it, on one batch."""
    runs = {
        "plain": lambda: plain_forward(engine.model, batch["enc"]),
        "policy": lambda: engine.run(batch["prompts"], policy),
    }
    return {
        "resident_mb": resident_memory(device) / 2**20,
        "peak_mem_plain_mb": peak_memory(runs["plain"], device) / 2**20,
        "peak_mem_policy_mb": peak_memory(runs["policy"], device) / 2**20,
    }


# ----------------------------------------------------------------------------- the grid
def run_bench(
    models=("smollm2-135m",),
    out_dir: str | Path = "results/bench",
    *,
    tasks=("sst2", "capitalize"),
    shots: int = 5,
    batch_sizes=(1, 8, 32),
    dtypes=("float32", "bfloat16"),
    n_queries: int = 32,
    n_train: int = 200,  # calibration queries: 40 cannot show a 1-point loss (checks.py)
    repeats: int = 3,
    policy_path: str | None = None,
    min_agreement: float | None = None,
    confidence: float | None = None,
    shortlist: int | None = 256,
    device: str = "cpu",
    data_dir=None,
    seed: int = 0,
    min_paired: int | None = None,
    progress: bool = True,
) -> dict:
    """The grid, resumable. A finished cell is timed again when the plan's test changes its plan,
    or when asked for more paired samples (`min_paired`) than it holds: its earlier timings stay
    in the row (`earlier_timings`), so a re-run adds evidence and never silently replaces it."""
    from .models import load

    release_large_blocks()
    out = Path(out_dir)
    min_paired = MIN_PAIRED if min_paired is None else min_paired
    # the test a plan must pass, recorded per row: a new test re-plans, and re-times what changed
    plan_test = dict(
        min_agreement=MIN_AGREEMENT if min_agreement is None else min_agreement,
        confidence=CONFIDENCE if confidence is None else confidence,
    )
    # what a cell's timing depends on
    settings = dict(
        shots=shots,
        n_queries=n_queries,
        n_train=n_train,
        repeats=repeats,
        seed=seed,
        policy=policy_path,
        shortlist=shortlist,
        device=str(device),
    )
    # a killed run resumes at its next cell
    rows = {_key(r): r for r in _finished_rows(out / "bench.json", settings)}
    # a cell with fewer samples is timed again
    sampled = {k for k, r in rows.items() if r["paired_samples"] >= min_paired}
    done = {
        k for k in sampled if all(rows[k][field] == value for field, value in plan_test.items())
    }

    def save():  # after every cell, so a killed grid loses at most the cell it was timing
        result = {"rows": list(rows.values()), "settings": settings, "machine": machine()}
        write_json(out / "bench.json", result)
        return result

    for model_name in models:
        for dtype in dtypes:
            if all((model_name, dtype, t, b) in done for t in tasks for b in batch_sizes):
                continue
            lm, tok = load(model_name, dtype=dtype, device=device)
            engine = AdaptiveEngine(lm, tok)
            # a folder name for an alias, a hub id or a path
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name).strip("_")
            cal_dir = out / "calibration" / f"{name}-{dtype}"
            train, test = _calibration_and_timed(
                tok, tasks, shots, n_train, n_queries, seed, data_dir
            )
            collect(engine, train, cal_dir, batch_size=8, progress=progress)
            short_engine = AdaptiveEngine(lm, tok, shortlist=shortlist) if shortlist else None
            for task in tasks:
                if all((model_name, dtype, task, b) in done for b in batch_sizes):
                    continue
                queries = [q for q in test if q.task == task]
                # a check's cost relative to a layer falls with the batch size (one plan per size)
                # and with the prompt length (a layer grows with it, a check does not): per task
                cost, cheap, short = {}, {}, {}
                for bs in batch_sizes:
                    prompts = [q.prompt for q in queries[:bs]]
                    cost[bs] = measure_check_cost(engine, prompts)
                    # cheaper checks, measured the same way: the LM head in bf16 (half the bytes
                    # read), and a head over each row's `shortlist` candidates (k rows instead of V)
                    cheap[bs] = (
                        measure_check_cost(
                            AdaptiveEngine(lm, tok, check_dtype=torch.bfloat16), prompts
                        )
                        if lm.dtype != torch.bfloat16
                        else cost[bs]
                    )
                    short[bs] = (
                        measure_check_cost(engine, prompts, shortlist=shortlist)
                        if shortlist
                        else None
                    )
                # calibrated on this task's queries, as a user calibrates on the task they serve
                policy, target, traces, tune = _calibrated(cal_dir, task, policy_path, lm)
                # shared by both kinds of check; a given policy never saw these traces, so it is
                # replayed as it is (folds=1), not refitted fold by fold
                replays = replay_schedules(
                    policy, traces, thresholds=tune, folds=1 if policy_path else 5, target=target
                )
                planning = dict(check_costs=cost, target=target, prefit=True, **plan_test)
                if (
                    shortlist
                ):  # the same fitted classifier, planned for the shortlist engine's costs
                    short_policy = PlannedPolicy(policy, shortlist_costs=short, **planning).fit(
                        traces, replays=replays
                    )
                    short_plans = short_policy.plans_
                    save_policy(
                        short_policy,
                        out
                        / "policies"
                        / f"{name}-{dtype}-{task}-shortlist{shortlist}.safetensors",
                        model=lm,
                        shortlist=shortlist,
                    )
                planned = PlannedPolicy(policy, **planning).fit(traces, replays=replays)
                plans = planned.plans_
                save_policy(
                    planned, out / "policies" / f"{name}-{dtype}-{task}.safetensors", model=lm
                )
                for bs in tqdm(
                    batch_sizes, desc=f"{model_name} {dtype} {task}", disable=not progress
                ):
                    key = (model_name, dtype, task, bs)
                    if key in done:
                        continue
                    if key in sampled and _same_plan(
                        rows[key], plans[bs], short_plans[bs] if shortlist else None
                    ):
                        # timed under another test that chose this very plan: the same run
                        for field, value in plan_test.items():
                            rows[key].setdefault(f"timed_with_{field}", rows[key][field])
                            rows[key][field] = value
                        save()
                        continue
                    row = bench_cell(
                        engine,
                        queries,
                        planned,
                        batch_size=bs,
                        repeats=repeats,
                        device=device,
                        min_paired=min_paired,
                        shortlist=(short_engine, short_policy) if shortlist else None,
                    )
                    if key in rows:
                        row["earlier_timings"] = _earlier_timings(rows[key])
                    row.update(
                        model=model_name,
                        dtype=dtype,
                        task=task,
                        shots=shots,
                        check_cost_layers=cost[bs],
                        check_cost_bf16_head_layers=cheap[bs],
                        check_layers=list(plans[bs].check_layers),
                        planned_cost_layers=plans[bs].expected_cost,
                        plan_held_out=plans[bs].held_out,
                        threshold=plans[bs].threshold,
                        machine=machine(),
                        **plan_test,
                    )  # a resumed grid may span machines
                    if shortlist:
                        row.update(
                            shortlist_size=shortlist,
                            check_cost_shortlist_layers=short[bs],
                            shortlist_check_layers=list(short_plans[bs].check_layers),
                            shortlist_threshold=short_plans[bs].threshold,
                        )
                    rows[key] = row
                    save()
            del engine, short_engine, lm  # every reference, or the next model loads beside this one
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    result = save()
    write_report(out)
    return result


def write_report(out_dir) -> Path:
    """bench.md from the grid's bench.json: the table and the targets under it (also for a grid
    stopped part-way, whose rows are all in bench.json)."""
    from .report import bench_retimed, bench_table, bench_targets

    path = Path(out_dir) / "bench.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; run `adainfer bench --out-dir {out_dir}` first"
        )
    rows = json.loads(path.read_text())["rows"]
    md = Path(out_dir) / "bench.md"
    retimed = bench_retimed(rows)
    text = bench_table(rows) + "\n\nTargets (speed issue):\n\n" + bench_targets(rows) + "\n"
    if retimed:
        text += (
            "\nCells timed more than once (the table and the targets show the last run):\n\n"
            + retimed
            + "\n"
        )
    write_text_atomic(md, text)
    return md


def _calibration_and_timed(tokenizer, tasks, shots, n_train, n_queries, seed, data_dir):
    """Calibration queries from the same split as the timed ones, never the same queries.

    A benchmark's demonstration pool can differ from its test split (SST-2: phrases against
    whole sentences). A plan calibrated on 100 pool queries kept 99% of Qwen2.5's answers there
    and lost 2.5 points on 200 test-split queries; calibrated on 100 test-split queries it kept
    accuracy on the other 100 (bench/plan_quality.py)."""
    calibration, timed = [], []
    for task in tasks:
        _, held_out = task_queries(
            tokenizer,
            [task],
            shots=shots,
            n_train=0,
            n_test=n_queries + n_train,
            seed=seed,
            data_dir=data_dir,
        )
        timed += held_out[:n_queries]
        calibration += held_out[n_queries:]
    return calibration, timed


def _calibrated(cal_dir, task, policy_path, model):
    """(fitted policy, the labels it learned, `task`'s calibration traces, stop thresholds to
    try): the default policy fitted on those traces, or the given one, which keeps its own
    threshold (a planned one is planned anew here: its classifier is kept, its plans are not)."""
    table, meta = load_collected(cal_dir, [task])
    traces = Traces.from_table(table, ALL_FEATURES, model=meta["model"])
    if policy_path:
        given = load_policy(policy_path, model=model)
        if isinstance(given, PlannedPolicy):
            return given.policy_, given.target_ or "gold", traces, None
        return given, "gold", traces, None
    policy = default_policy()
    policy.fit(*traces.training_arrays(policy.features, DEFAULT_TARGET))
    return policy, DEFAULT_TARGET, traces, THRESHOLDS


def _key(row) -> tuple:
    return row["model"], row["dtype"], row["task"], row["batch_size"]


def _finished_rows(path: Path, settings: dict) -> list[dict]:
    """Rows of an earlier run with the same settings (cells are independent: each times its
    variants side by side), so an interrupted grid does not start over; a grid with other
    settings is never overwritten."""
    if not path.exists():
        return []
    try:  # a grid that cannot be read is never overwritten: it may hold hours of timing
        previous = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); "
            "repair it or move it away to start over"
        ) from None
    # grids from before the device was recorded ran on the CPU
    previous.setdefault("settings", {}).setdefault("device", "cpu")
    if previous["settings"] != settings:
        raise ValueError(
            f"{path} holds a grid run with other settings ({previous.get('settings')}; "
            f"now {settings}): give another --out-dir, or move that file away to start over"
        )
    for r in previous["rows"]:
        r.setdefault("min_agreement", 0.99)  # rows from before it was recorded were planned at 0.99
        r.setdefault("confidence", 0.0)  # ... and by the agreement test alone
    return previous["rows"]


def _earlier_timings(row) -> list[dict]:
    """What a re-timed cell measured before, oldest first: its plan and its time ratios."""
    fields = ("check_layers", "threshold", "min_agreement", "confidence", "paired_samples")
    kept = {f: row[f] for f in fields if f in row}
    kept.update({k: v for k, v in row.items() if "/plain" in k})
    return row.get("earlier_timings", []) + [kept]


def _same_plan(row, plan, short_plan) -> bool:
    """Would the cell run exactly as timed in `row`? The classifier is refitted on the same
    traces, so its check layers and stop threshold decide every exit (no check: no threshold)."""

    def same(layers, threshold, p):
        return list(layers) == list(p.check_layers) and (not layers or threshold == p.threshold)

    return same(row["check_layers"], row["threshold"], plan) and (
        short_plan is None
        or same(row["shortlist_check_layers"], row["shortlist_threshold"], short_plan)
    )
