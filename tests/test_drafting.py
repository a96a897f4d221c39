"""Draft vocabulary, confidence stopping and the draft planner: drafting cheaper never changes
greedy output, sampling keeps the model's distribution, and the planner drafts only where its
measured costs say drafting pays."""

from __future__ import annotations

import pytest
import torch

from adainfer.generation import SelfSpeculativeDecoder
from conftest import ARCHS
from test_generation import PROMPTS, _model, _plain_greedy

# a shortlist of about half the tiny vocabulary: most characters of the prompts are not in it
SHORTLIST = list(range(0, 98, 2))


def _recording(decoder):
    """Wrap the decoder's draft reads; returns the list every drafted token lands in."""
    seen, draft_token = [], decoder._draft_token

    def record(rows, hidden):
        token, q, sure = draft_token(rows, hidden)
        seen.append((token.clone(), None if rows.extra is None else rows.extra.clone()))
        return token, q, sure

    decoder._draft_token = record
    return seen


@pytest.mark.parametrize("arch", ARCHS)
def test_draft_vocabulary_and_confidence_keep_greedy_output(arch):
    model, tok = _model(arch)
    prompts = PROMPTS[:4]
    expected = _plain_greedy(model, tok, prompts, 12)
    settings = [
        dict(draft_layer=3, draft_tokens=4, draft_vocab=SHORTLIST),
        dict(draft_layer=2, draft_tokens=3, draft_vocab=SHORTLIST, draft_prompt_tokens=True),
        dict(draft_layer=5, draft_tokens=4, draft_confidence=0.3),
        dict(draft_layer=4, draft_tokens=4, draft_vocab=SHORTLIST[:10], draft_confidence=0.5),
    ]
    for s in settings:
        decoder = SelfSpeculativeDecoder(model, tok, **s)
        seen = _recording(decoder)
        result = decoder.generate(prompts, max_new_tokens=12, eos_token_id=[])
        assert result.tokens == expected, s
        assert (result.accepted <= result.drafted).all()
        if s.get("draft_vocab") is not None:  # every draft came from the row's shortlist
            for token, extra in seen:
                allowed = (
                    [set(s["draft_vocab"]) | set(e.tolist()) for e in extra]
                    if (extra is not None)
                    else [set(s["draft_vocab"])] * len(token)
                )
                assert all(t in a for t, a in zip(token.tolist(), allowed))


def test_prompt_tokens_join_each_rows_shortlist():
    model, tok = _model("llama")
    decoder = SelfSpeculativeDecoder(
        model, tok, draft_layer=3, draft_vocab=[5, 6], draft_prompt_tokens=True
    )
    enc = tok(["ab", "xyz5"], return_tensors="pt", padding=True, padding_side="left")
    extra, valid = decoder.draft_head.extra_ids(enc["input_ids"], enc["attention_mask"])
    rows = [set(e[v].tolist()) for e, v in zip(extra, valid)]
    assert rows == [set(tok("ab")["input_ids"]), set(tok("xyz5")["input_ids"]) - {5, 6}]
    assert tok.pad_token_id not in rows[0]  # the padding of the shorter row is not a candidate


@pytest.mark.parametrize("batch", [1, 8])
def test_cheaper_drafts_with_a_row_stopping_early_at_eos(batch):
    model, tok = _model("llama")
    prompts = PROMPTS[:batch]
    free = _plain_greedy(model, tok, prompts, 24)
    row, at = next(
        (r, i) for r in range(batch) for i in range(2, 24) if free[r][i] not in free[r][:i]
    )
    expected = _plain_greedy(model, tok, prompts, 24, eos=free[row][at])
    assert len(expected[row]) == at + 1 < 24
    decoder = SelfSpeculativeDecoder(
        model,
        tok,
        draft_layer=4,
        draft_tokens=3,
        draft_vocab=SHORTLIST,
        draft_prompt_tokens=True,
        draft_confidence=0.2,
    )
    result = decoder.generate(prompts, max_new_tokens=24, eos_token_id=free[row][at])
    assert result.tokens == expected


