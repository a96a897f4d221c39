"""Risk control: valid p-values, fixed-sequence testing, and the guarantee it buys."""

import math

import numpy as np
import pytest

from adainfer.risk import (
    fixed_sequence,
    learn_then_test,
    losses,
    min_queries,
    order_by_risk,
    p_value,
)


def test_p_values_match_a_hand_computation():
    # 1 loss in 10 queries against epsilon 0.2: P(Bin(10, 0.2) <= 1) = 0.8^10 + 10 * 0.2 * 0.8^9
    assert p_value(1, 10, 0.2) == pytest.approx(0.8**10 + 10 * 0.2 * 0.8**9)
    assert p_value(0, 299, 0.01) == pytest.approx(0.99**299)  # just under 0.05
    # Hoeffding: exp(-2 n (epsilon - mean)^2), 1 when the mean is above epsilon
    assert p_value(1, 10, 0.2, "hoeffding") == pytest.approx(math.exp(-2 * 10 * 0.1**2))
    assert p_value(5, 10, 0.2, "hoeffding") == 1.0
    # Bentkus: e * P(Bin(n, epsilon) <= ceil(k)), capped at 1; Hoeffding-Bentkus the smaller
    bentkus = math.e * (0.8**10 + 10 * 0.2 * 0.8**9)
    assert p_value(0.5, 10, 0.2, "bentkus") == pytest.approx(min(bentkus, 1))
    assert p_value(1, 10, 0.2, "hoeffding-bentkus") == pytest.approx(
        min(math.exp(-0.2), bentkus, 1)
    )
    # vectorised over candidates; no query, no evidence
    assert p_value(np.array([0, 3]), 20, 0.1).shape == (2,)
    assert p_value(0, 0, 0.1) == 1.0
    with pytest.raises(ValueError, match="unknown p-value"):
        p_value(1, 10, 0.2, "normal")


def test_fixed_sequence_stops_at_the_first_non_rejection():
    assert fixed_sequence([0.01, 0.02, 0.3, 0.001], 0.05) == 2  # the last is never tested
    assert fixed_sequence([0.01, 0.04], 0.05) == 2
    assert fixed_sequence([0.5, 0.01], 0.05) == 0
    assert fixed_sequence([], 0.05) == 0
    # learn_then_test returns the accepted prefix of the order, in candidate indices
    sums = np.array([9, 0, 3, 0])  # over 100 queries: 3 losses are not shown below 5%
    order = order_by_risk([0.09, 0.0, 0.03, 0.0], later_first=[5, 9, 7, 8])
    assert list(order) == [1, 3, 2, 0]
    assert list(learn_then_test(sums, 100, order, epsilon=0.05, delta=0.05)) == [1, 3]


def test_losses_and_the_queries_a_guarantee_needs():
    answers, full, gold = np.array([1, 2, 3, 4]), np.array([1, 3, 3, 5]), np.array([1, 3, 0, 4])
    assert list(losses("consistency", answers, full)) == [False, True, False, True]
    # accuracy: the full model was right and the answer is wrong (query 2); a gain (query 4) is 0
    assert list(losses("accuracy", answers, full, gold)) == [False, True, False, False]
    with pytest.raises(ValueError, match="gold labels"):
        losses("accuracy", answers, full)
    with pytest.raises(ValueError, match="unknown risk"):
        losses("agreement", answers, full)
    assert min_queries(0.01, 0.05) == 299 and p_value(0, 298, 0.01) > 0.05
    with pytest.raises(ValueError, match="epsilon"):
        min_queries(0, 0.05)


def test_learn_then_test_keeps_its_promise_where_testing_each_candidate_does_not():
    """A known risk curve: 5 safe candidates (risk 1%), then 40 cheaper ones just above
    epsilon (6% against 5%). Testing each at delta and keeping the cheapest that passes picks a
    bad one far more often than delta; fixed-sequence testing in the order safe-first does not."""
    rng = np.random.default_rng(0)
    n, epsilon, delta, trials = 300, 0.05, 0.05, 4000
    risk = np.r_[np.full(5, 0.01), np.full(40, 0.06)]  # index = order, higher index = cheaper
    sums = rng.binomial(n, risk, size=(trials, len(risk)))
    bad = risk > epsilon
    p = p_value(sums, n, epsilon)
    # today's method: each candidate tested alone, the cheapest (highest index) passing is kept
    passing = p <= delta
    chosen_each = np.where(passing.any(1), len(risk) - 1 - np.argmax(passing[:, ::-1], 1), -1)
    each = np.mean([c >= 0 and bad[c] for c in chosen_each])
    # LTT: the accepted prefix, and its cheapest member
    ltt = np.mean(
        [bad[learn_then_test(s, n, np.arange(len(risk)), epsilon, delta)].any() for s in sums]
    )
    error = 3 * math.sqrt(delta * (1 - delta) / trials)
    assert ltt <= delta + error
    assert each > delta + 5 * error, each


def test_fixed_sequence_runs_over_many_calibration_sets_at_once():
    p = np.array([[0.01, 0.5, 0.01], [0.01, 0.01, 0.2], [0.5, 0.01, 0.01]])  # [C, sets]
    assert list(fixed_sequence(p, 0.05)) == [2, 0, 1]
