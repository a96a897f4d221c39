"""Lossy generation: tokens leave at their own layer, skipped layers' keys and values filled
from the exit state, thresholds calibrated to a risk."""

import dataclasses
import json

import numpy as np
import pytest
import torch

import adainfer
from adainfer.arch import UnsupportedModel, find_parts
from adainfer.generation import Chooser, SelfSpeculativeDecoder
from adainfer.lossy import (
    EarlyExitDecoder,
    ExitCosts,
    ExitTrace,
    TokenExitPolicy,
    _decode_steps,
    frequent_tokens,
    read_exits,
    trace_exits,
)
from conftest import ARCHS, tiny_model

PROMPTS = ["hello world", "a", "the quick brown fox jumps"]
PROPAGATES = [a for a in ARCHS if not a.startswith("opt")]


def forced(model, layer: int, verdict: float = 20.0, vocab=None) -> TokenExitPolicy:
    """A fitted policy whose one probe always (verdict > 0) or never passes at `layer`."""
    policy = TokenExitPolicy()
    size = model.get_output_embeddings().weight.shape[0]
    policy.model_, policy.num_layers_ = "tiny", model.config.num_hidden_layers
    policy.vocab_ = np.arange(size) if vocab is None else np.asarray(vocab)
    policy.layers_, policy.coef_ = [layer], np.zeros((1, 3))
    policy.intercept_, policy.threshold_, policy.calibration_ = np.array([verdict]), 0.0, {}
    policy.costs_ = dataclasses.asdict(ExitCosts.layers_only(policy.num_layers_))
    return policy


def silence_above(model, layer: int) -> None:
    """Zero the attention output and MLP of every layer above `layer`: their hidden state is
    then layer `layer`'s, so the full model's keys and values there are the propagated ones."""
    parts = find_parts(model)
    for block in parts.layers[layer:]:
        attn = getattr(block, parts.spec.attn)
        outs = [getattr(attn, n, None) for n in ("o_proj", "c_proj", "dense", "out_proj")]
        for module in [m for m in outs if m is not None] + [getattr(block, parts.spec.mlp)]:
            for p in module.parameters():
                p.data.zero_()


def plain(model, tok, **kw):
    return SelfSpeculativeDecoder(model, tok).generate(PROMPTS, max_new_tokens=12, **kw).tokens


@pytest.mark.parametrize("arch", PROPAGATES)
def test_lossy_without_exits_is_plain_greedy(arch):
    model, tok = tiny_model(arch)
    never = EarlyExitDecoder(model, tok, forced(model, 2, -20.0))
    got = never.generate(PROMPTS, max_new_tokens=12)
    assert got.tokens == plain(model, tok)
    assert {e for row in got.exit_layers for e in row} == {model.config.num_hidden_layers}
    # a shortlist read of the whole vocabulary at the last layer is the full head
    at_last = EarlyExitDecoder(model, tok, forced(model, model.config.num_hidden_layers))
    assert at_last.generate(PROMPTS, max_new_tokens=12).tokens == plain(model, tok)


@pytest.mark.parametrize("arch", PROPAGATES)
def test_exit_tokens_and_propagated_states_match_a_model_without_upper_layers(arch):
    model, tok = tiny_model(arch)
    silence_above(model, 2)
    got = EarlyExitDecoder(model, tok, forced(model, 2)).generate(PROMPTS, max_new_tokens=12)
    assert got.tokens == plain(model, tok)
    assert all(row[0] == 4 and set(row[1:]) <= {2} for row in got.exit_layers)


