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

import logging
import os
import random
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from .collect import (
    MAX_BATCH_TOKENS,
    collect,
    load_collected,
    select_tasks,
    training_arrays,
)
from .features import ALL_FEATURES, PAPER_FEATURES
from .files import OutputLock, read_json, write_json, write_text_atomic
from .flops import ratios
from .offline import Traces, oracle_bounds, simulate
from .policies import CRFExit, NeverExit, OracleExit, SVMExit, standard_policies
from .report import reproduce_figures, reproduce_tables
from .summary import FIELDS, summarise
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
RUN_CONFIG = Path("traces") / "run.json"  # the run's settings and the cells it could not make
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


def _same_dtype(dtype, world):
    """Rank 0's dtype on every rank (one run must not mix bf16 and fp32 traces)."""
    if world == 1:
        return dtype
    import torch.distributed as dist

    chosen = [dtype]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


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
    dtype: str = "auto",
    device: str = "cpu",
    device_map=None,
    data_dir: str | Path | None = None,
    progress: bool = True,
    report_only: bool = False,
) -> dict | None:
    from .models import load
    from .prefill import AdaptiveEngine

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
    if report_only:
        with OutputLock(out):
            return _report_only(out, config)

    _check_resumable(out, config)
    rank, world = _dist()
    if world > 1 and device.startswith("cuda") and ":" not in device:  # one GPU per rank
        device = f"cuda:{os.environ.get('LOCAL_RANK', rank)}"
    # one run per folder: a second would number the same parts and overwrite this one's
    with OutputLock(out, rank=rank):
        lm, tok = load(model, dtype=dtype, device=device, device_map=device_map)
        lm.to(_same_dtype(lm.dtype, world))  # "auto" measures per process: rank 0 decides
        config.update(dtype=str(lm.dtype).removeprefix("torch."))
        _check_resumable(out, config)
        engine = AdaptiveEngine(lm, tok)
        train, test = _queries(tok, config, data_dir)
        config.update(world_size=world)
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


def _report_only(out: Path, config: dict) -> dict:
    """The report from the traces already collected; no model needed. The run's own settings
    (skipped cells included) where it recorded them, and its transfer_from unless another is
    given."""
    _, meta = load_collected(out / "traces" / "test")
    if (out / RUN_CONFIG).exists():
        recorded = read_json(out / RUN_CONFIG, "run record")
        config = {
            **recorded,
            "transfer_from": config["transfer_from"] or recorded.get("transfer_from"),
        }
    config["model"] = meta["model"]["model_id"]
    return report(
        out, config, hidden=meta["model"]["hidden_size"], vocab=meta["model"]["vocab_size"]
    )


def _queries(tokenizer, config: dict, data_dir) -> tuple[list, list]:
    """(training queries, test queries) of every task; records in `config` the (task, k) cells
    a task cannot make, the tasks' names in the traces and each task's held-out examples."""
    from .tasks import held_out_indices, load_task, task_queries

    n_queries, seed = config["n_queries"], config["seed"]
    test, train, name_of, held_out = [], [], {}, {}
    for task in config["tasks"]:
        loaded = load_task(task, data_dir)
        for k in config["shots"]:
            try:
                test += task_queries(
                    tokenizer, [loaded], shots=k, n_train=0, n_test=n_queries, seed=seed
                )[1]
            except TaskError as e:  # e.g. a small task cannot give k demonstrations
                config["skipped"][f"{task} {k}-shot"] = str(e)
        train += task_queries(
            tokenizer,
            [loaded],
            shots=config["train_shots"],
            n_train=config["n_train"],
            n_test=n_queries,
            seed=seed,
            strict=False,
        )[0]
        name_of[task] = loaded.name  # a task file is named by its stem in the traces
        held_out[loaded.name] = held_out_indices(loaded, n_queries, seed)  # the split, recorded
    names = [name_of[t] for t in config["tasks"]]
    if len(set(names)) < len(names):  # two task files with one stem would share query ids
        dup = sorted({n for n in names if names.count(n) > 1})
        raise TaskError(
            f"tasks {dup} appear twice (task files are named by their file name): rename one"
        )
    config.update(
        tasks=names, train_tasks=[name_of[t] for t in config["train_tasks"]], held_out=held_out
    )
    return train, test


