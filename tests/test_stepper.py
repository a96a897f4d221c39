"""The layer stepper and the logit lens: the two pieces every engine client stands on."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from adainfer.arch import find_parts
from adainfer.lens import LogitLens
from adainfer.prefill import AdaptiveEngine
from adainfer.stepper import LayerStepper, UnknownRowArgument
from conftest import ARCHS, tiny_model

PROMPTS = ["Q: apple\nA: Apple\n\nQ: river\nA:", "hello", "a much longer prompt, with words"]


def _setup(arch: str, layers: int = 4):
    model, tok = tiny_model(arch, layers=layers)
    engine = AdaptiveEngine(model, tok)  # for its tokenization (left padding, positions)
    return model, engine.encode(PROMPTS), find_parts(model)


def _full_hidden(model, enc) -> tuple[torch.Tensor, ...]:
    with torch.inference_mode():
        return model(**enc, use_cache=False, output_hidden_states=True).hidden_states


@pytest.mark.parametrize("arch", ARCHS)
def test_rows_that_leave_do_not_change_the_others(arch):
    """Row 0 leaves after layer 1, row 1 after layer 2: the rows still going see exactly the
    hidden states of a plain full-batch forward, and the forward ends after `until`."""
    model, enc, parts = _setup(arch)
    full = _full_hidden(model, enc)  # [0] embeddings, [l] after layer l
    seen = []

    def client(out):
        seen.append((out.layer, out.rows.tolist()))
        expected = full[out.layer][out.rows]
        torch.testing.assert_close(out.hidden, expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.before, full[out.layer - 1][out.rows][:, -1])
        if out.layer in (1, 2):
            return out.rows != out.layer - 1
        return None

    with torch.inference_mode():
        LayerStepper(parts).run(enc, client, until=3, use_cache=False)
    assert seen == [(1, [0, 1, 2]), (2, [1, 2]), (3, [2])]


def test_the_forward_ends_when_no_row_is_left():
    model, enc, parts = _setup("llama")
    layers = []

    def client(out):
        layers.append(out.layer)
        return torch.zeros(len(out.rows), dtype=torch.bool)

    with torch.inference_mode():
        LayerStepper(parts).run(enc, client, use_cache=False)
    assert layers == [1]


def test_an_unknown_per_row_argument_is_an_error_not_a_guess():
    model, enc, parts = _setup("llama")

    def client(out):
        return out.rows != 0  # a row leaves: from now on per-row arguments must be cut

    with torch.inference_mode(), pytest.raises(UnknownRowArgument, match="row_weights"):
        LayerStepper(parts).run(enc, client, use_cache=False, row_weights=torch.ones(3, 5))


def test_taps_record_the_last_position_of_sub_modules():
    model, enc, parts = _setup("opt")  # OPT's MLP output is flattened to [B*S, H]
    shapes = []

    def client(out):
        shapes.append({k: tuple(v.shape) for k, v in out.taps.items()})
        return out.rows != 0 if out.layer == 1 else None

    with torch.inference_mode():
        LayerStepper(parts, taps=("attn", "mlp")).run(enc, client, use_cache=False)
    assert shapes[0] == {"attn": (3, 32), "mlp": (3, 32)}
    assert shapes[1] == {"attn": (2, 32), "mlp": (2, 32)}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_a_kv_cache_is_cut_to_the_rows_still_going(arch):
    """Row 0 leaves after layer 2: layers 1-2 cache every row as a plain forward does; deeper
    layers cache the other rows exactly and leave zeros (a hole) for row 0."""
    model, enc, parts = _setup(arch)
    with torch.inference_mode():
        plain = DynamicCache(config=model.config)
        model(**enc, use_cache=True, cache=plain)
        cache = DynamicCache(config=model.config)
        leave = lambda out: out.rows != 0 if out.layer == 2 else None  # noqa: E731
        LayerStepper(parts).run(enc, leave, use_cache=True, cache=cache)
    for i, (ours, theirs) in enumerate(zip(cache.layers, plain.layers)):
        for a, b in ((ours.keys, theirs.keys), (ours.values, theirs.values)):
            torch.testing.assert_close(a[1:], b[1:], rtol=1e-4, atol=1e-5)
            if i < 2:
                torch.testing.assert_close(a[0], b[0], rtol=1e-4, atol=1e-5)
            else:
                assert not a[0].any()


@pytest.mark.parametrize("arch", ARCHS)
def test_the_lens_reads_the_head_three_ways(arch):
    """Exact logits at the last layer equal the model's own; a shortlist equals the exact
    logits at its ids; bf16 is close, also on OPT-350m (project_out) and with soft-capping
    or logit scaling (applied in fp32 there)."""
    model, enc, parts = _setup(arch)
    lens, captured = LogitLens(parts), {}

    def client(out):
        captured["last"] = out.hidden[:, -1]  # before the final norm, which the lens applies

    with torch.inference_mode():
        own = model(**enc, use_cache=False).logits[:, -1]
        LayerStepper(parts).run(enc, client, use_cache=False)
        logits = lens(captured["last"])
        ids = torch.randint(lens.vocab_size, (len(PROMPTS), 5))
        shortlist = lens(captured["last"], ids=ids)
        cheap = lens(captured["last"], dtype=torch.bfloat16)
    torch.testing.assert_close(logits, own, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(shortlist, logits.gather(1, ids))
    finishes = bool(parts.softcap) or parts.logit_scale != 1
    assert cheap.dtype == (torch.float32 if finishes else torch.bfloat16)
    torch.testing.assert_close(cheap.float(), logits, rtol=0.05, atol=0.05)
