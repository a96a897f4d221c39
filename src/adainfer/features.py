"""Exit features computed from one layer's logit-lens distribution (and layer-to-layer similarity).

All features describe the LAST prompt position of each active row after decoder layer l:
- gap, top_prob: the paper's base features, P(top-1) - P(top-2) and P(top-1);
- entropy: of the softmax over the whole vocabulary (nats);
- layer_frac: l / L, lets a classifier learn "never this early" on models whose early layers are
  confidently wrong (SmolLM2, Gemma 3);
- cos_attn, cos_mlp, cos_hidden: cosine similarity between layer l and layer l-1 of the attention
  output, the MLP output and the hidden state (the paper's factor study). At layer 1 the hidden
  state is compared with the input embeddings; cos_attn and cos_mlp, which have no layer 0, are 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

PAPER_FEATURES = ("gap", "top_prob")
LOGIT_FEATURES = ("gap", "top_prob", "entropy")
SIMILARITY_FEATURES = {"cos_attn": "attn", "cos_mlp": "mlp", "cos_hidden": "hidden"}
ALL_FEATURES = LOGIT_FEATURES + ("layer_frac",) + tuple(SIMILARITY_FEATURES)
DEFAULT_FEATURES = LOGIT_FEATURES + (
    "layer_frac",
)  # the default policy's: no similarity streams to track


def check_names(names: Iterable[str]) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [n for n in names if n not in ALL_FEATURES]
    if unknown or not names:
        raise ValueError(
            f"unknown feature(s) {unknown or names}; choose from {', '.join(ALL_FEATURES)}"
        )
    return names


def needed_streams(names: Iterable[str]) -> set[str]:
    """Which activations (attn / mlp / hidden) must be tracked for these features."""
    return {SIMILARITY_FEATURES[n] for n in names if n in SIMILARITY_FEATURES}


def compute(
    logits: torch.Tensor,
    names: tuple[str, ...],
    layer: int,
    num_layers: int,
    similarities: Mapping[str, torch.Tensor] | None = None,
    chunk_rows: int = 8,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (features [A, F] float32 in the order of `names`, top-1 token ids [A]).

    Rows go `chunk_rows` at a time: the float32 softmax temporaries are [rows, V], and on a
    262k vocabulary (Gemma 3) a batch of 32 at once added 81 MB to the process's peak."""
    parts = [_logit_features(chunk, names) for chunk in logits.split(chunk_rows) or (logits,)]
    columns = {n: torch.cat([p[n] for p in parts]) for n in parts[0]}
    top1 = columns.pop("top1")
    columns["layer_frac"] = torch.full(
        top1.shape, layer / num_layers, dtype=torch.float32, device=top1.device
    )
    for name, stream in SIMILARITY_FEATURES.items():
        if name in names:
            columns[name] = similarities[stream].float()
    return torch.stack([columns[n] for n in names], dim=-1), top1


def _logit_features(logits: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    logits = logits.float()
    top2 = logits.topk(2, dim=-1)
    columns = {"top1": top2.indices[:, 0]}
    if {"gap", "top_prob", "entropy"} & set(names):
        logz = torch.logsumexp(logits, dim=-1)
        p12 = torch.exp(top2.values - logz[:, None])
        columns["top_prob"] = p12[:, 0]
        columns["gap"] = p12[:, 0] - p12[:, 1]
        if "entropy" in names:  # H = log Z - sum p * logit, with one [rows, V] temporary
            p = (logits - logz[:, None]).exp_()
            columns["entropy"] = logz - torch.linalg.vecdot(p, logits)
    return columns


class LayerSimilarity:
    """cos_attn, cos_mlp, cos_hidden of the rows still going, one layer after another.

    The hidden state is compared with the layer's input (the previous layer's output, the
    embeddings at layer 1); attention and MLP outputs with the previous layer's, which layer 1
    does not have (0)."""

    def __init__(self, streams: Iterable[str]):
        self.streams = set(streams)
        self.previous: dict[str, torch.Tensor] = {}

    def step(
        self, hidden: torch.Tensor, before: torch.Tensor, taps: Mapping[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Similarities at this layer ([A] each); `hidden` and `before` are the last position's
        output and input, `taps` the sub-modules' last-position outputs."""
        current = {s: taps[s] for s in self.streams - {"hidden"}}
        sims = {s: self._cosine(v, self.previous.get(s)) for s, v in current.items()}
        if "hidden" in self.streams:
            sims["hidden"] = self._cosine(hidden, before)
        self.previous.update(current)
        return sims

    def keep(self, mask: torch.Tensor) -> None:
        """Only the rows in `mask` run the next layer."""
        self.previous = {k: v[mask.to(v.device)] for k, v in self.previous.items()}

    @staticmethod
    def _cosine(current: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
        if previous is None:
            return torch.zeros(len(current), device=current.device)
        return torch.cosine_similarity(current.float(), previous.float(), dim=-1)
