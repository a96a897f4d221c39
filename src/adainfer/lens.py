"""The logit lens: a hidden state decoded by the model's own final norm and LM head.

Every caller (exit checks, the final answer, check-cost timing, generation) decodes through
`LogitLens`, so what the model's forward does after its last layer (OPT's `project_out`,
Granite's logit scaling, Gemma's final-logit soft-capping) is applied in one place. Three ways
to read the head, as in tuned-lens's `Unembed`:
- exact: the head module itself, as the model's forward calls it;
- reduced precision (`dtype`): the head's weights cast once, e.g. bf16 on an fp32 model, half
  the bytes read per check;
- shortlist (`ids`): only k candidate rows of the unembedding per hidden state.
"""

from __future__ import annotations

import torch
from torch.nn import functional

from .arch import ModelParts


class LogitLens:
    """Decode hidden states [A, H] into logits [A, V] (or [A, k] on a shortlist)."""

    def __init__(self, parts: ModelParts):
        self.parts = parts
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def vocab_size(self) -> int:
        return self.parts.head.weight.shape[0]

    def __call__(
        self,
        hidden: torch.Tensor,
        *,
        dtype: torch.dtype | None = None,
        ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`dtype`: read the head in that precision; `ids` [A, k]: each row's candidate tokens.
        Without either, the exact logits."""
        hidden = self.normed(hidden)
        if ids is not None:
            return self.finish(self._shortlist(hidden, ids))
        if dtype is not None and dtype != self.parts.head.weight.dtype:
            weight, bias = self._weights_in(dtype)
            logits = functional.linear(hidden.to(dtype), weight, bias)
            # soft-capping in fp32: tanh on bf16 logits blurs the gap between the top two
            return self.finish(logits.float()) if self._finishes else logits
        return self.finish(self.parts.head(hidden))

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the head reads: the final norm, then OPT-350m's projection where there is one."""
        hidden = self.parts.norm(hidden)
        if self.parts.project_out is not None:
            hidden = self.parts.project_out(hidden)
        return hidden

    def finish(self, logits: torch.Tensor) -> torch.Tensor:
        """What the model's forward does to the head's output: scaling, then soft-capping."""
        if self.parts.logit_scale != 1.0:
            logits = logits * self.parts.logit_scale
        if self.parts.softcap:
            logits = torch.tanh(logits / self.parts.softcap) * self.parts.softcap
        return logits

    @property
    def _finishes(self) -> bool:
        return bool(self.parts.softcap) or self.parts.logit_scale != 1.0

    def _shortlist(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        head = self.parts.head
        logits = torch.einsum("ah,akh->ak", hidden, head.weight[ids])
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[ids]
        return logits

    def _weights_in(self, dtype: torch.dtype):
        """The head's weight and bias in `dtype`, cast once per lens."""
        if dtype not in self._cast:
            head = self.parts.head
            bias = getattr(head, "bias", None)
            self._cast[dtype] = (
                head.weight.detach().to(dtype),
                None if bias is None else bias.detach().to(dtype),
            )
        return self._cast[dtype]
