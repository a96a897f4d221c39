"""The same guarantees on the real bundled SmolLM2-135M (marked `real`; part of the default
suite)."""

import numpy as np
import pytest
import torch

from adainfer import AdaptiveEngine, load_policy, save_policy
from adainfer.collect import collect
from adainfer.evaluate import evaluate
from adainfer.pipeline import fit_policy
from adainfer.policies import GapThreshold, NeverExit, OracleExit, SVMExit
from adainfer.prefill import plain_last_logits
from adainfer.tasks import task_queries
from test_engine import ExitAt

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def engine():
    from adainfer.models import ModelNotAvailable, load

    try:
        return AdaptiveEngine(*load("smollm2-135m"))
    except (
        ModelNotAvailable
    ) as e:  # the bundled weights' package is not installed (`make test` installs it)
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def queries(engine):
    return task_queries(
        engine.tokenizer, ["capitalize", "last_item"], shots=3, n_train=8, n_test=4, seed=0
    )


def test_never_exit_equals_plain_model(engine, queries):
    prompts = [q.prompt for q in queries[1]] + ["Hi"]
    result = engine.run(prompts, NeverExit())
    torch.testing.assert_close(
        result.logits, plain_last_logits(engine, prompts), rtol=1e-4, atol=1e-4
    )
    assert result.top1.tolist() == plain_last_logits(engine, prompts).argmax(-1).tolist()


def test_mixed_exits_equal_each_row_alone(engine, queries):
    prompts = [q.prompt for q in queries[1]][:3] + ["Q: tiger\nA:"]
    targets = [12, 30, 5, 21]
    batch = engine.run(prompts, ExitAt(targets))
    assert batch.exit_layer.tolist() == targets
    for i, p in enumerate(prompts):
        alone = engine.run([p], ExitAt([targets[i]]))
        assert alone.top1[0] == batch.top1[i]
        torch.testing.assert_close(alone.logits[0], batch.logits[i], rtol=1e-3, atol=1e-3)


def test_gap_exit_layer_matches_the_trace(engine, queries):
    prompts = [q.prompt for q in queries[1]]
    trace = engine.run(prompts, NeverExit(), features=("gap",), check_layers=range(1, 31))
    result = engine.run(prompts, GapThreshold(0.8))
    for row, exit_layer in zip(trace.features[:, :, 0], result.exit_layer):
        hits = np.flatnonzero(row >= 0.8)
        assert exit_layer == (hits[0] + 1 if len(hits) else 30)


def test_collect_fit_save_load_evaluate(engine, queries, tmp_path):
    train, test = queries
    collect(engine, train, tmp_path / "data", progress=False)
    svm = fit_policy(tmp_path / "data", SVMExit(features=("gap", "top_prob", "layer_frac")))
    path = save_policy(svm, tmp_path / "svm.safetensors")
    loaded = load_policy(path, model=engine.model)
    summary = evaluate(engine, test, {"svm": loaded, "oracle": OracleExit()}, progress=False)
    p = summary["policies"]
    assert p["oracle"]["accuracy"] >= p["full"]["accuracy"]  # the oracle never loses the answer
    assert p["oracle"]["mean_exit_layer"] <= 30 and p["full"]["mean_exit_layer"] == 30
    assert p["full"]["true_flops_ratio"] == 1.0 and p["full"]["mean_checks"] == 0
    assert p["oracle"]["mean_checks"] >= 1  # every check it made is charged to it


@pytest.mark.parametrize("batch", [1, 8])
def test_lossless_generation_equals_plain_greedy(engine, batch):
    """Drafts from layer 24 of 30, verified from layer 25: the plain model's greedy tokens, at
    batch 1 and on 8 prompts of different lengths with a row that stops early at EOS."""
    from adainfer.generation import SelfSpeculativeDecoder

    model, tok = engine.model, engine.tokenizer
    prompts = [
        "The capital of France is",
        "def add(a, b):\n",
        "Once upon a time, in a land far away,",
        "1, 2, 3, 4,",
        "Translate to French: cheese",
        "The three primary colours are",
        "import numpy as np\n\n",
        "Q: What is the boiling point of water?\nA:",
    ][:batch]
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=20, do_sample=False, eos_token_id=None)
    free = out[:, enc["input_ids"].shape[1] :].tolist()
    # EOS: a token the last row first makes at its 4th step or later, so that row stops early;
    # a row that stops leaves the others' greedy tokens as they were
    last = free[-1]
    eos = next(t for i, t in enumerate(last) if i >= 3 and t not in last[:i])
    expected = [r[: r.index(eos) + 1] if eos in r else r for r in free]
    assert len(expected[-1]) < 20
    decoder = SelfSpeculativeDecoder(model, tok, draft_layer=24, draft_tokens=4)
    result = decoder.generate(prompts, max_new_tokens=20, eos_token_id=eos)
    assert result.tokens == expected
    assert result.accepted.sum() > 0  # the drafts are not all rejected on a real model
