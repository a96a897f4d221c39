"""FLOPs ratios against the full model, the paper's and an honest one, side by side.

Units of 2h FLOPs (h = hidden size): one decoder layer on one token costs 2(6h + s) (attention
projections + MLP + attention scores, with s the sequence length), one LM-head projection of
one position costs V.

- paper ratio: (2 l'(6h + s) + V) / (2 L(6h + s) + V), exactly as published; it ignores every
  exit check;
- true ratio: the whole prompt goes through the layers (s tokens, s * 2(6h + s) per layer),
  and every LM-head projection made (each exit check, plus the final one when a row runs to
  the end) and every classifier decision is charged.
"""

from __future__ import annotations

import numpy as np


def paper_ratio(exit_layer, num_layers: int, hidden: int, vocab: int, seq_len) -> np.ndarray:
    exit_layer, s = np.asarray(exit_layer, float), np.asarray(seq_len, float)
    layer = 2 * (6 * hidden + s)
    return (exit_layer * layer + vocab) / (num_layers * layer + vocab)


def true_ratio(
    exit_layer,
    num_checks,
    num_layers: int,
    hidden: int,
    vocab: int,
    seq_len,
    policy_flops: float = 0.0,
    short_checks=0,
    shortlist_size: int = 0,
    confirms=0,
) -> np.ndarray:
    """`short_checks` of the `num_checks` projected a `shortlist_size`-token shortlist only;
    `confirms` counts the extra whole-vocabulary projections made to confirm a stop."""
    exit_layer, s = np.asarray(exit_layer, float), np.asarray(seq_len, float)
    checks, short = np.asarray(num_checks, float), np.asarray(short_checks, float)
    layer = s * 2 * (6 * hidden + s)
    final_head = (exit_layer == num_layers).astype(float)  # rows that exited used a check's logits
    head = (
        checks - short + final_head + np.asarray(confirms, float)
    ) * vocab + short * shortlist_size
    used = exit_layer * layer + head + checks * policy_flops / (2 * hidden)
    return used / (num_layers * layer + vocab)


def ratios(
    exit_layer,
    num_checks,
    seq_len,
    *,
    num_layers: int,
    hidden: int,
    vocab: int,
    policy=None,
    short_checks=0,
    shortlist_size: int = 0,
    confirms=0,
) -> dict[str, np.ndarray]:
    """Both ratios, per row; the policy's own decision cost is charged to the true ratio.

    Takes plain arrays, so a live run (`ExitResult`) and an offline replay (`Replay` plus the
    traces' sequence lengths) are counted by the same code."""
    cost = policy.cost_flops() if policy is not None and hasattr(policy, "cost_flops") else 0.0
    return {
        "flops_ratio": paper_ratio(exit_layer, num_layers, hidden, vocab, seq_len),
        "true_flops_ratio": true_ratio(
            exit_layer,
            num_checks,
            num_layers,
            hidden,
            vocab,
            seq_len,
            cost,
            short_checks,
            shortlist_size,
            confirms,
        ),
    }


def result_ratios(result, parts, policy=None) -> dict[str, np.ndarray]:
    """`ratios` of an ExitResult of the model described by `parts` (ModelParts)."""
    return ratios(
        result.exit_layer,
        result.num_checks,
        result.seq_len,
        num_layers=result.num_layers,
        hidden=parts.config.hidden_size,
        vocab=parts.head.weight.shape[0],
        policy=policy,
        short_checks=0 if result.num_short_checks is None else result.num_short_checks,
        shortlist_size=result.shortlist_size,
        confirms=0 if result.num_confirms is None else result.num_confirms,
    )
