"""The engine: exactness against plain Hugging Face, per-row exits, batching, bad input."""

import numpy as np
import pytest
import torch

from adainfer import AdaptiveEngine
from adainfer.features import ALL_FEATURES
from adainfer.policies import ExitPolicy, GapThreshold, NeverExit
from adainfer.prefill import plain_last_logits
from conftest import tiny_model

PROMPTS = ["Q: hello\nA:", "Q: a much longer prompt here\nA:", "x", "Q: mid size one\nA:"]


class ExitAt(ExitPolicy):
    """Test policy: row i stops at layer targets[i] (a known, different layer per row)."""

    trainable = False

    def __init__(self, targets):
        self.targets = targets

    def decide(self, step):
        return np.array([step.layer >= self.targets[r] for r in step.rows])


def test_never_exit_equals_plain_hf_logits(tiny):
    model, tok = tiny
    engine = AdaptiveEngine(model, tok)
    result = engine.run(PROMPTS, NeverExit(features=ALL_FEATURES))
    assert (result.exit_layer == engine.num_layers).all()
    assert result.num_checks.tolist() == [0] * len(PROMPTS)  # never-exit pays for no check
    torch.testing.assert_close(
        result.logits, plain_last_logits(engine, PROMPTS), rtol=1e-5, atol=1e-5
    )
    assert (result.top1 == plain_last_logits(engine, PROMPTS).argmax(-1).numpy()).all()


def test_checks_decode_with_the_models_own_head(tiny):
    # a gap of 2 is never reached: every layer is checked and the last one decodes through the
    # logit lens, which must apply whatever the model's forward does (softcap, logit scaling)
    model, tok = tiny
    engine = AdaptiveEngine(model, tok)
    result = engine.run(PROMPTS, GapThreshold(threshold=2.0))
    assert (result.exit_layer == engine.num_layers).all() and (
        result.num_checks == engine.num_layers - 1
    ).all()
    torch.testing.assert_close(
        result.logits, plain_last_logits(engine, PROMPTS), rtol=1e-4, atol=1e-5
    )


def test_rows_exiting_at_different_layers_match_batch_size_one(tiny):
    model, tok = tiny
    engine = AdaptiveEngine(model, tok)
    targets = [1, 3, 2, 4]
    policy = ExitAt(targets)
    batch = engine.run(PROMPTS, policy, features=ALL_FEATURES)
    assert batch.exit_layer.tolist() == targets
    for i, prompt in enumerate(PROMPTS):
        alone = engine.run([prompt], ExitAt([targets[i]]), features=ALL_FEATURES)
        assert alone.exit_layer[0] == batch.exit_layer[i]
        assert alone.top1[0] == batch.top1[i]
        torch.testing.assert_close(alone.logits[0], batch.logits[i], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(alone.features[0], batch.features[i], rtol=1e-4, atol=1e-5)


def test_exited_rows_leave_the_batch():
    model, tok = tiny_model("llama", layers=4)
    engine = AdaptiveEngine(model, tok)
    seen = []
    handle = engine.parts.layers[2].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].shape[0])
    )
    try:
        result = engine.run(PROMPTS, ExitAt([1, 3, 1, 4]))
    finally:
        handle.remove()
    assert seen == [2]  # layer 3 ran on the two rows still active, not on four masked rows
    assert result.num_checks.tolist() == [1, 3, 1, 3]


def test_no_layer_runs_after_every_row_stopped():
    model, tok = tiny_model("qwen2", layers=4)
    engine = AdaptiveEngine(model, tok)
    calls = []
    handles = [
        layer.register_forward_hook(lambda *a: calls.append(1)) for layer in engine.parts.layers
    ]
    try:
        engine.run(PROMPTS, ExitAt([2, 2, 2, 2]))
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 2


