"""Where the parts AdaInfer needs live inside a Hugging Face causal LM.

The engine never re-implements a model: it runs the model's own forward and hooks its decoder
layers. What differs between architectures is only *where* the layer list, the final norm and
the LM head sit, and what the attention and MLP sub-modules are called (for the cosine
features). One small table says that for every supported family.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    layers: str  # dotted path, from the base model, to the nn.ModuleList of decoder layers
    norm: str  # dotted path, from the base model, to the final norm
    attn: str  # attribute of one decoder layer: the attention block
    mlp: str  # attribute of one decoder layer: the feed-forward block (its output module)
    project_out: str | None = None  # OPT-350m style projection applied after the final norm
    norm_optional: bool = False  # OPT-350m (post-norm layers) has no final norm at all
    attn_norm: str | None = "input_layernorm"  # attribute of one decoder layer: the norm
    # before attention (lossy generation computes skipped layers' keys and values through it)


_LLAMA_LIKE = ArchSpec(layers="layers", norm="norm", attn="self_attn", mlp="mlp")

SPECS: dict[str, ArchSpec] = {
    **{
        t: _LLAMA_LIKE
        for t in (
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "qwen3_moe",
            "gemma",
            "gemma2",
            "gemma3_text",
            "phi3",
            "smollm3",
            "olmo2",
            "granite",
        )
    },
    "gpt2": ArchSpec(layers="h", norm="ln_f", attn="attn", mlp="mlp", attn_norm="ln_1"),
    "opt": ArchSpec(
        layers="decoder.layers",
        norm="decoder.final_layer_norm",
        attn="self_attn",
        mlp="fc2",
        project_out="decoder.project_out",
        norm_optional=True,
        attn_norm=None,  # pre-norm (OPT-125m) or post-norm (OPT-350m), by config
    ),
    "gpt_neox": ArchSpec(layers="layers", norm="final_layer_norm", attn="attention", mlp="mlp"),
}


class UnsupportedModel(ValueError):
    pass


def _get(root: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


@dataclass
class ModelParts:
    """The pieces of one loaded model the engine works with."""

    model: nn.Module  # the *ForCausalLM
    base: nn.Module  # the decoder stack whose forward we run (model.model, model.transformer, ...)
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module
    spec: ArchSpec
    project_out: nn.Module | None = None
    softcap: float | None = None
    logit_scale: float = 1.0  # Granite divides its logits by config.logits_scaling;
    # project_out, logit_scale and softcap are applied by the logit lens (lens.py)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def config(self):
        return self.model.config


def find_parts(model: nn.Module) -> ModelParts:
    """Locate layers, final norm and LM head of a Hugging Face causal LM."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    spec = SPECS.get(model_type)
    base = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if spec is None or base is None or head is None:
        raise UnsupportedModel(
            f"adainfer does not know the layout of model_type={model_type!r} "
            f"({type(model).__name__}). Supported model types: {', '.join(sorted(SPECS))}."
        )
    layers = _get(base, spec.layers)
    norm = _get(base, spec.norm)
    if norm is None and spec.norm_optional:
        norm = nn.Identity()
    if not isinstance(layers, nn.ModuleList) or norm is None:
        raise UnsupportedModel(
            f"{type(model).__name__} has no decoder layers at '{spec.layers}' or final norm at "
            f"'{spec.norm}'; is it a decoder-only causal LM?"
        )
    project_out = _get(base, spec.project_out) if spec.project_out else None
    return ModelParts(
        model=model,
        base=base,
        layers=layers,
        norm=norm,
        head=head,
        spec=spec,
        project_out=project_out,
        softcap=getattr(config, "final_logit_softcapping", None),
        logit_scale=1.0 / getattr(config, "logits_scaling", 1.0),
    )


def context_length(config) -> int | None:
    """The longest sequence the model's positions allow (None: the config does not say)."""
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
