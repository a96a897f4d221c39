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
          batch size) planned on calibration traces for the measured check cost by
          Learn-then-Test (`plan_test`: by default at most 5% of answers changed, at 95%, the
          classifier fitted on half the traces and the plans tested on the other half), or by
          the agreement / loss-bound test (`risk=None`);
- oracle: the oracle exit (earliest layer whose top-1 is gold) through the same engine.
Reported per row: accuracy, exit layer, checks, paper and true FLOPs ratios, median wall time,
time ratios against plain, prompts per second and peak memory (bytes above the resident set
before the call: CUDA allocator peak on GPU, sampled RSS with glibc returning large blocks at
once on CPU).
Results are written after every cell. Run again with the same settings, the grid resumes at
the first missing cell; with another plan test (`plan_test`), it re-plans every cell and
re-times only those whose plan changed; a grid with other settings in the output folder is never
overwritten.
"""

from __future__ import annotations

import gc
import json
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from sklearn.base import clone
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
from .files import OutputLock, read_json, write_json, write_text_atomic
from .flops import result_ratios
from .offline import Traces
from .persist import load_policy, save_policy
from .policies import LayerLogisticExit, NeverExit, OracleExit
from .prefill import AdaptiveEngine, ExitResult
from .risk import DELTA, EPSILON, RISK
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
    plan_test: dict | None = None,
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
    release_large_blocks()
    grid = _Grid(
        out=Path(out_dir),
        tasks=tasks,
        batch_sizes=batch_sizes,
        shots=shots,
        n_queries=n_queries,
        n_train=n_train,
        repeats=repeats,
        seed=seed,
        policy_path=policy_path,
        shortlist=shortlist,
        device=device,
        data_dir=data_dir,
        progress=progress,
        min_paired=MIN_PAIRED if min_paired is None else min_paired,
        plan_test=_plan_test(plan_test),
    )
    # one run per folder: two would each rewrite bench.json without the other's rows
    with OutputLock(grid.out):
        grid.resume()
        for model_name in models:
            for dtype in dtypes:
                if not grid.finished(model_name, dtype, tasks):
                    grid.bench_model(model_name, dtype)
                    # every reference to the model went with bench_model's frame: free it, or
                    # the next model loads beside this one
                    gc.collect()
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
        result = grid.save()
        write_report(grid.out)
    return result


@dataclass
class _Grid:
    """One `run_bench` call: the cells it times and how, and their rows by (model, dtype, task,
    batch size), written to `out`/bench.json after every cell."""

    out: Path
    tasks: tuple
    batch_sizes: tuple
    shots: int
    n_queries: int
    n_train: int
    repeats: int
    seed: int
    policy_path: str | None
    shortlist: int | None
    device: str
    data_dir: object
    progress: bool
    min_paired: int
    # the test a plan must pass, recorded per row: a new test re-plans, and re-times what changed
    plan_test: dict
    rows: dict = field(default_factory=dict)
    sampled: set = field(default_factory=set)  # cells holding at least `min_paired` samples
    done: set = field(default_factory=set)  # ... timed under `plan_test`: not timed again

    @property
    def settings(self) -> dict:
        """What a cell's timing depends on: an earlier grid resumes only under the same."""
        return dict(
            shots=self.shots,
            n_queries=self.n_queries,
            n_train=self.n_train,
            repeats=self.repeats,
            seed=self.seed,
            policy=self.policy_path,
            shortlist=self.shortlist,
            device=str(self.device),
        )

    def resume(self):
        """A killed run resumes at its next cell; a cell with fewer samples is timed again."""
        self.rows = {_key(r): r for r in _finished_rows(self.out / "bench.json", self.settings)}
        self.sampled = {k for k, r in self.rows.items() if r["paired_samples"] >= self.min_paired}
        self.done = {
            k
            for k in self.sampled
            if all(self.rows[k][setting] == value for setting, value in self.plan_test.items())
        }

    def save(self) -> dict:
        """After every cell, so a killed grid loses at most the cell it was timing."""
        result = {"rows": list(self.rows.values()), "settings": self.settings, "machine": machine()}
        write_json(self.out / "bench.json", result)
        return result

    def finished(self, model_name: str, dtype: str, tasks) -> bool:
        return all((model_name, dtype, t, b) in self.done for t in tasks for b in self.batch_sizes)

    def bench_model(self, model_name: str, dtype: str):
        """The cells of one model and dtype: loaded once, its calibration traces collected, then
        task by task, the check costs measured, the policy planned, and each batch size timed."""
        from .models import load

        lm, tok = load(model_name, dtype=dtype, device=self.device)
        engine = AdaptiveEngine(lm, tok)
        # a folder name for an alias, a hub id or a path
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", model_name).strip("_")
        cal_dir = self.out / "calibration" / f"{name}-{dtype}"
        train, test = _calibration_and_timed(
            tok, self.tasks, self.shots, self.n_train, self.n_queries, self.seed, self.data_dir
        )
        collect(engine, train, cal_dir, batch_size=8, progress=self.progress)
        short_engine = AdaptiveEngine(lm, tok, shortlist=self.shortlist) if self.shortlist else None
        for task in self.tasks:
            if self.finished(model_name, dtype, [task]):
                continue
            queries = [q for q in test if q.task == task]
            costs = _check_costs(engine, queries, self.batch_sizes, self.shortlist)
            timed = {b for b in self.batch_sizes if (model_name, dtype, task, b) in self.done}
            stem = f"{name}-{dtype}-{task}"
            planned, short_policy = self.plan(cal_dir, task, lm, costs, stem, timed)
            shortlisted = (short_engine, short_policy) if self.shortlist else None
            for bs in tqdm(
                self.batch_sizes, desc=f"{model_name} {dtype} {task}", disable=not self.progress
            ):
                key = (model_name, dtype, task, bs)
                self.run_cell(key, engine, queries, costs, planned, shortlisted)

    def plan(self, cal_dir, task: str, lm, costs: _CheckCosts, stem: str, timed=frozenset()):
        """(the policy planned for exact checks, the same planned for shortlist checks or None),
        both saved to `out`/policies as `stem`. Calibrated on this task's queries, as a user
        calibrates on the task they serve. The batch sizes in `timed` (cells not timed again)
        keep the plans they ran with (`_keep_timed_plans`)."""
        policy, target, traces, tune = _calibrated(cal_dir, task, self.policy_path, lm)
        ltt = self.plan_test["risk"] is not None
        if ltt:  # the default classifier is fitted on the share of the traces that does not test
            policy = policy if self.policy_path else clone(policy)
            replays = None
        else:  # shared by both kinds of check; a given policy never saw these traces, so it is
            # replayed as it is (folds=1), not refitted fold by fold
            replays = replay_schedules(
                policy, traces, thresholds=tune, folds=1 if self.policy_path else 5, target=target
            )
        planning = dict(
            check_costs=costs.exact,
            target=target,
            thresholds=tune,
            prefit=not ltt or bool(self.policy_path),
            **self.plan_test,
        )
        short_policy = None
        if self.shortlist:  # the same fitted classifier, planned for the shortlist engine's costs
            short_policy = PlannedPolicy(policy, shortlist_costs=costs.shortlist, **planning).fit(
                traces, replays=replays
            )
            path = self.out / "policies" / f"{stem}-shortlist{self.shortlist}.safetensors"
            _keep_timed_plans(short_policy, path, timed)
            save_policy(short_policy, path, model=lm, shortlist=self.shortlist)
        planned = PlannedPolicy(policy, **planning).fit(traces, replays=replays)
        path = self.out / "policies" / f"{stem}.safetensors"
        _keep_timed_plans(planned, path, timed)
        save_policy(planned, path, model=lm)
        return planned, short_policy

    def run_cell(self, key, engine, queries, costs: _CheckCosts, planned, shortlisted):
        """One cell, unless done: relabelled if timed before under a test that chose the same
        plan, else timed (`bench_cell`) and its row recorded. `shortlisted`: (engine with
        shortlist checks, the policy planned for it) or None."""
        if key in self.done:
            return
        bs = key[-1]
        plan = planned.plans_[bs]
        short_plan = shortlisted[1].plans_[bs] if self.shortlist else None
        if key in self.sampled and _same_plan(self.rows[key], plan, short_plan):
            # timed under another test that chose this very plan: the same run
            for setting, value in self.plan_test.items():
                self.rows[key].setdefault(f"timed_with_{setting}", self.rows[key][setting])
                self.rows[key][setting] = value
            self.save()
            return
        row = bench_cell(
            engine,
            queries,
            planned,
            batch_size=bs,
            repeats=self.repeats,
            device=self.device,
            min_paired=self.min_paired,
            shortlist=shortlisted,
        )
        if key in self.rows:
            row["earlier_timings"] = _earlier_timings(self.rows[key])
        model_name, dtype, task, _ = key
        row.update(
            model=model_name,
            dtype=dtype,
            task=task,
            shots=self.shots,
            check_cost_layers=costs.exact[bs],
            check_cost_bf16_head_layers=costs.bf16_head[bs],
            check_layers=list(plan.check_layers),
            planned_cost_layers=plan.expected_cost,
            plan_held_out=plan.held_out,
            threshold=plan.threshold,
            machine=machine(),
            **self.plan_test,
        )  # a resumed grid may span machines
        if self.shortlist:
            row.update(
                shortlist_size=self.shortlist,
                check_cost_shortlist_layers=costs.shortlist[bs],
                shortlist_check_layers=list(short_plan.check_layers),
                shortlist_threshold=short_plan.threshold,
            )
        self.rows[key] = row
        self.save()