def test_propagated_keys_and_values_are_the_skipped_layers_own():
    """Llama: after a token left at layer 2, layers 3 and 4 hold v_proj(norm(h2)) and keys of
    the same length per head as k_proj(norm(h2)) (rotary turns them, keeping their norm)."""
    model, tok = tiny_model("llama")
    decoder = EarlyExitDecoder(model, tok, forced(model, 2))
    decoder.chooser = Chooser()
    rows, first = decoder._prefill(["hello world"], 4)
    out = type("Out", (), {"add": lambda *a, **k: torch.tensor([True])})()
    with torch.inference_mode():
        decoder._advance(rows, out)
        ids = tok(["hello world"], return_tensors="pt")["input_ids"]
        seq = torch.cat([ids, first[:, None]], 1)
        h2 = model(seq, output_hidden_states=True).hidden_states[2][0, -1]
        for layer in (3, 4):
            block = model.model.layers[layer - 1]
            x = block.input_layernorm(h2)
            heads = model.config.num_key_value_heads
            v = block.self_attn.v_proj(x).view(heads, -1)
            k = block.self_attn.k_proj(x).view(heads, -1)
            cache = rows.cache.layers[layer - 1]
            torch.testing.assert_close(cache.values[0, :, -1], v)
            torch.testing.assert_close(cache.keys[0, :, -1].norm(dim=-1), k.norm(dim=-1))
            assert cache.keys.shape[-2] == seq.shape[1]


def test_architectures_without_a_way_to_propagate_are_refused():
    model, tok = tiny_model("opt")
    with pytest.raises(UnsupportedModel, match="lossless"):
        EarlyExitDecoder(model, tok, forced(model, 2))


def test_generate_with_exits_and_the_checks():
    model, tok = tiny_model("qwen2")
    got = adainfer.generate(model, tok, PROMPTS, exits=forced(model, 3), max_new_tokens=6)
    assert got.exit_layers is not None and got.mean_exit_layer < 4
    # every token after the prefill's first one read on the shortlist, none at a never-pass
    assert [row[0] for row in got.head_skips] == [False] * len(PROMPTS)
    assert all(all(row[1:]) for row in got.head_skips)
    never = adainfer.generate(model, tok, PROMPTS, exits=forced(model, 4, -20.0), max_new_tokens=6)
    assert not any(map(any, never.head_skips)) and never.mean_exit_layer == 4
    assert [len(r) for r in never.head_skips] == [len(r) for r in never.tokens]
    with pytest.raises(ValueError, match="not both"):
        adainfer.generate(model, tok, PROMPTS, exits=forced(model, 3), draft_layer=2)
    other, _ = tiny_model("qwen2", layers=6)
    with pytest.raises(ValueError, match="calibrate one for this model"):
        EarlyExitDecoder(other, tok, forced(model, 3))


def synthetic_trace(n=600, layers=6, seed=0) -> ExitTrace:
    """Tokens whose agreement at each layer follows the first feature (top probability)."""
    rng = np.random.default_rng(seed)
    depth = np.linspace(0.2, 0.95, layers)
    features = rng.uniform(0, 1, (n, layers, 3)) * depth[None, :, None]
    agree = rng.uniform(0, 1, (n, layers)) < features[..., 0] / depth[None]
    agree[:, -1] = True
    settled = layers - np.flip(np.cumprod(np.flip(agree, 1), 1), 1).sum(1) + 1
    return ExitTrace(np.arange(50), features, agree, settled, np.arange(n) % 20)


@pytest.mark.parametrize("risk", [0.01, 0.05, 0.2])
def test_threshold_holds_the_held_out_risk(risk):
    trace = synthetic_trace()
    policy = TokenExitPolicy(risk=risk, min_agreement=0.3, max_checks=6).fit_trace(trace)
    report = policy.calibration_
    assert report["changed_share"] <= risk
    assert report["tokens"] == int((trace.prompt % 4 == 3).sum())  # tested on a quarter
    loose = TokenExitPolicy(risk=0.3, min_agreement=0.3, max_checks=6).fit_trace(trace)
    assert loose.calibration_["mean_exit_layer"] <= report["mean_exit_layer"]
    assert policy.risk == risk and policy.max_checks == 6  # fit keeps the parameters
    if policy.layers_:  # accepted by Learn-then-Test: its p-value is within delta
        assert report["p_value"] <= policy.delta and report["accepted"] >= 1
    point = TokenExitPolicy(risk=risk, min_agreement=0.3, max_checks=6, delta=None)
    point.fit_trace(trace)
    assert point.calibration_["mean_exit_layer"] <= report["mean_exit_layer"]


