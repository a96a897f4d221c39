"""bench/exit_probes.py: the probes it compares are planned as TokenExitPolicy plans."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np

from adainfer.lossy import ExitCosts, ExitTrace

ROOT = Path(__file__).resolve().parents[1]


def _exit_probes():
    spec = importlib.util.spec_from_file_location("exit_probes", ROOT / "bench" / "exit_probes.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _trace(n=800, layers=6, seed=0) -> ExitTrace:
    rng = np.random.default_rng(seed)
    features = rng.uniform(0, 1, (n, layers, 3))
    agree = rng.uniform(0, 1, (n, layers)) < np.linspace(0.1, 0.95, layers)[None]
    agree[:, -1] = True
    settled = np.full(n, layers)
    return ExitTrace(np.arange(50), features, agree, settled, np.arange(n) % 40)


def test_candidates_perfect_probe_and_hidden_state_probe():
    from adainfer.lossy import TokenExitPolicy

    ep = _exit_probes()
    trace, costs = _trace(), ExitCosts.layers_only(6)
    # the candidates the script lists are the policy's own: the deepest 4 layers (never
    # layer 1) that agree on at least half of the probes' (even prompts') tokens
    rates = trace.agree[trace.prompt % 2 == 0].mean(0)
    assert (
        TokenExitPolicy().candidates(trace) == [i + 1 for i in range(1, 6) if rates[i] >= 0.5][-4:]
    )
    layers = [3, 4, 5]
    perfect = trace.agree[:, [x - 1 for x in layers]] * 2.0 - 1
    got = ep.plan(trace, perfect, layers, 0.05, costs)  # 200 held-out tokens certify 5%
    assert got["changed_share"] == 0 and got["step_cost"] < 1 and got["layers"]
    noise = ep.plan(trace, np.random.default_rng(1).normal(size=perfect.shape), layers, 0.05, costs)
    assert noise["step_cost"] > got["step_cost"]  # scores that know nothing save less
    # the library's hidden-state probes (what the script plans with): where one direction
    # of the state says whether the layer agrees, they plan cheaper than the noise features
    hidden = np.zeros((len(trace.prompt), 3, 8), dtype=np.float16)  # the last 3 layers
    hidden[:, :, 0] = trace.agree[:, 3:6]
    states = dataclasses.replace(trace, hidden=hidden)
    kw = {"risk": 0.05, "min_agreement": 0.0}
    plain = TokenExitPolicy(**kw).fit_trace(trace, costs)
    read = TokenExitPolicy(hidden_state=True, **kw).fit_trace(states, costs)
    assert read.candidates(states) == [4, 5, 6]  # only layers whose states were kept
    assert set(read.layers_) <= {4, 5, 6}
    assert read.calibration_["step_cost"] < plain.calibration_["step_cost"]
    assert read.calibration_["changed_share"] <= 0.05
