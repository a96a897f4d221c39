"""Classifier training data: features and labels at every layer of the full model.

For every query and every layer l: the features at l, the label y_c = 1 if layer l's top-1
token is the gold token, and (choice tasks) the best choice token at l. Written as parquet
parts (one per batch, each written atomically) in one folder with a meta.json; a killed run
resumes at the first batch not written.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .features import ALL_FEATURES
from .files import OutputLock, read_json, write_atomic, write_text_atomic
from .persist import model_signature, parameter_count
from .policies import NeverExit
from .prefill import AdaptiveEngine
from .tasks import Query

# A padded batch hands SDPA a mask, and with a mask its CPU kernel computes the whole N x N
# square instead of the causal half: short prompts still gain from batching, prompts past about
# 2000 tokens run faster alone (measured in README.md, "Reproducing the paper"). Long prompts run
# alone.
MAX_BATCH_TOKENS = 4096


def _batches(tokens: Sequence[int], batch_size: int, max_tokens: int | None):
    """(start, stop) of each batch over prompts sorted longest first: up to `batch_size` prompts,
    and no more than `max_tokens` once padded to the longest (one prompt at least)."""
    start = 0
    while start < len(tokens):
        size = (
            batch_size
            if max_tokens is None
            else max(1, min(batch_size, max_tokens // max(tokens[start], 1)))
        )
        yield start, min(start + size, len(tokens))
        start += size


def collect(
    engine: AdaptiveEngine,
    queries: Sequence[Query],
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    features: Sequence[str] = ALL_FEATURES,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    max_batch_tokens: int | None = MAX_BATCH_TOKENS,
) -> Path:
    """Collect `queries` into `out_dir`. With world_size > 1 (torchrun), rank r takes every
    world_size-th query and writes its own parts; readers merge all parts. A batch holds at most
    `batch_size` prompts and `max_batch_tokens` padded tokens (None: no limit). The folder is
    locked while this runs: a second writer (another rank 0) is refused, not left to overwrite
    this run's parts (`files.OutputLock`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    out = Path(out_dir)
    with OutputLock(out, rank=rank):
        _collect(
            engine, queries, out, batch_size, features, progress, rank, world_size, max_batch_tokens
        )
    return out


def _collect(
    engine, queries, out: Path, batch_size, features, progress, rank, world_size, max_batch_tokens
) -> None:
    done = _check_folder(out, engine, features, queries)
    # shard by position in the full list, never by what is left: ranks may start at different times
    todo = [q for i, q in enumerate(queries) if i % world_size == rank and q.id not in done]
    todo, tokens = _longest_first(engine.tokenizer, todo)
    policy = NeverExit(features=tuple(features))
    all_layers = list(range(1, engine.num_layers + 1))
    # after the highest part, not the count: with a part deleted, a count would overwrite the last
    next_part = 1 + max(
        (int(p.stem.rsplit("-", 1)[1]) for p in out.glob(f"part-r{rank}-*.parquet")), default=-1
    )
    # progress in tokens, not queries: prompts run longest first, so a count of queries would
    # put the time left at several times the truth
    bar = tqdm(
        total=sum(tokens),
        desc=f"collect [rank {rank}]" if world_size > 1 else "collect",
        unit="tok",
        unit_scale=True,
        disable=not progress,
    )
    # small batches (the token budget's) are written together, batch_size queries a part
    pending = []
    for start, stop in _batches(tokens, batch_size, max_batch_tokens):
        batch = todo[start:stop]
        choices = [q.choice_tokens for q in batch]
        result = engine.run(
            [q.prompt for q in batch],
            policy,
            features=features,
            check_layers=all_layers,
            choices=choices,
        )
        pending.append(_rows(batch, result))
        if sum(t.num_rows for t in pending) >= batch_size * engine.num_layers or stop == len(todo):
            table, pending = pa.concat_tables(pending), []
            write_atomic(
                out / f"part-r{rank}-{next_part:05d}.parquet",
                lambda tmp, table=table: pq.write_table(table, tmp),
            )
            next_part += 1
        bar.update(sum(tokens[start:stop]))
        bar.set_postfix_str(f"{stop}/{len(todo)} queries", refresh=False)
    bar.close()