def test_too_few_held_out_tokens_certify_nothing():
    """With n held-out tokens no plan passes at risk epsilon unless (1 - epsilon)^n <= delta."""
    from adainfer.risk import min_queries

    trace = synthetic_trace(n=200)
    held = int((trace.prompt % 2 == 1).sum())
    assert held < min_queries(0.01, 0.05)
    policy = TokenExitPolicy(risk=0.01, delta=0.05, min_agreement=0.3).fit_trace(trace)
    assert policy.layers_ == [] and policy.calibration_["accepted"] == 0


def test_files_from_before_learn_then_test_still_load(tmp_path):
    policy = TokenExitPolicy(risk=0.2, min_agreement=0.3).fit_trace(synthetic_trace())
    policy.save(tmp_path / "p.json")
    data = json.loads((tmp_path / "p.json").read_text())
    del data["params"]["delta"]
    data["params"]["confidence"] = 0.9
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = TokenExitPolicy.load(tmp_path / "old.json")
    assert old.delta == pytest.approx(0.1) and old.layers_ == policy.layers_
    assert "hidden_state" not in data["params"] and not old.hidden_state  # as files before it
    assert data["params"]["C"] == 1.0  # the C used, as earlier versions read it


def test_the_plan_weighs_measured_costs():
    trace = synthetic_trace()
    free = TokenExitPolicy(risk=0.2, min_agreement=0.3).fit_trace(trace)
    assert free.layers_ and free.calibration_["step_cost"] < 1
    dear = ExitCosts(layer=1 / 6, head=0.0, check=0.5, propagate=0.0)
    plain = TokenExitPolicy(risk=0.2, min_agreement=0.3).fit_trace(trace, dear)
    assert plain.layers_ == [] and plain.calibration_["step_cost"] == 1.0
    # a dear head and cheap checks: a check at the last layer pays by skipping the head
    head = ExitCosts(layer=0.5 / 6, head=0.5, check=0.01, propagate=0.0)
    skip = TokenExitPolicy(risk=0.2, min_agreement=0.3).fit_trace(trace, head)
    assert 6 in skip.layers_ and skip.calibration_["head_skipped_share"] > 0


def test_batched_costs_reduce_to_per_token_ones_when_every_part_is_per_row():
    N, L = 64, 6
    steps = _decode_steps(np.repeat(np.arange(8), 8), rows=4)
    assert len(np.unique(steps)) == 2 * 8  # 2 batches of 4 prompts, 8 tokens each
    # checks at layers 3 and 6: a token passing at 3 was checked once, the others twice
    depth = np.where(np.random.default_rng(0).random(N) < 0.5, 3, L)
    passed, checks = depth == 3, np.where(depth == 3, 1, 2)
    parts = dict(layer=0.1, head=0.3, check=0.02, propagate=0.01)
    expected = ExitCosts(**parts).step(depth, checks, passed, L).mean()
    got = ExitCosts(**parts, rows=4).step(depth, checks, passed, L, steps, at=[3, 6])
    assert got == pytest.approx(np.full(N, expected))


