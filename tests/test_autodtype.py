"""`--dtype auto`: the measured choice between bf16 and fp32, cached per machine and model."""

from __future__ import annotations

import json

import pytest
import torch

from adainfer import autodtype
from conftest import tiny_model

pytestmark = pytest.mark.real_auto_dtype


def _model():
    model, _ = tiny_model("llama")
    return model


@pytest.mark.parametrize("ratio, chosen", [(0.5, torch.bfloat16), (0.95, torch.float32)])
def test_bf16_only_when_clearly_faster(tmp_path, ratio, chosen):
    cache = tmp_path / "choices.json"
    assert (
        autodtype.choose(
            _model(), "decode", model_id="m", cache_file=cache, timer=lambda m, w: ratio
        )
        == chosen
    )


def test_measured_once_then_read_from_the_cache(tmp_path):
    cache, calls = tmp_path / "choices.json", []

    def timer(model, work):
        calls.append(work)
        return 0.5

    for _ in range(2):
        autodtype.choose(_model(), "decode", model_id="m", cache_file=cache, timer=timer)
    autodtype.choose(_model(), "prefill", model_id="m", cache_file=cache, timer=timer)
    assert calls == ["decode", "prefill"]  # each work measured once
    (entry,) = [v for k, v in json.loads(cache.read_text()).items() if k.endswith("|m|decode")]
    assert entry["bf16_over_fp32"] == 0.5


def test_an_unreadable_cache_is_measured_again(tmp_path, caplog):
    cache = tmp_path / "choices.json"
    cache.write_text("{not json")
    got = autodtype.choose(
        _model(), "prefill", model_id="m", cache_file=cache, timer=lambda m, w: 2.0
    )
    assert got == torch.float32 and "unreadable" in caplog.text
    assert len(json.loads(cache.read_text())) == 1


def test_unknown_work_is_refused():
    with pytest.raises(ValueError, match="prefill"):
        autodtype.choose(_model(), "training", model_id="m")


@pytest.mark.parametrize("work", autodtype.WORKS)
def test_the_real_measurement_returns_a_ratio_and_leaves_the_model_in_fp32(work, monkeypatch):
    monkeypatch.setattr(autodtype, "PROMPT_TOKENS", 16)
    monkeypatch.setattr(autodtype, "REPEATS", 2)
    model = _model()
    ratio = autodtype.speed_ratio(model, work)
    assert ratio > 0 and model.dtype == torch.float32


def test_load_with_auto_casts_to_the_choice_and_caches_it(tmp_path, monkeypatch):
    from adainfer.models import load

    model, tok = tiny_model("llama")
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(autodtype, "speed_ratio", lambda model, work: 0.4)
    loaded, _ = load(tmp_path / "m", dtype="auto", work="decode", cache_dir=tmp_path / "cache")
    assert loaded.dtype == torch.bfloat16
    assert (tmp_path / "cache" / "dtype-choices.json").is_file()
