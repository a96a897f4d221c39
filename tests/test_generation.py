"""Generation: lossless self-speculative decoding gives the plain model's greedy tokens."""

from __future__ import annotations

import pytest
import torch
import transformers

from adainfer.generation import SelfSpeculativeDecoder, generate
from conftest import ARCHS, _config, char_tokenizer, tiny_model

PROMPTS = [
    "Q: apple\nA: Apple\n\nQ: river\nA:",
    "hello",
    "a much longer prompt, with words and more words",
    "xy",
    "The cat sat on",
    "1, 2, 3,",
    "def f(x):",
    "Q: stone\nA:",
]


def _model(arch: str, layers: int = 6):
    if arch != "gemma3":
        return tiny_model(arch, layers=layers)
    config = _config("gemma3", layers)
    config.sliding_window = 256  # the conftest window (8) is full before a draft can roll back
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval(), char_tokenizer()


def _plain_greedy(model, tok, prompts, max_new_tokens, eos=None):
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.inference_mode():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=eos,
        )
    rows = out[:, enc["input_ids"].shape[1] :].tolist()
    if eos is None:
        return rows
    return [row[: row.index(eos) + 1] if eos in row else row for row in rows]


def _eos_stopping_a_row(model, tok, prompts, max_new_tokens):
    """(an EOS token, the plain model's greedy rows with it): a token some row first makes at
    its 3rd step or later, so that row stops there, early (others may too)."""
    free = _plain_greedy(model, tok, prompts, max_new_tokens)
    row, at = next(
        (r, i)
        for r in range(len(prompts))
        for i in range(2, max_new_tokens)
        if free[r][i] not in free[r][:i]
    )
    expected = _plain_greedy(model, tok, prompts, max_new_tokens, eos=free[row][at])
    assert len(expected[row]) == at + 1 < max_new_tokens
    return free[row][at], expected


def _fresh_row(model, tok, max_new_tokens) -> int:
    """The first of PROMPTS whose greedy row makes a new token at its 3rd step or later."""
    free = _plain_greedy(model, tok, PROMPTS, max_new_tokens)
    return next(
        r for r, row in enumerate(free) if any(row[i] not in row[:i] for i in range(2, len(row)))
    )


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("arch", ARCHS)
def test_lossless_equals_plain_greedy_on_every_architecture(arch, batch):
    """Batch 1, and 8 prompts of different lengths, a row stopping early at EOS."""
    model, tok = _model(arch)
    # batch 1: the first prompt whose row does not repeat one token (tiny random models may)
    prompts = PROMPTS[:batch] if batch > 1 else [PROMPTS[_fresh_row(model, tok, 12)]]
    eos, expected = _eos_stopping_a_row(model, tok, prompts, 12)
    for draft_layer, draft_tokens in [(None, 4), (1, 2), (3, 4), (5, 3)]:
        decoder = SelfSpeculativeDecoder(
            model, tok, draft_layer=draft_layer, draft_tokens=draft_tokens
        )
        result = decoder.generate(prompts, max_new_tokens=12, eos_token_id=eos)
        assert result.tokens == expected, (draft_layer, draft_tokens)
        if draft_layer is not None:
            assert 0 <= result.acceptance <= 1
            assert (result.accepted <= result.drafted).all()


@pytest.mark.parametrize("batch", [1, 8])
def test_batches_with_a_row_stopping_early_at_eos(batch):
    model, tok = _model("llama")
    prompts = PROMPTS[:batch]
    eos, expected = _eos_stopping_a_row(model, tok, prompts, 24)
    streamed = {i: [] for i in range(batch)}
    result = SelfSpeculativeDecoder(model, tok, draft_layer=4, draft_tokens=3).generate(
        prompts,
        max_new_tokens=24,
        eos_token_id=eos,
        on_tokens=lambda row, tokens: streamed[row].extend(tokens),
    )
    assert result.tokens == expected
    assert [streamed[i] for i in range(batch)] == expected
    assert result.texts == tok.batch_decode(expected, skip_special_tokens=True)