def test_at_batch_size_a_row_that_leaves_saves_only_the_per_row_share():
    L, parts = 6, dict(layer=0.1, head=0.4, check=0.0, propagate=0.0, rows=2)
    step = np.array([0, 0])  # one decode step of two rows

    def cost(fixed, depth):
        depth = np.asarray(depth)
        return ExitCosts(**parts, fixed=fixed).step(depth, 1, depth < L, L, step, [3])[0]

    weights = {"body": 1.0, "head": 1.0}  # every part's time is reading its weights
    assert cost(weights, [3, L]) == pytest.approx(1)  # the other row still runs them all
    assert cost(weights, [3, 3]) == pytest.approx(1 - 3 * 0.1 - 0.4)  # both left: no 4-6, head
    per_row = {"body": 0.0, "head": 0.0}
    assert cost(per_row, [3, L]) == pytest.approx(1 - (3 * 0.1 + 0.4) / 2)


def test_decode_steps_follow_prompts_and_positions():
    prompt = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    assert _decode_steps(prompt, 1).tolist() == [0, 1, 2, 4, 5, 8, 12, 13, 14, 15]
    assert _decode_steps(prompt, 2).tolist() == [0, 1, 2, 0, 1, 4, 4, 5, 6, 7]


def test_candidate_layers_follow_agreement():
    trace = synthetic_trace()
    policy = TokenExitPolicy(min_agreement=0.6, max_checks=2).fit_trace(trace)
    rates = trace.agree[trace.prompt % 2 == 0].mean(0)
    assert len(policy.layers_) <= 2 and all(rates[x - 1] >= 0.6 for x in policy.layers_)
    none = TokenExitPolicy(min_agreement=1.01).fit_trace(trace)
    assert none.layers_ == [] and none.calibration_["exited_share"] == 0
    every = TokenExitPolicy(risk=0.5, min_agreement=0.0, max_checks=10, delta=None)
    assert 1 not in every.fit_trace(trace).calibration_.get("layers", every.layers_)
    assert TokenExitPolicy(max_checks=0).fit_trace(trace).layers_ == []  # not all of them


def test_fit_on_a_tiny_model_and_round_trip(tmp_path):
    model, tok = tiny_model("llama")
    prompts = PROMPTS + ["abc", "zzz"]
    measured = TokenExitPolicy(risk=0.5, min_agreement=0.0, vocab_size=40, cost_batch_size=2)
    measured.fit(model, tok, prompts, max_new_tokens=8, batch_size=2)
    costs = measured.costs_
    assert costs["rows"] == 2 and set(costs["fixed"]) == {"body", "head", "check", "propagate"}
    assert all(0 <= f <= 1 for f in costs["fixed"].values())
    assert measured.calibration_["step_cost"] <= 1.0  # never planned slower than plain
    assert 0 < measured.calibration_["oracle_step_cost"] <= 1.0
    measured.save(tmp_path / "batched.json")
    assert TokenExitPolicy.load(tmp_path / "batched.json").costs_ == costs
    trace = trace_exits(model, tok, prompts, vocab_size=40, max_new_tokens=8, batch_size=2)
    policy = TokenExitPolicy(risk=0.5, min_agreement=0.0, vocab_size=40, delta=None)
    policy.fit_trace(trace)  # a few tokens certify nothing: the point estimate decides
    assert len(policy.vocab_) <= 40 and policy.layers_  # free checks: some layer pays
    path = tmp_path / "exits.json"
    policy.save(path)
    loaded = TokenExitPolicy.load(path)
    assert loaded.layers_ == policy.layers_ and loaded.threshold_ == policy.threshold_
    np.testing.assert_allclose(loaded.coef_, policy.coef_)
    np.testing.assert_array_equal(loaded.vocab_, policy.vocab_)
    a = adainfer.generate(model, tok, PROMPTS, exits=policy, max_new_tokens=8)
    b = adainfer.generate(model, tok, PROMPTS, exits=loaded, max_new_tokens=8)
    assert a.tokens == b.tokens and a.exit_layers == b.exit_layers