def test_confidence_one_stops_every_round_after_one_draft():
    """No draft is certain: every round drafts one token and verifies it (batch 1)."""
    model, tok = _model("llama")
    decoder = SelfSpeculativeDecoder(model, tok, draft_layer=3, draft_tokens=4, draft_confidence=1)
    result = decoder.generate(PROMPTS[:1], max_new_tokens=12, eos_token_id=[])
    assert result.tokens == _plain_greedy(model, tok, PROMPTS[:1], 12)
    assert result.drafted.sum() == result.rounds
    free = SelfSpeculativeDecoder(model, tok, draft_layer=3, draft_tokens=4)
    assert free.generate(PROMPTS[:1], max_new_tokens=12, eos_token_id=[]).drafted.sum() > (
        result.rounds
    )


def test_bad_draft_vocabularies_are_clear_errors():
    model, tok = _model("llama")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        SelfSpeculativeDecoder(model, tok, draft_layer=2, draft_vocab=[1, 10_000])
    with pytest.raises(ValueError, match="give draft_vocab too"):
        SelfSpeculativeDecoder(model, tok, draft_layer=2, draft_prompt_tokens=True)
    with pytest.raises(ValueError, match="draft_confidence"):
        SelfSpeculativeDecoder(model, tok, draft_layer=2, draft_confidence=1.5)


def test_sampling_with_a_shortlist_keeps_the_model_distribution():
    """3000 rows sample two tokens at temperature 0.5; the second is drafted from layer 2 over
    a shortlist (zero probability outside it) and accepted or resampled: its frequencies fit
    the full model's own marginal (chi-square), not the shortlist draft's."""
    from scipy.stats import chisquare

    from adainfer.generation import Chooser

    model, tok = _model("llama")
    n, temperature = 3000, 0.5
    chooser = Chooser(
        do_sample=True, temperature=temperature, generator=torch.Generator().manual_seed(0)
    )
    decoder = SelfSpeculativeDecoder(
        model, tok, draft_layer=2, draft_tokens=1, draft_vocab=SHORTLIST, draft_confidence=0.1
    )
    result = decoder.generate(["hello"] * n, max_new_tokens=2, eos_token_id=[], chooser=chooser)
    assert result.drafted.sum() == n
    second = torch.tensor([row[1] for row in result.tokens])

    ids = tok(["hello"], return_tensors="pt")["input_ids"]
    V = model.config.vocab_size
    with torch.inference_mode():
        first = (model(ids).logits[0, -1] / temperature).softmax(-1)
        both = torch.cat([ids.repeat(V, 1), torch.arange(V)[:, None]], 1)
        out = model(both, output_hidden_states=True)
        full = (out.logits[:, -1] / temperature).softmax(-1)
        early = decoder.draft_head.logits(out.hidden_states[2][:, -1])
        draft = torch.zeros(V, V).index_copy(
            1, torch.tensor(SHORTLIST), (early / temperature).softmax(-1)
        )
    expected = (first[:, None] * full).sum(0) * n
    drafted = (first[:, None] * draft).sum(0) * n
    counts = torch.bincount(second, minlength=V).double()
    off_list = torch.ones(V, dtype=torch.bool)
    off_list[SHORTLIST] = False
    assert counts[off_list].sum() > 0.05 * n  # tokens outside the shortlist still come out
    big = expected >= 5
    observed, fit = counts[big], expected[big].double()
    if not big.all():
        observed = torch.cat([observed, counts[~big].sum()[None]])
        fit = torch.cat([fit, expected[~big].sum()[None].double()])
    scaled = fit.numpy() * observed.sum().item() / fit.sum().item()
    assert chisquare(observed.numpy(), scaled).pvalue > 1e-3
    tv_model = (counts / n - expected / n).abs().sum() / 2
    tv_draft = (counts / n - drafted / n).abs().sum() / 2
    assert tv_model < tv_draft
