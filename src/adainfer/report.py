"""Plots. Library code returns numbers; this module only draws them."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_accuracy_vs_layers(summary: dict, layer_acc: np.ndarray | None, path: str | Path, title: str = "") -> Path:
    """Left: accuracy if every query stopped at layer l. Right: each policy's accuracy vs layers used."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    L = summary["num_layers"]
    if layer_acc is not None:
        ax = axes[0]
        ax.plot(np.arange(1, L + 1), 100 * layer_acc, marker="o", ms=3)
        ax.set_xlabel("layer l")
        ax.set_ylabel("top-1 accuracy at layer l (%)")
        ax.set_title("Answer emerges with depth (logit lens)")
        ax.set_xlim(1, L)
        ax.grid(alpha=0.3)
    ax = axes[1]
    markers = "osD^v<>pPX*h"
    for i, (name, s) in enumerate(summary["policies"].items()):
        ax.scatter(100 * s["mean_exit_layer"] / L, 100 * s["accuracy"], s=60, marker=markers[i % len(markers)],
                   zorder=3, alpha=0.8, label=f"{name} (true FLOPs {100 * s['true_flops_ratio']:.0f}%)")
    ax.set_xlabel("layers used (% of full depth)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title("Policies: accuracy against layers used")
    ax.set_xlim(-2, 105)
    ax.set_ylim(-3, 103)
    ax.legend(fontsize=8, loc="center left")
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
