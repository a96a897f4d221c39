"""`adainfer reproduce`: the paper's experiments on any model, as JSON, markdown tables and PNGs.

Plan (all seeded, recorded in results.json):
1. test traces: for every task and every k in `shots`, `n_queries` held-out queries run once at
   full depth with every layer checked (features, top-1, best choice per layer);
2. training traces: `n_train` pool queries per task at k = `train_shots`;
3. classifiers are trained, as in the paper, on a random subset of the tasks' training pools
   (`n_train_tasks` of them), plus the generalization variants (intra-task: sentiment only;
   inter-task: question answering only; inter-model: another model's training traces);
4. every policy is replayed on the test traces (`offline.simulate`, the engine's own decision
   loop), so one model pass per query scores them all.
Traces are collected incrementally and resume after a kill; under `torchrun` every rank takes a
shard of the queries and rank 0 writes the report.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import numpy as np

from .collect import (
    MAX_BATCH_TOKENS,
    collect,
    load_collected,
    select_tasks,
    training_arrays,
)
from .features import ALL_FEATURES, PAPER_FEATURES
from .files import write_json, write_text_atomic
from .flops import ratios
from .offline import Traces, oracle_bounds, simulate
from .policies import NeverExit, OracleExit, SVMExit, standard_policies
from .taskdata import TaskError

log = logging.getLogger(__name__)

DEFAULT_TASKS = (
    "sst2",
    "ag_news",
    "mmlu",
    "commonsense_qa",
    "squad",
    "fv:antonym",
    "fv:capitalize_first_letter",
    "fv:lowercase_first_letter",
    "fv:choose_first_of_5",
    "fv:person-occupation",
    "lre:landmark_in_country",
)
QA = ("mmlu", "commonsense_qa", "squad")
CLASSIFICATION = ("sst2", "ag_news")
SENTIMENT = "sst2"
RUN_CONFIG = (
    Path("traces") / "run.json"
)  # the run's settings and the (task, k) cells it could not make
# A query's id is its task, k, seed and position, so a resumed run must draw the same prompts:
# these settings cannot change in an output folder (adding tasks or k can).
FIXED_ON_RESUME = ("dtype", "seed", "n_queries", "n_train", "train_shots")


def task_group(task: str) -> str:
    base = task.split(":")[0]
    if base in QA:
        return "question answering"
    if base in CLASSIFICATION:
        return "classification"
    return "rule understanding"


FACTOR_STUDY = {
    "base": PAPER_FEATURES,
    "+attn": PAPER_FEATURES + ("cos_attn",),
    "+hidden state": PAPER_FEATURES + ("cos_hidden",),
    "+mlp": PAPER_FEATURES + ("cos_mlp",),
}


# ----------------------------------------------------------------------------- distributed
def _dist():
    """(rank, world_size), initialising torch.distributed (gloo) when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        # a resumed run leaves the shards unequal: one rank may wait hours at the final barrier
        dist.init_process_group("gloo", timeout=timedelta(hours=24))
    return dist.get_rank(), world