def _check_folder(out: Path, engine, features, queries) -> dict:
    """The fingerprints of the queries `out` already holds, after checking that they came from
    this model and feature set, and that no id now names another prompt; a new folder gets its
    meta.json, and one written before meta.json recorded the parameter count gets it."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {
        "model": model_signature(engine.model),
        "features": list(features),
        "parameters": parameter_count(engine.model),
    }
    meta_path = out / "meta.json"
    old = read_json(meta_path, "collect folder's meta.json") if meta_path.exists() else None
    # a folder from before meta.json recorded the parameter count matches without it
    upgraded = {"parameters": meta["parameters"], **old} if isinstance(old, dict) else old
    if old is not None and upgraded != meta:
        model = old.get("model") if isinstance(old, dict) else None
        model_id = model.get("model_id") if isinstance(model, dict) else model
        features = old.get("features") if isinstance(old, dict) else None
        raise ValueError(
            f"{out} already holds data collected with another model or feature set "
            f"({model_id}, {features}); use a new --out folder"
        )
    if old != meta:
        write_text_atomic(meta_path, json.dumps(meta, indent=2))
    done = collected_fingerprints(out)
    changed = [q.id for q in queries if done.get(q.id) not in (None, fingerprint(q))]
    if changed:  # ids are positions: other settings or data reuse them for other prompts
        raise ValueError(
            f"{out} holds {len(changed)} queries with these ids but other prompts or answers "
            f"(first: {changed[0]}): the data, --n-test / --n-train or --seed changed since they "
            "were collected; use a new --out folder"
        )
    return done


def _longest_first(tokenizer, queries) -> tuple[list, list[int]]:
    """(queries, their prompt lengths in tokens), longest first.

    Batches of prompts of similar length: in the order given, padding made Qwen2.5's 5-shot
    batches 31% longer than their prompts (72% zero-shot). Longest first: a prompt too long for
    the model or the memory fails at once."""
    tokens = (
        [len(ids) for ids in tokenizer([q.prompt for q in queries])["input_ids"]] if queries else []
    )
    order = sorted(range(len(queries)), key=lambda i: tokens[i], reverse=True)
    return [queries[i] for i in order], [tokens[i] for i in order]


def _rows(batch: Sequence[Query], result) -> pa.Table:
    B, L = len(batch), result.num_layers
    gold = np.array([q.gold for q in batch])
    cols = {
        "query_id": np.repeat([q.id for q in batch], L),
        "task": np.repeat([q.task for q in batch], L),
        "shots": np.repeat([q.shots for q in batch], L),
        "layer": np.tile(np.arange(1, L + 1), B),
        "num_layers": np.full(B * L, L),
        "seq_len": np.repeat(result.seq_len, L),
        "top1": result.layer_top1.reshape(-1),
        "gold": np.repeat(gold, L),
        "label": (result.layer_top1 == gold[:, None]).reshape(-1).astype(np.int8),
        # choice-restricted answer (lm-eval-harness style), -1 where the task has no choices
        "choice_top1": (
            result.layer_choice if result.layer_choice is not None else np.full((B, L), -1)
        ).reshape(-1),
        "fingerprint": np.repeat([fingerprint(q) for q in batch], L),  # what was run under this id
    }
    for j, name in enumerate(result.feature_names):
        cols[name] = result.features[:, :, j].reshape(-1)
    return pa.table(cols)


def fingerprint(q: Query) -> str:
    """A short hash of what a query runs and how it is scored."""
    return hashlib.sha256(f"{q.prompt}\0{q.gold}\0{list(q.choice_tokens)}".encode()).hexdigest()[
        :16
    ]


def collected_fingerprints(out_dir: str | Path) -> dict[str, str | None]:
    """{query id: fingerprint} of the collected queries (None in parts written before
    fingerprints were recorded)."""
    parts = sorted(Path(out_dir).glob("part-*.parquet"))
    if not parts:
        return {}
    schema = pa.schema([("query_id", pa.string()), ("fingerprint", pa.string())])
    table = ds.dataset(parts, schema=schema).to_table()
    return dict(zip(table.column("query_id").to_pylist(), table.column("fingerprint").to_pylist()))


def collected_ids(out_dir: str | Path) -> set[str]:
    return set(collected_fingerprints(out_dir))


def load_collected(path: str | Path, tasks: Sequence[str] | None = None) -> tuple[pa.Table, dict]:
    """The collected rows (optionally only some tasks) and the folder's meta.json."""
    path = Path(path)
    parts = sorted(path.glob("part-*.parquet"))
    if not (path / "meta.json").exists() or not parts:
        raise FileNotFoundError(
            f"{path} holds no collected data; run `adainfer collect --out {path}` first"
        )
    table = ds.dataset(parts).to_table()
    if tasks:
        have = set(table.column("task").unique().to_pylist())
        unknown = [t for t in tasks if t not in have]
        if unknown:  # a typo would silently train on the other tasks only
            raise ValueError(f"{path} holds no rows of task(s) {unknown}; it holds {sorted(have)}")
        table = select_tasks(table, tasks)
    meta = read_json(path / "meta.json", "collect folder's meta.json")
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ValueError(f"{path / 'meta.json'} records no model; it was not written by collect")
    return table, meta


def select_tasks(table: pa.Table, tasks: Sequence[str]) -> pa.Table:
    """The collected rows of these tasks only."""
    return table.filter(
        pa.array(np.isin(table.column("task").to_numpy(zero_copy_only=False), list(tasks)))
    )


def training_arrays(table: pa.Table, features: Sequence[str], target: str = "gold"):
    """(X [n, F], y [n], groups [n]) for ExitPolicy.fit, rows of one query in layer order;
    y per `target` (`offline.Traces.labels`: "gold", as in the paper, or "final")."""
    from .offline import Traces

    missing = [f for f in features if f not in table.column_names]
    if missing:
        raise ValueError(f"features {missing} were not collected; collected: {table.column_names}")
    return Traces.from_table(table, features).training_arrays(features, target)