def test_probes_that_read_the_hidden_state(tmp_path):
    """hidden_state=True: the trace keeps the deepest layers' states, the probes read them
    next to the shortlist features, decode-time scores are the fit-time ones, and the policy
    survives a file."""
    model, tok = tiny_model("llama")
    L, H = model.config.num_hidden_layers, model.config.hidden_size
    prompts = PROMPTS + ["abc", "zzz"]
    trace = trace_exits(model, tok, prompts, vocab_size=40, max_new_tokens=8, hidden_layers=2)
    assert trace.hidden.shape == (len(trace.prompt), 2, H) and trace.hidden.dtype == np.float16
    with pytest.raises(ValueError, match="hidden_layers=3"):
        trace.hidden_at(L - 2)
    with pytest.raises(ValueError, match="hidden_layers=8"):
        TokenExitPolicy(hidden_state=True).fit_trace(dataclasses.replace(trace, hidden=None))
    policy = TokenExitPolicy(
        risk=0.5, min_agreement=0.0, vocab_size=40, delta=None, hidden_state=True
    ).fit_trace(trace)
    assert policy.layers_ and min(policy.layers_) >= L - 1  # only layers with kept states
    assert policy.coef_.shape == (len(policy.layers_), 3 + H)
    layer = policy.layers_[0]
    features = torch.as_tensor(trace.features[:, layer - 1])
    hidden = torch.as_tensor(trace.hidden_at(layer))
    at_decode = policy.decision_function(layer, features, hidden).numpy()
    np.testing.assert_allclose(at_decode, policy._scores(trace, [layer - 1])[:, 0], rtol=1e-4)
    with pytest.raises(ValueError, match="hidden state"):
        policy.decision_function(layer, features)
    # the decoder hands the probe the state of the layer it checks: the first decoded
    # token's (the prompt's second generated one) is the trace's, teacher-forced
    seen = []
    real = policy.decision_function
    policy.decision_function = lambda l, f, h=None: seen.append((l, h)) or real(l, f, h)
    adainfer.generate(model, tok, prompts[:1], exits=policy, max_new_tokens=2)
    del policy.decision_function
    first = trace_exits(model, tok, prompts[:1], vocab=policy.vocab_, hidden_layers=2)
    l0, h0 = seen[0]
    np.testing.assert_allclose(h0[0].numpy(), first.hidden_at(l0)[1], rtol=2e-3, atol=2e-3)
    policy.save(tmp_path / "hidden.json")
    loaded = TokenExitPolicy.load(tmp_path / "hidden.json")
    assert loaded.hidden_state and loaded.hidden_layers_ == L - min(policy.layers_) + 1
    np.testing.assert_allclose(loaded.coef_, policy.coef_)
    a = adainfer.generate(model, tok, PROMPTS, exits=policy, max_new_tokens=8)
    b = adainfer.generate(model, tok, PROMPTS, exits=loaded, max_new_tokens=8)
    assert a.tokens == b.tokens and a.exit_layers == b.exit_layers
    data = json.loads((tmp_path / "hidden.json").read_text())
    data["coef"] = [w[:3] for w in data["coef"]]
    with pytest.raises(ValueError, match="hidden state"):
        TokenExitPolicy.from_dict(data)
    # fit traces the states itself
    fitted = TokenExitPolicy(risk=0.5, min_agreement=0.0, vocab_size=40, hidden_state=True)
    fitted.fit(model, tok, prompts, max_new_tokens=8, batch_size=2)
    assert fitted.coef_.shape[1] == 3 + H  # fit traced the states itself
    loaded.coef_ = loaded.coef_[:, :-1]  # as if calibrated on a model with narrower states
    with pytest.raises(ValueError, match=f"{H - 1}-dim hidden states; the model's are {H}"):
        loaded.check_model(model)