def test_gap_policy_exit_layer_matches_hand_computed_trace(tiny):
    engine = AdaptiveEngine(*tiny)
    prompts = PROMPTS[:3]
    trace = engine.run(prompts, NeverExit(), features=("gap",), check_layers=range(1, 5))
    gaps = trace.features[:, :, 0]
    # a threshold between two rows' highest gaps (not on one: a gap recomputed in a smaller
    # batch may differ in the last bit): at least one row exits before the end
    top = np.sort(gaps[:, :-1].max(1))
    threshold = float(top[len(prompts) // 2 - 1] + top[len(prompts) // 2]) / 2
    expected = []
    for row in gaps:
        hit = np.flatnonzero(row >= threshold)
        expected.append(int(hit[0]) + 1 if len(hit) else 4)
    result = engine.run(prompts, GapThreshold(threshold))
    assert result.exit_layer.tolist() == expected
    assert min(expected) < 4


def test_min_layer_and_stride_limit_checks():
    model, tok = tiny_model("llama", layers=6)
    engine = AdaptiveEngine(model, tok, min_layer=2, stride=2)
    assert engine.layers_to_check() == (2, 4, 6)
    result = engine.run(PROMPTS, GapThreshold(2.0))  # gap never reaches 2: checks only
    assert result.num_checks.tolist() == [2] * len(PROMPTS)  # layers 2 and 4; 6 is the final head
    checked = ~np.isnan(result.features[0, :, 0])
    assert np.flatnonzero(checked).tolist() == [1, 3, 5]


def test_token_id_prompts_run_as_their_text():
    model, tok = tiny_model("gpt2")
    engine = AdaptiveEngine(model, tok)
    ids = [tok(p)["input_ids"] for p in PROMPTS]
    policy = GapThreshold(0.0025)  # stops two rows at layer 1: the exit layers must agree too
    text, tokens = engine.run(PROMPTS, policy), engine.run(ids, policy)
    assert tokens.exit_layer.tolist() == text.exit_layer.tolist() == [1, 1, 4, 4]
    assert tokens.top1.tolist() == text.top1.tolist()
    torch.testing.assert_close(tokens.logits, text.logits)
    with pytest.raises(TypeError, match="not a mix"):
        engine.run([PROMPTS[0], ids[1]], policy)


@pytest.mark.parametrize("bad", [[""], ["ok", "   "], [[]]])
def test_empty_prompt_is_a_clear_error(bad):
    engine = AdaptiveEngine(*tiny_model("llama"))
    with pytest.raises(ValueError, match="empty"):
        engine.run(bad, NeverExit())


@pytest.mark.parametrize(
    "make, run, error, message",
    [
        (dict(min_layer=0), {}, ValueError, "min_layer and stride must be >= 1"),
        (dict(stride=0), {}, ValueError, "min_layer and stride must be >= 1"),
        ({}, dict(check_layers=[0, 2]), ValueError, r"check layers \[0\] outside 1..4"),
        ({}, dict(prompts="one string"), TypeError, "list of strings"),
        (
            {},
            dict(features=("gap",), policy=NeverExit(features=("entropy",))),
            ValueError,
            r"needs features \['entropy'\]",
        ),
        ({}, dict(gold=[1]), ValueError, "got 1 gold tokens for 4 prompts"),
    ],
)
def test_bad_engine_arguments_say_what_to_fix(make, run, error, message):
    run = dict(run)
    with pytest.raises(error, match=message):
        engine = AdaptiveEngine(*tiny_model("llama"), **make)
        engine.run(run.pop("prompts", PROMPTS), run.pop("policy", NeverExit()), **run)


def test_prompt_longer_than_context_is_a_clear_error():
    engine = AdaptiveEngine(*tiny_model("llama"))
    with pytest.raises(ValueError, match="context is 256"):
        engine.run(["x" * 300], NeverExit())


def test_unsupported_architecture_names_the_supported_ones():
    from adainfer.arch import UnsupportedModel

    model, tok = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(UnsupportedModel, match="gpt_neox"):
        AdaptiveEngine(model, tok)


def test_run_all_keeps_input_order_across_batches():
    engine = AdaptiveEngine(*tiny_model("gpt2"))
    prompts = PROMPTS * 3
    whole = engine.run_all(prompts, NeverExit(), batch_size=5)
    single = engine.run(prompts, NeverExit())
    assert whole.top1.tolist() == single.top1.tolist()
    torch.testing.assert_close(whole.logits, single.logits, rtol=1e-4, atol=1e-5)


def test_choice_restricted_answer_is_the_best_choice_token():
    model, tok = tiny_model("llama", layers=4)
    engine = AdaptiveEngine(model, tok)
    choices = [[5, 9, 17], [30, 31], [5, 9, 17], [40, 41, 42, 43]]
    r = engine.run(PROMPTS, ExitAt([2, 4, 1, 3]), choices=choices)
    logits = engine.run(PROMPTS, ExitAt([2, 4, 1, 3])).logits
    for i, c in enumerate(choices):
        assert r.choice_top1[i] == c[int(logits[i, c].argmax())]
    assert (r.layer_choice[2, 1:] == -1).all()  # row 2 stopped at layer 1


def test_rows_without_choices_mix_with_choice_rows():
    engine = AdaptiveEngine(*tiny_model("llama", layers=4))
    r = engine.run(PROMPTS, NeverExit(), choices=[[5, 9], [], [7], []], check_layers=[1, 2, 3, 4])
    assert (r.layer_choice[1] == -1).all() and (r.layer_choice[3] == -1).all()
    assert (r.layer_choice[2] == 7).all() and set(r.layer_choice[0]) <= {5, 9}


def test_run_all_keeps_choices_when_a_batch_has_none():
    engine = AdaptiveEngine(*tiny_model("llama", layers=4))
    choices = [
        np.array([5, 9]),
        np.array([7]),
        np.array([], dtype=int),
        [],
    ]  # arrays work as well as lists
    whole = engine.run_all(
        PROMPTS, NeverExit(), choices=choices, batch_size=2
    )  # the 2nd batch has no choice row
    assert whole.layer_choice is not None and (whole.layer_choice[2:] == -1).all()
    assert (
        whole.choice_top1[:2].tolist()
        == engine.run(PROMPTS[:2], NeverExit(), choices=choices[:2]).choice_top1.tolist()
    )


def test_features_are_the_same_whatever_the_chunk_of_rows():
    from adainfer import features

    logits = torch.randn(19, 3000, generator=torch.Generator().manual_seed(0)) * 4
    names = ("gap", "top_prob", "entropy", "layer_frac")
    whole, top1 = features.compute(logits, names, 3, 12, chunk_rows=64)
    chunked, top1_chunked = features.compute(logits, names, 3, 12, chunk_rows=4)
    logp = logits.log_softmax(-1)
    assert torch.equal(top1, top1_chunked) and torch.allclose(whole, chunked)
    assert torch.allclose(chunked[:, 2], -(logp.exp() * logp).sum(-1), atol=1e-4)
    p = logp.exp().sort(-1, descending=True).values
    assert torch.allclose(chunked[:, 0], p[:, 0] - p[:, 1], atol=1e-6) and torch.allclose(
        chunked[:, 1], p[:, 0], atol=1e-6
    )
    assert (chunked[:, 3] == 3 / 12).all()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hidden_state_cosine_is_the_models_own_layer_to_layer_similarity(arch):
    model, tok = tiny_model(arch, layers=4)
    engine = AdaptiveEngine(model, tok)
    r = engine.run(PROMPTS[:1], NeverExit(features=("cos_hidden",)), check_layers=[1, 2, 3, 4])
    with torch.no_grad():  # hidden_states[l] is the output of layer l, [0] the embeddings
        hs = model(**engine.encode(PROMPTS[:1]), output_hidden_states=True).hidden_states
    expected = [
        float(torch.cosine_similarity(hs[l][0, -1], hs[l - 1][0, -1], dim=0)) for l in (1, 2, 3)
    ]
    np.testing.assert_allclose(
        r.features[0, :3, 0], expected, rtol=1e-4, atol=1e-5
    )  # the last one is after the final norm in HF