def test_bad_settings_are_clear_errors():
    model, tok = _model("llama")
    with pytest.raises(ValueError, match="draft_layer must be between 1 and 5"):
        SelfSpeculativeDecoder(model, tok, draft_layer=6)
    with pytest.raises(ValueError, match="draft_tokens"):
        SelfSpeculativeDecoder(model, tok, draft_layer=2, draft_tokens=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SelfSpeculativeDecoder(model, tok).generate(["hi"], max_new_tokens=0)
    # 0 is a value, not "unset": each reaches its own check rather than a default
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        generate(model, tok, ["hi"], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature must be above 0 when sampling, got 0"):
        generate(model, tok, ["hi"], do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(model, tok, ["hi"], top_p=0)
    with pytest.raises(TypeError, match="list of strings"):
        SelfSpeculativeDecoder(model, tok).generate("hi")
    with pytest.raises(ValueError, match="no prompts"):
        SelfSpeculativeDecoder(model, tok).generate([])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        SelfSpeculativeDecoder(model, tok).generate(["hi", ""])
    gemma, gtok = tiny_model("gemma3")  # sliding window of 8
    with pytest.raises(ValueError, match="sliding window of 8"):
        SelfSpeculativeDecoder(gemma, gtok, draft_layer=2).generate(["hello"], max_new_tokens=8)


def test_a_plan_decodes_plainly_where_a_sliding_window_blocks_drafting():
    """An explicit draft layer is refused; a plan's is advice: a batch whose prompt and new
    tokens would fill the window is decoded plainly, one that fits still drafts."""
    from adainfer.drafting import DraftPlan

    gemma, tok = tiny_model("gemma3")  # sliding window of 8
    plan = DraftPlan(draft_layer=2, draft_tokens=2)
    blocked = generate(gemma, tok, ["hello"], plan=plan, max_new_tokens=8, eos_token_id=[])
    assert blocked.draft_layer is None and blocked.drafted.sum() == 0
    assert blocked.tokens == generate(gemma, tok, ["hello"], max_new_tokens=8).tokens
    fits = generate(gemma, tok, ["hi"], plan=plan, max_new_tokens=2, eos_token_id=[])
    assert fits.draft_layer == 2 and fits.drafted.sum() > 0


def second_token_fit(model, tok, prompt: str, second: torch.Tensor, temperature: float):
    """(chi-square p-value of the sampled second tokens against the full model's own marginal
    p(t1) = sum over t0 of p(t0) p(t1 | t0), expected counts [V], hidden states of every
    (prompt, t0) for a draft's marginal)."""
    from scipy.stats import chisquare

    n, V = len(second), model.config.vocab_size
    ids = tok([prompt], return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        first = (model(ids).logits[0, -1] / temperature).softmax(-1)  # p(t0)
        both = torch.cat([ids.repeat(V, 1), torch.arange(V)[:, None]], 1)
        out = model(both, output_hidden_states=True)
        full = (out.logits[:, -1] / temperature).softmax(-1)  # p(t1 | t0), every t0
    expected = (first[:, None] * full).sum(0) * n
    counts = torch.bincount(second, minlength=V).double()
    big = expected >= 5  # chi-square needs expected counts of 5 or more: pool the rest
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    fit = torch.cat([expected[big], expected[~big].sum()[None]]).double()
    p = chisquare(observed.numpy(), fit.numpy() * n / fit.sum().item()).pvalue
    return p, expected, (first, out.hidden_states)


def test_speculative_sampling_keeps_the_model_distribution():
    """3000 rows sample two tokens at temperature 0.1; the second is drafted from layer 2 and
    accepted or resampled: its frequencies fit the full model's own marginal (chi-square), and
    not the draft's."""
    from adainfer.generation import Chooser
    from adainfer.lens import LogitLens

    model, tok = _model("llama")
    n, temperature = 3000, 0.1
    chooser = Chooser(
        do_sample=True, temperature=temperature, generator=torch.Generator().manual_seed(0)
    )
    decoder = SelfSpeculativeDecoder(model, tok, draft_layer=2, draft_tokens=1)
    result = decoder.generate(["hello"] * n, max_new_tokens=2, eos_token_id=[], chooser=chooser)
    assert result.drafted.sum() == n
    second = torch.tensor([row[1] for row in result.tokens])
    p, expected, (first, hidden) = second_token_fit(model, tok, "hello", second, temperature)
    assert p > 1e-3
    with torch.inference_mode():
        draft = (LogitLens(decoder.parts)(hidden[2][:, -1]) / temperature).softmax(-1)
    drafted = (first[:, None] * draft).sum(0) * n
    counts = torch.bincount(second, minlength=model.config.vocab_size).double()
    tv_model = (counts / n - expected / n).abs().sum() / 2
    tv_draft = (counts / n - drafted / n).abs().sum() / 2
    assert tv_model < tv_draft


def test_generate_takes_generation_config_settings_and_stop_strings():
    from transformers import GenerationConfig

    import adainfer

    model, tok = _model("llama")
    plain = adainfer.generate(model, tok, PROMPTS[:2], max_new_tokens=12, eos_token_id=[])
    stop = plain.texts[0][4:6]  # a string the first row makes after a few tokens
    result = adainfer.generate(
        model,
        tok,
        PROMPTS[:2],
        draft_layer=3,
        stop_strings=[stop],
        max_new_tokens=12,
        eos_token_id=[],
    )
    assert result.texts[0] == plain.texts[0][: plain.texts[0].find(stop)]
    assert len(result.tokens[0]) < 12
    config = GenerationConfig(max_new_tokens=5, do_sample=False)
    assert adainfer.generate(model, tok, ["hi"], generation_config=config).tokens[0] == (
        plain_first := adainfer.generate(model, tok, ["hi"], max_new_tokens=5).tokens[0]
    )
    assert len(plain_first) <= 5
    with pytest.raises(ValueError, match="num_beams"):
        adainfer.generate(model, tok, ["hi"], generation_config=GenerationConfig(num_beams=2))
    with pytest.raises(ValueError, match="repetition_penalty"):
        adainfer.generate(model, tok, ["hi"], repetition_penalty=1.2)


@pytest.mark.parametrize("draft_layer", [None, 3])
def test_the_streamed_text_is_the_result_text_cut_before_a_stop_string(draft_layer):
    from adainfer.generation import TextStream

    model, tok = _model("llama")
    plain = generate(model, tok, PROMPTS[:1], max_new_tokens=16, eos_token_id=[])
    full = plain.texts[0]
    for stop in (full[6:9], full[-2:] + "never made"):  # a stop reached; one only begun
        pieces = []
        stream = TextStream(tok, [stop], write=pieces.append)
        result = generate(
            model,
            tok,
            PROMPTS[:1],
            draft_layer=draft_layer,
            stop_strings=[stop],
            max_new_tokens=16,
            eos_token_id=[],
            on_tokens=stream,
        )
        before = "".join(pieces)
        if stop in full:
            assert before == result.texts[0]  # up to the stop, and nothing past it
        else:  # the row ended on the stop's first characters: held back until the end
            assert result.texts[0] == full and before == full[:-2]
        stream.end()
        assert "".join(pieces) == result.texts[0]
        assert len(pieces) > 1  # it streamed


def test_the_stream_goes_on_when_a_later_decode_rewrites_written_text():
    """A tokenizer's space clean-up can turn 'a ' into 'a.' once '.' comes: what was written
    stays, and the stream keeps up rather than stalling."""
    from adainfer.generation import TextStream

    class Tokenizer:
        texts = {1: "a ", 2: "a.", 3: "a. b"}

        def decode(self, tokens, skip_special_tokens=True):
            return self.texts[len(tokens)]

    pieces = []
    stream = TextStream(Tokenizer(), write=pieces.append)
    for t in (1, 2, 3):
        stream(0, [t])
    stream.end()
    assert "".join(pieces) == "a  b" and len("".join(pieces)) == len("a. b")
