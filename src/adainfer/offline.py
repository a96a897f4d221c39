"""Replay exit policies on collected full-depth traces, without running the model again.

A trace holds every layer's features and top-1 token for each query, so any policy's exit
layer follows from it: `simulate` runs the engine's own decision loop (same `Step`, same
`decide`, rows leave as they stop) over the recorded layers. One full pass per query then
scores every policy, threshold and feature set; the tests check that the replay and a live
engine run give the same exit layers.

The replay assumes exact checks on the traces' own batching: an engine with `shortlist` or
`check_dtype` decides on approximate features, and a row near a policy's threshold may then
stop one check earlier or later than replayed (the bench times those engines live).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from .policies import Step, planned_checks

TARGETS = ("gold", "final")


@dataclass
class Traces:
    query_id: np.ndarray  # [Q]
    task: np.ndarray  # [Q]
    features: np.ndarray  # [Q, L, F]
    feature_names: tuple[str, ...]
    top1: np.ndarray  # [Q, L]
    choice_top1: np.ndarray  # [Q, L], -1 without choices
    gold: np.ndarray  # [Q]
    seq_len: np.ndarray  # [Q]
    model: dict | None = None  # signature of the model traced (`persist.model_signature`)

    @property
    def num_layers(self) -> int:
        return self.top1.shape[1]

    def __len__(self) -> int:
        return len(self.query_id)

    @property
    def shots(self) -> np.ndarray:
        """[Q] k of each query, read from its id (task/kshot/seed/i, `tasks.make_queries`)."""
        return np.array([int(q.split("/")[1].removesuffix("shot")) for q in self.query_id])

    @classmethod
    def from_table(
        cls, table: pa.Table, feature_names: Sequence[str], model: dict | None = None
    ) -> Traces:
        table = table.sort_by([("query_id", "ascending"), ("layer", "ascending")])
        L = int(table.column("num_layers")[0].as_py())
        Q = table.num_rows // L
        if Q * L != table.num_rows:
            raise ValueError("collected table is not complete: some query lacks some layers")

        def col(name):
            return table.column(name).to_numpy(zero_copy_only=False).reshape(Q, L)

        ids, layers = col("query_id"), col("layer")
        bad = np.flatnonzero((ids != ids[:, :1]).any(1) | (layers != np.arange(1, L + 1)).any(1))
        if len(bad):  # a query collected twice, or one missing layers, would interleave rows
            raise ValueError(
                f"collected table is not one row per query and layer 1..{L}: query "
                f"{ids[bad[0], 0]!r} is repeated or lacks layers (two folders merged, or two "
                "tasks with one name?)"
            )
        return cls(
            query_id=ids[:, 0],
            task=col("task")[:, 0],
            features=np.stack([col(f) for f in feature_names], axis=-1).astype(np.float64),
            feature_names=tuple(feature_names),
            top1=col("top1"),
            choice_top1=col("choice_top1")
            if "choice_top1" in table.column_names
            else np.full((Q, L), -1),
            gold=col("gold")[:, 0],
            seq_len=col("seq_len")[:, 0],
            model=model,
        )

    def subset(self, mask) -> Traces:
        return Traces(
            **{
                k: getattr(self, k)[mask]
                for k in ("query_id", "task", "features", "top1", "choice_top1", "gold", "seq_len")
            },
            feature_names=self.feature_names,
            model=self.model,
        )

    def labels(self, target: str = "gold") -> np.ndarray:
        """[Q, L] what an exit classifier learns to predict at each layer.

        - "gold" (the paper): this layer's top-1 is the gold token;
        - "final": this layer's top-1 is already the full model's answer and stays so (the
          answer has settled). It needs no gold labels and aims at keeping the full model's
          answers, which is what "within 1 point of the full model" asks."""
        if target == "gold":
            return self.top1 == self.gold[:, None]
        if target == "final":
            return (
                oracle_bounds(self)["settled"][:, None] <= np.arange(1, self.num_layers + 1)[None]
            )
        raise ValueError(f"unknown training target {target!r}; choose from {', '.join(TARGETS)}")

    def training_arrays(self, features: Sequence[str], target: str = "gold"):
        """(X [Q*L, F], y, groups) for ExitPolicy.fit, rows of one query in layer order."""
        missing = [f for f in features if f not in self.feature_names]
        if missing:
            raise ValueError(
                f"features {missing} were not collected; collected: {', '.join(self.feature_names)}"
            )
        Q, L = self.top1.shape
        cols = [self.feature_names.index(f) for f in features]
        X = self.features[:, :, cols].reshape(Q * L, len(cols))
        return X, self.labels(target).reshape(-1).astype(np.int8), np.repeat(self.query_id, L)


@dataclass
class Replay:
    exit_layer: np.ndarray  # [Q]
    num_checks: np.ndarray  # [Q]
    correct: np.ndarray  # [Q] top-1 over the whole vocabulary is the gold token
    choice_correct: np.ndarray | None  # [Q] best choice token is the gold token (choice tasks)
    agrees: np.ndarray | None = None  # [Q] the answer is the full model's answer


def simulate(
    policy, traces: Traces, check_layers: Sequence[int] | None = None, batch_size: int | None = None
) -> Replay:
    """Exit layer of every query under `policy`, checking at `check_layers` (default: the
    policy's plan for batches of `batch_size`, as the engine picks it; unplanned: every layer)."""
    L, Q = traces.num_layers, len(traces)
    learned = planned_checks(policy, batch_size)
    layers = (
        check_layers
        if check_layers is not None
        else (learned if learned is not None else range(1, L + 1))
    )
    layers = sorted(l for l in set(layers) if 1 <= l < L)
    missing = [f for f in policy.features if f not in traces.feature_names]
    if missing:
        raise ValueError(
            f"the policy needs features {missing} that the traces lack "
            f"(they hold {list(traces.feature_names)})"
        )
    cols = [traces.feature_names.index(f) for f in policy.features]
    exit_layer, num_checks = np.full(Q, L), np.zeros(Q, dtype=int)
    active = np.arange(Q)
    for j, layer in enumerate(layers):
        if len(active) == 0:
            break
        history = traces.features[active][:, [l - 1 for l in layers[: j + 1]]][:, :, cols]
        step = Step(
            layer=layer,
            num_layers=L,
            feature_names=tuple(policy.features),
            features=history[:, -1],
            history=history,
            top1=traces.top1[active, layer - 1],
            rows=active,
            gold=traces.gold[active],
        )
        stop = np.asarray(policy.decide(step), dtype=bool)
        num_checks[active] += 1
        exit_layer[active[stop]] = layer
        active = active[~stop]
    rows = np.arange(Q)
    answer = traces.top1[rows, exit_layer - 1]
    choice = traces.choice_top1[rows, exit_layer - 1]
    has_choices = (traces.choice_top1 >= 0).any()
    return Replay(
        exit_layer=exit_layer,
        num_checks=num_checks,
        correct=answer == traces.gold,
        choice_correct=(choice == traces.gold) if has_choices else None,
        agrees=answer == traces.top1[:, -1],
    )


def oracle_bounds(traces: Traces) -> dict[str, np.ndarray]:
    """Per query: the earliest layer whose top-1 is gold (L if none), and the earliest layer
    after which the top-1 never changes again (the answer has settled)."""
    L = traces.num_layers
    hit = traces.top1 == traces.gold[:, None]
    first_correct = np.where(hit.any(1), hit.argmax(1) + 1, L)
    same_as_final = traces.top1 == traces.top1[:, -1:]
    # settled at l if every layer from l to L agrees with the final answer
    settled_from = L - np.cumprod(same_as_final[:, ::-1], axis=1).sum(1) + 1
    return {"first_correct": first_correct, "settled": settled_from}