def test_probe_tokens_are_read_on_a_shortlist_that_misses_some():
    """Read on the shortlist made from their own tokens, the probes' tokens never miss it; with
    training misses each quarter is read on the other's, and the odd prompts as before."""
    model, tok = tiny_model("llama")
    words = "alpha beta gamma delta eps zeta eta theta iota kappa lambda mu".split()
    prompts = [f"{w} {i}" for i, w in enumerate(words)]
    kw = dict(vocab_size=500, max_new_tokens=6, batch_size=8)  # 2 batches, the second short
    own = trace_exits(model, tok, prompts, training_misses=False, **kw)
    cross = trace_exits(model, tok, prompts, **kw)
    even, odd = own.prompt % 2 == 0, own.prompt % 2 == 1
    assert own.agree[even, -1].all()  # no miss: the last layer's probe would learn nothing
    assert not cross.agree[even, -1].all()
    np.testing.assert_array_equal(cross.prompt, own.prompt)
    np.testing.assert_array_equal(cross.vocab, own.vocab)  # the shortlist used at run time
    np.testing.assert_array_equal(cross.agree[odd], own.agree[odd])
    np.testing.assert_array_equal(cross.features[odd], own.features[odd])  # the same batches
    np.testing.assert_array_equal(cross.settled, own.settled)
    with pytest.raises(ValueError, match="one per prompt"):
        read_exits(SelfSpeculativeDecoder(model, tok), prompts, [[1, 2]])
    few = trace_exits(model, tok, prompts[:2], **kw)  # no second quarter to read on
    as_before = trace_exits(model, tok, prompts[:2], training_misses=False, **kw)
    np.testing.assert_array_equal(few.features, as_before.features)


def test_corrupt_policy_files_say_what_to_do(tmp_path):
    bad = tmp_path / "bad.json"
    for text in ("not json", json.dumps({"format": "other"}), json.dumps({"format": 1})):
        bad.write_text(text)
        with pytest.raises(ValueError, match="calibrate-exits"):
            TokenExitPolicy.load(bad)


def test_frequent_tokens():
    got = frequent_tokens([[5, 5, 1], [5, 2, 2]], 2)
    assert got.tolist() == [2, 5]
    assert frequent_tokens([[3]], 10).tolist() == [3]


def test_the_shortlist_holds_the_batch_prompts_tokens():
    from adainfer.lens import LogitLens
    from adainfer.lossy import ExitSignal

    model, tok = tiny_model("llama")
    lens = LogitLens(find_parts(model))
    signal = ExitSignal(lens, torch.tensor([3, 1]), [[7, 3], [9]])
    assert signal.vocab.tolist() == [1, 3, 7, 9]
    hidden, before = torch.randn(2, 2, model.config.hidden_size)
    features, logits = signal(hidden, before)
    assert logits.shape == (2, 4) and features.shape == (2, 3)
    torch.testing.assert_close(logits, lens(hidden)[:, signal.vocab])


def test_changed_tokens_reads_each_token_after_its_own_prefix():
    from adainfer.lossy import changed_tokens

    model, tok = tiny_model("qwen2")
    outputs = [list(t) for t in plain(model, tok)]
    assert not any(any(row) for row in changed_tokens(model, tok, PROMPTS, outputs))
    outputs[1][3] = (outputs[1][3] + 1) % 50
    changed = changed_tokens(model, tok, PROMPTS, outputs, batch_size=2)
    assert changed[1][3] and not any(changed[1][:3]) and not any(changed[0])


class CoinFlips(TokenExitPolicy):
    """A fitted policy whose probe passes at random (seeded) at layers 2 and 3: drafts of one
    round leave at different depths, which losslessness must survive whatever the probe."""

    def decision_function(self, layer, features, hidden=None):
        return torch.randn(len(features), generator=self.coins)


