"""Shared fixtures: tiny random models of every supported architecture, built in-process."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

SHARED_DATA = Path(
    os.environ.get(
        "ADAINFER_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    )
)

VOCAB = ["<pad>", "<unk>", "<eos>"] + list(string.printable[:95])


@pytest.fixture(autouse=True)
def _auto_dtype_is_float32(request, monkeypatch):
    """`--dtype auto` (the CLI default) measures bf16 against fp32; on tiny models that is
    noise, and tests compare against fp32 runs: it picks fp32 here, except in the tests of
    the measurement itself (marked `real_auto_dtype`)."""
    if request.node.get_closest_marker("real_auto_dtype") is None:
        import adainfer.models

        monkeypatch.setattr(adainfer.models, "choose", lambda *a, **k: torch.float32)


def char_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, so tests can reason about tokens."""
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


def _config(arch: str, layers: int = 4):
    v, h = len(VOCAB), 32
    common = dict(vocab_size=v, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    llama_like = dict(
        hidden_size=h,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        **common,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**llama_like)
    if arch == "mistral":
        return transformers.MistralConfig(**llama_like)
    if arch == "qwen2":
        return transformers.Qwen2Config(**llama_like)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=8, **llama_like)
    if arch == "phi3":
        return transformers.Phi3Config(**llama_like)
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(
            head_dim=8, sliding_window=8, final_logit_softcapping=30.0, **llama_like
        )
    if arch == "granite":  # its forward divides the logits by logits_scaling: the lens must too
        return transformers.GraniteConfig(logits_scaling=8.0, **llama_like)
    if arch == "gpt2":
        return transformers.GPT2Config(
            n_embd=h, n_layer=layers, n_head=4, n_positions=4096, **common
        )
    if arch == "opt":
        return transformers.OPTConfig(
            hidden_size=h,
            num_hidden_layers=layers,
            num_attention_heads=4,
            ffn_dim=64,
            max_position_embeddings=256,
            word_embed_proj_dim=h,
            **common,
        )
    if arch == "opt-350m":  # post-norm layers, no final norm, project_in / project_out
        return transformers.OPTConfig(
            hidden_size=h,
            num_hidden_layers=layers,
            num_attention_heads=4,
            ffn_dim=64,
            max_position_embeddings=256,
            word_embed_proj_dim=16,
            do_layer_norm_before=False,
            **common,
        )
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(
            hidden_size=h,
            num_hidden_layers=layers,
            num_attention_heads=4,
            intermediate_size=64,
            max_position_embeddings=256,
            **common,
        )
    raise KeyError(arch)


ARCHS = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma3",
    "granite",
    "gpt2",
    "opt",
    "opt-350m",
    "gpt_neox",
]


def tiny_model(arch: str = "llama", layers: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(
        _config(arch, layers), dtype=torch.float32
    )
    model.adainfer_id = f"tiny-{arch}"
    return model.eval(), char_tokenizer()


@pytest.fixture(params=ARCHS)
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    """Save a tiny model + tokenizer as a local Hugging Face folder; returns its path."""

    def save(arch: str = "llama", layers: int = 4) -> str:
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        model, tok = tiny_model(arch, layers=layers)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        return str(path)

    return save