def _check_resumable(out: Path, config: dict) -> None:
    if not (out / RUN_CONFIG).exists():
        return
    old = read_json(out / RUN_CONFIG, "run record")
    changed = [
        f"--{k.replace('_', '-')} {old[k]} (now {config[k]})"
        for k in FIXED_ON_RESUME
        if k in old and old[k] != config[k] and config[k] != "auto"  # auto: checked once known
    ]
    if changed:
        raise ValueError(
            f"{out} holds traces collected with {', '.join(changed)}; resuming would mix queries "
            "drawn under other settings into the same cells: use those settings (tasks and k may "
            "be added) or a new --out-dir"
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
    fields = [name for name in FIELDS if name != "mean_checks"]  # a replay makes no checks count
    return summarise(
        r.exit_layer,
        r.correct,
        f,
        fields=fields,
        num_layers=L,
        choice_correct=r.choice_correct,
    )


def report(out: Path, config: dict, *, hidden: int, vocab: int) -> dict:
    """Fit the classifiers on the training traces, replay every policy on the test traces and
    write results.json, tables.md and the figures."""
    train_table, meta = load_collected(out / "traces" / "train")
    test_table, _ = load_collected(out / "traces" / "test")
    test = Traces.from_table(test_table, ALL_FEATURES)
    notes: dict[str, str] = dict(config.get("skipped", {}))
    families = _fit_families(train_table, config, notes)  # a policy that failed to fit: None
    rows = [
        {
            "family": family,
            "policy": name,
            "task": task,
            "group": task_group(task),
            "shots": int(k),
            **_metrics(policy, traces, hidden, vocab),
        }
        for task, k, traces in _cells(test, config)
        for family, policies in families.items()
        for name, policy in policies.items()
        if policy is not None
    ]
    results = {
        "config": config,
        "model": {**meta["model"], **{k: meta[k] for k in ("parameters",) if k in meta}},
        "families": {family: list(policies) for family, policies in families.items()},
        "notes": notes,
        "rows": rows,
        "oracle_bounds": _oracle_bound_rows(test, config),
        "layer_accuracy": _layer_accuracy_rows(test, config),
    }
    write_json(out / "results.json", results)
    write_text_atomic(out / "tables.md", reproduce_tables(results))
    reproduce_figures(results, test, out)
    return results


def _fit_families(train_table, config: dict, notes: dict) -> dict[str, dict]:
    """{family: {name: fitted policy, or None where fitting failed (said in `notes`)}}: the
    paper's policies ("main", with the full model and the oracle), the SVM on each feature set
    ("factor") and the SVM trained elsewhere ("generalization")."""
    subset = select_tasks(train_table, config["train_tasks"])  # the paper's random training subset
    main = {n: _fit(p, subset, n, notes) for n, p in standard_policies().items()}
    factor = {
        n: _fit(SVMExit(features=f), subset, f"svm {n}", notes) for n, f in FACTOR_STUDY.items()
    }
    qa_tasks = [t for t in config["tasks"] if task_group(t) == "question answering"]
    sources = {
        "intra-task (train: sentiment)": select_tasks(train_table, [SENTIMENT]),
        "inter-task (train: question answering)": select_tasks(train_table, qa_tasks),
    }
    if config.get("transfer_from"):
        other, other_meta = load_collected(Path(config["transfer_from"]) / "traces" / "train")
        # the other model's traces of the same training tasks: like for like with the
        # in-distribution row
        sources[f"inter-model (train: {other_meta['model']['model_id']})"] = select_tasks(
            other, config["train_tasks"]
        )
    # the paper's Table 6 has both of its classifiers in every setting
    general = {
        generalization_name(setting, name): _fit(make(), table, f"{name} {setting}", notes)
        for setting, table in sources.items()
        for name, make in (("svm", SVMExit), ("crf", CRFExit))
    }
    return {
        "main": {"full": NeverExit(), "oracle": OracleExit(), **main},
        "factor": factor,
        "generalization": general,
    }


def generalization_name(setting: str, classifier: str) -> str:
    """A generalization row's name in results.json: 'svm: inter-task (train: ...)'."""
    return f"{classifier}: {setting}"


def _cells(test: Traces, config: dict):
    """(task, k, its test traces) for every cell with traces."""
    shots = test.shots
    for task in config["tasks"]:
        for k in config["shots"]:
            traces = test.subset((test.task == task) & (shots == k))
            if len(traces):
                yield task, k, traces


def _oracle_bound_rows(test: Traces, config: dict) -> list[dict]:
    """Per cell: the mean earliest layer whose top-1 is gold, and after which it never changes."""
    bounds, shots = oracle_bounds(test), test.shots
    return [
        {
            "task": task,
            "shots": int(k),
            "first_correct_layer": float(bounds["first_correct"][m].mean()),
            "settled_layer": float(bounds["settled"][m].mean()),
            "num_layers": test.num_layers,
        }
        for task in config["tasks"]
        for k in config["shots"]
        if (m := (test.task == task) & (shots == k)).any()
    ]


def _layer_accuracy_rows(test: Traces, config: dict) -> list[dict]:
    """Per cell: top-1 accuracy if every query stopped at layer l, for l = 1..L (Figure 1's
    curve as numbers, so tables and claims need no traces)."""
    return [
        {
            "task": task,
            "shots": int(k),
            "n": len(traces),
            "accuracy": [float(a) for a in (traces.top1 == traces.gold[:, None]).mean(0)],
        }
        for task, k, traces in _cells(test, config)
    ]