class _CheckCosts(NamedTuple):
    """A check's cost in decoder layers, by batch size: exact, with the LM head in bf16, and over
    a shortlist (None without one)."""

    exact: dict
    bf16_head: dict
    shortlist: dict


def _check_costs(engine, queries, batch_sizes, shortlist: int | None) -> _CheckCosts:
    """Measured per task, on its first queries: a check's cost relative to a layer falls with the
    batch size (one plan per size) and with the prompt length (a layer grows with it, a check
    does not)."""
    lm, tok = engine.model, engine.tokenizer
    costs = _CheckCosts({}, {}, {})
    for bs in batch_sizes:
        prompts = [q.prompt for q in queries[:bs]]
        costs.exact[bs] = measure_check_cost(engine, prompts)
        # cheaper checks, measured the same way: the LM head in bf16 (half the bytes read), and a
        # head over each row's `shortlist` candidates (k rows instead of V)
        costs.bf16_head[bs] = (
            measure_check_cost(AdaptiveEngine(lm, tok, check_dtype=torch.bfloat16), prompts)
            if lm.dtype != torch.bfloat16
            else costs.exact[bs]
        )
        costs.shortlist[bs] = (
            measure_check_cost(engine, prompts, shortlist=shortlist) if shortlist else None
        )
    return costs