def _barrier(world):
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# ----------------------------------------------------------------------------- the run
def run_reproduce(
    model: str = "smollm2-135m",
    out_dir: str | Path = "results/reproduce",
    *,
    tasks: Sequence[str] = DEFAULT_TASKS,
    n_queries: int = 200,
    shots: Sequence[int] = (0, 5, 10, 15, 20),
    n_train: int = 40,
    train_shots: int = 5,
    n_train_tasks: int | None = None,
    transfer_from: str | Path | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_batch_tokens: int | None = MAX_BATCH_TOKENS,
    dtype: str = "float32",
    device: str = "cpu",
    device_map=None,
    data_dir: str | Path | None = None,
    progress: bool = True,
    report_only: bool = False,
) -> dict | None:
    from .engine import AdaptiveEngine
    from .models import load
    from .tasks import held_out_indices, load_task, task_queries

    out = Path(out_dir)
    tasks = list(dict.fromkeys(tasks))
    n_train_tasks = n_train_tasks or max(1, (2 * len(tasks) + 2) // 3)
    train_tasks = sorted(random.Random(seed).sample(tasks, min(n_train_tasks, len(tasks))))
    config = dict(
        model=model,
        dtype=dtype,
        tasks=tasks,
        n_queries=n_queries,
        shots=list(shots),
        n_train=n_train,
        train_shots=train_shots,
        train_tasks=train_tasks,
        seed=seed,
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        world_size=1,
        transfer_from=str(transfer_from) if transfer_from else None,
        skipped={},
    )
    if report_only:  # tables from the traces already collected; no model needed
        _, meta = load_collected(out / "traces" / "test")
        if (out / RUN_CONFIG).exists():  # the run's own settings, skipped cells included
            recorded = json.loads(
                (out / RUN_CONFIG).read_text()
            )  # its transfer_from unless another is given
            config = {
                **recorded,
                "transfer_from": config["transfer_from"] or recorded.get("transfer_from"),
            }
        config["model"] = meta["model"]["model_id"]
        return report(
            out, config, hidden=meta["model"]["hidden_size"], vocab=meta["model"]["vocab_size"]
        )

    _check_resumable(out, config)
    rank, world = _dist()
    if world > 1 and device.startswith("cuda") and ":" not in device:  # one GPU per rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    lm, tok = load(model, dtype=dtype, device=device, device_map=device_map)
    engine = AdaptiveEngine(lm, tok)
    test, train, name_of, held_out = [], [], {}, {}
    for task in tasks:
        loaded = load_task(task, data_dir)
        for k in shots:
            try:
                test += task_queries(
                    tok, [loaded], shots=k, n_train=0, n_test=n_queries, seed=seed
                )[1]
            except TaskError as e:  # e.g. a small task cannot give k demonstrations
                config["skipped"][f"{task} {k}-shot"] = str(e)
        train += task_queries(
            tok,
            [loaded],
            shots=train_shots,
            n_train=n_train,
            n_test=n_queries,
            seed=seed,
            strict=False,
        )[0]
        name_of[task] = loaded.name  # a task file is named by its stem in the traces
        held_out[loaded.name] = held_out_indices(loaded, n_queries, seed)  # the split, recorded
    names = [name_of[t] for t in tasks]
    if len(set(names)) < len(names):  # two task files with one stem would share query ids
        dup = sorted({n for n in names if names.count(n) > 1})
        raise TaskError(
            f"tasks {dup} appear twice (task files are named by their file name): rename one"
        )
    config.update(
        tasks=names,
        train_tasks=[name_of[t] for t in train_tasks],
        world_size=world,
        held_out=held_out,
    )
    if rank == 0:
        write_json(out / RUN_CONFIG, config)
    kw = dict(
        batch_size=batch_size,
        max_batch_tokens=max_batch_tokens,
        progress=progress and rank == 0,
        rank=rank,
        world_size=world,
    )
    collect(engine, train, out / "traces" / "train", **kw)
    collect(engine, test, out / "traces" / "test", **kw)
    _barrier(world)
    if rank != 0:
        return None
    config.update(model=getattr(lm, "adainfer_id", model))
    return report(
        out, config, hidden=lm.config.hidden_size, vocab=engine.parts.head.weight.shape[0]
    )


def _check_resumable(out: Path, config: dict) -> None:
    if not (out / RUN_CONFIG).exists():
        return
    old = json.loads((out / RUN_CONFIG).read_text())
    changed = [
        f"--{k.replace('_', '-')} {old[k]} (now {config[k]})"
        for k in FIXED_ON_RESUME
        if k in old and old[k] != config[k]
    ]
    if changed:
        raise ValueError(
            f"{out} holds traces collected with {', '.join(changed)}; resuming would mix queries drawn "
            "under other settings into the same cells: use those settings (tasks and k may be added) or a new --out-dir"
        )


# ----------------------------------------------------------------------------- analysis
def _fit(policy, table, name: str, notes: dict):
    """Fit on collected rows; a policy with nothing to learn is reported, not fatal."""
    if table.num_rows == 0:
        notes[name] = "no training rows"
        return None
    try:
        if policy.trainable:
            policy.fit(*training_arrays(table, policy.features))
        return policy
    except ValueError as e:
        notes[name] = str(e)
        return None


def _metrics(policy, traces: Traces, hidden: int, vocab: int) -> dict:
    r = simulate(policy, traces)
    L = traces.num_layers
    f = ratios(
        r.exit_layer,
        r.num_checks,
        traces.seq_len,
        num_layers=L,
        hidden=hidden,
        vocab=vocab,
        policy=policy,
    )
    return {
        "n": len(traces),
        "accuracy": float(r.correct.mean()),
        "choice_accuracy": None if r.choice_correct is None else float(r.choice_correct.mean()),
        "mean_exit_layer": float(r.exit_layer.mean()),
        "flops_ratio": float(f["flops_ratio"].mean()),
        "true_flops_ratio": float(f["true_flops_ratio"].mean()),
        "exit_layer_histogram": np.bincount(r.exit_layer, minlength=L + 1)[1:].tolist(),
    }


def report(out: Path, config: dict, *, hidden: int, vocab: int) -> dict:
    train_table, meta = load_collected(out / "traces" / "train")
    test_table, _ = load_collected(out / "traces" / "test")
    test = Traces.from_table(test_table, ALL_FEATURES)
    shots_of = test.shots
    notes: dict[str, str] = dict(config.get("skipped", {}))

    subset = select_tasks(train_table, config["train_tasks"])  # the paper's random training subset
    main = {n: _fit(p, subset, n, notes) for n, p in standard_policies().items()}
    variants = {
        "full": NeverExit(),
        "oracle": OracleExit(),
        **{n: p for n, p in main.items() if p is not None},
    }
    factor = {
        n: _fit(SVMExit(features=f), subset, f"svm {n}", notes) for n, f in FACTOR_STUDY.items()
    }
    general = {
        "intra-task (train: sentiment)": _fit(
            SVMExit(), select_tasks(train_table, [SENTIMENT]), "intra", notes
        ),
        "inter-task (train: question answering)": _fit(
            SVMExit(),
            select_tasks(
                train_table, [t for t in config["tasks"] if task_group(t) == "question answering"]
            ),
            "inter-task",
            notes,
        ),
    }
    if config.get("transfer_from"):
        other, other_meta = load_collected(Path(config["transfer_from"]) / "traces" / "train")
        # the other model's traces of the same training tasks: like for like with the in-distribution row
        other = select_tasks(other, config["train_tasks"])
        general[f"inter-model (train: {other_meta['model']['model_id']})"] = _fit(
            SVMExit(), other, "inter-model", notes
        )

    rows = []

    def add(policy_name, policy, traces, task, k, family):
        if policy is None or len(traces) == 0:
            return
        rows.append(
            {
                "family": family,
                "policy": policy_name,
                "task": task,
                "group": task_group(task),
                "shots": int(k),
                **_metrics(policy, traces, hidden, vocab),
            }
        )

    for task in config["tasks"]:
        for k in config["shots"]:
            tr = test.subset((test.task == task) & (shots_of == k))
            for name, p in variants.items():
                add(name, p, tr, task, k, "main")
            for name, p in factor.items():
                add(name, p, tr, task, k, "factor")
            for name, p in general.items():
                add(name, p, tr, task, k, "generalization")
    bounds = oracle_bounds(test)
    bound_rows = [
        {
            "task": task,
            "shots": int(k),
            "first_correct_layer": float(bounds["first_correct"][m].mean()),
            "settled_layer": float(bounds["settled"][m].mean()),
            "num_layers": test.num_layers,
        }
        for task in config["tasks"]
        for k in config["shots"]
        if (m := (test.task == task) & (shots_of == k)).any()
    ]
    families = {
        "main": ["full", "oracle", *main],
        "factor": list(factor),
        "generalization": list(general),
    }
    results = {
        "config": config,
        "model": meta["model"],
        "families": families,
        "notes": notes,
        "rows": rows,
        "oracle_bounds": bound_rows,
    }
    write_json(out / "results.json", results)
    from .report import reproduce_figures, reproduce_tables

    write_text_atomic(out / "tables.md", reproduce_tables(results))
    reproduce_figures(results, test, out)
    return results
