"""What a policy did on a set of queries, in numbers: one summariser for live evaluation, the
benchmark and the offline replay, so the same name always means the same computation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

FIELDS = (
    "n",
    "accuracy",
    "choice_accuracy",
    "mean_exit_layer",
    "mean_checks",
    "flops_ratio",
    "true_flops_ratio",
    "exit_layer_histogram",
)


def summarise(
    exit_layer: np.ndarray,
    correct: np.ndarray,
    flops: Mapping[str, np.ndarray],
    *,
    fields: Sequence[str],
    num_layers: int | None = None,
    num_checks: np.ndarray | None = None,
    choice_correct: np.ndarray | None = None,
) -> dict:
    """The named `fields` (in that order, from `FIELDS`) over per-query arrays: `flops` holds
    the per-query `flops_ratio` and `true_flops_ratio` (flops.ratios); the histogram counts
    exits at layers 1..`num_layers`."""
    unknown = [f for f in fields if f not in FIELDS]
    if unknown:
        raise ValueError(f"unknown summary fields {unknown}; known: {', '.join(FIELDS)}")
    values = {
        "n": lambda: len(exit_layer),
        "accuracy": lambda: float(np.mean(correct)),
        "choice_accuracy": lambda: (
            None if choice_correct is None else float(np.mean(choice_correct))
        ),
        "mean_exit_layer": lambda: float(np.mean(exit_layer)),
        "mean_checks": lambda: float(np.mean(num_checks)),
        "flops_ratio": lambda: float(np.mean(flops["flops_ratio"])),
        "true_flops_ratio": lambda: float(np.mean(flops["true_flops_ratio"])),
        "exit_layer_histogram": lambda: np.bincount(exit_layer, minlength=num_layers + 1)[
            1:
        ].tolist(),
    }
    return {f: values[f]() for f in fields}