def coin_flips(model) -> CoinFlips:
    policy = CoinFlips()
    policy.__dict__.update(forced(model, 2).__dict__)
    policy.layers_, policy.coef_, policy.intercept_ = [2, 3], np.zeros((2, 3)), np.zeros(2)
    policy.coins = torch.Generator().manual_seed(0)
    return policy


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("arch", PROPAGATES)
def test_drafts_that_leave_at_their_own_layer_keep_plain_greedy(arch, batch):
    """Batch 1, and 8 prompts of different lengths with a row stopping early at EOS."""
    from test_generation import PROMPTS as PROMPTS_8
    from test_generation import _eos_stopping_a_row, _fresh_row, _model

    model, tok = _model(arch)  # 6 layers; Gemma's sliding window wide enough to draft
    L = model.config.num_hidden_layers
    prompts = PROMPTS_8[:batch] if batch > 1 else [PROMPTS_8[_fresh_row(model, tok, 12)]]
    eos, expected = _eos_stopping_a_row(model, tok, prompts, 12)
    for policy in (coin_flips(model), forced(model, 3, -20.0)):
        got = adainfer.generate(
            model,
            tok,
            prompts,
            draft_exits=policy,
            draft_tokens=3,
            max_new_tokens=12,
            eos_token_id=eos,
        )
        assert got.tokens == expected
        depths = {d for row in got.draft_layers for d in row}
        assert depths <= {2, 3, L} and len(got.draft_layers[0]) == got.drafted[0]
        assert (got.accepted <= got.drafted).all()
    assert depths == {L}  # a probe that never passes drafts at full depth, one a round
    assert got.acceptance == 1.0


def test_drafts_by_exits_mix_depths_and_stop_a_round_no_check_let_go():
    from test_generation import PROMPTS as PROMPTS_8

    model, tok = tiny_model("llama")
    got = adainfer.generate(
        model, tok, PROMPTS_8, draft_exits=coin_flips(model), draft_tokens=4, max_new_tokens=16
    )
    depths = [d for row in got.draft_layers for d in row]
    assert {2, 3, 4} <= set(depths)  # one policy, every depth, per token
    never = adainfer.generate(
        model,
        tok,
        PROMPTS_8[:2],
        draft_exits=forced(model, 2, -20.0),
        draft_tokens=4,
        max_new_tokens=9,
        eos_token_id=[],
    )
    assert never.rounds == 8  # no draft left early: one draft a round, then the verifier
    certified_none = forced(model, 2)
    certified_none.layers_ = []  # what calibration gives where no exit passed the risk test
    got = adainfer.generate(model, tok, PROMPTS_8[:2], draft_exits=certified_none)
    assert got.tokens == adainfer.generate(model, tok, PROMPTS_8[:2]).tokens
    assert got.draft_layers is None and got.drafted.sum() == 0  # plain decoding
    with pytest.raises(ValueError, match="not both exits and draft_exits"):
        adainfer.generate(model, tok, ["hi"], exits=forced(model, 2), draft_exits=forced(model, 2))
    with pytest.raises(ValueError, match="not both draft_exits and draft settings"):
        adainfer.generate(model, tok, ["hi"], draft_exits=forced(model, 2), draft_layer=2)


def test_sampled_drafts_by_exits_keep_the_model_distribution():
    """2000 rows sample two tokens at temperature 0.1; the second is drafted where a coin
    flip lets it leave (layer 2, 3 or the full head) and accepted or resampled: its
    frequencies fit the full model's own marginal (chi-square)."""
    from adainfer.generation import Chooser
    from test_generation import second_token_fit

    model, tok = tiny_model("llama")
    n, temperature = 2000, 0.1
    chooser = Chooser(
        do_sample=True, temperature=temperature, generator=torch.Generator().manual_seed(0)
    )
    decoder = coin_flips(model).draft_decoder(model, tok, draft_tokens=1)
    result = decoder.generate(["hello"] * n, max_new_tokens=2, eos_token_id=[], chooser=chooser)
    assert result.drafted.sum() == n
    assert len({d for row in result.draft_layers for d in row}) == 3
    second = torch.tensor([row[1] for row in result.tokens])
    assert second_token_fit(model, tok, "hello", second, temperature)[0] > 1e-3