def write_report(out_dir) -> Path:
    """bench.md from the grid's bench.json: the table and the targets under it (also for a grid
    stopped part-way, whose rows are all in bench.json)."""
    from .report import bench_retimed, bench_table, bench_targets

    path = Path(out_dir) / "bench.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; run `adainfer bench --out-dir {out_dir}` first"
        )
    rows = read_json(path, "bench grid")["rows"]
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


def _plan_test(given: dict | None) -> dict:
    """The planner's test, its defaults filled in: Learn-then-Test's risk, epsilon and delta, or
    with risk None the agreement level and loss-bound confidence (recorded in every row)."""
    test = dict(risk=RISK, epsilon=EPSILON, delta=DELTA, min_agreement=None, confidence=None)
    test.update(given or {})
    if test["risk"] is not None:  # the agreement test's settings play no part
        return {**test, "min_agreement": None, "confidence": None}
    return {
        **test,
        "epsilon": None,
        "delta": None,
        "min_agreement": MIN_AGREEMENT if test["min_agreement"] is None else test["min_agreement"],
        "confidence": CONFIDENCE if test["confidence"] is None else test["confidence"],
    }


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
        for k in ("risk", "epsilon", "delta"):  # ... before Learn-then-Test
            r.setdefault(k, None)
    return previous["rows"]


def _earlier_timings(row) -> list[dict]:
    """What a re-timed cell measured before, oldest first: its plan and its time ratios."""
    fields = ("check_layers", "threshold", "min_agreement", "confidence", "paired_samples")
    fields += ("risk", "epsilon", "delta")
    kept = {f: row[f] for f in fields if f in row}
    kept.update({k: v for k, v in row.items() if "/plain" in k})
    return row.get("earlier_timings", []) + [kept]


def _keep_timed_plans(planned: PlannedPolicy, path: Path, timed) -> None:
    """A resumed grid measures the check costs again and re-plans every batch size; a cell it
    will not time again keeps, in the saved file, the plan it ran with (its expected cost may
    move with the new costs, its check layers too). Only over the same classifier and stop
    threshold: refitted on the same traces, it is, up to rounding (BLAS sums in another order
    run to run); else the rows alone describe those cells."""
    if not timed or not path.exists():
        return
    earlier = load_policy(path)
    old, new = earlier.policy_, planned.policy_
    old_arrays, new_arrays = old._arrays(), new._arrays()
    same = (
        type(old) is type(new)
        and old.get_params() == new.get_params()
        and old_arrays.keys() == new_arrays.keys()
        and all(np.allclose(a, new_arrays[k], rtol=1e-9) for k, a in old_arrays.items())
    )
    if not same:
        warnings.warn(
            f"{path} was planned over another classifier: the cells timed with it keep their "
            "rows in bench.json, the file now holds the new plans",
            stacklevel=2,
        )
        return
    for b in set(timed) & earlier.plans_.keys():
        planned.plans_[b] = earlier.plans_[b]


def _same_plan(row, plan, short_plan) -> bool:
    """Would the cell run exactly as timed in `row`? The classifier is refitted on the same
    traces, so its check layers and stop threshold decide every exit (no check: no threshold)."""

    def same(layers, threshold, p):
        return list(layers) == list(p.check_layers) and (not layers or threshold == p.threshold)

    return same(row["check_layers"], row["threshold"], plan) and (
        short_plan is None
        or same(row["shortlist_check_layers"], row["shortlist_threshold"], short_plan)
    )
