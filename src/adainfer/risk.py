"""Risk control shared by every planner: Learn-then-Test over an ordered list of candidates.

A planner has candidates (a check schedule and stop threshold for a prefill plan; a set of
exit layers and probe threshold for lossy generation) and wants the cheapest one whose risk
(the expected loss on queries like the calibration ones) is at most `epsilon`. Testing every
candidate at level `delta` and keeping the cheapest that passes does not give that: with
hundreds of tests some candidate whose risk is above `epsilon` passes by luck, and being the
cheapest, it is the one kept. Learn-then-Test (Angelopoulos, Bates, Candes, Jordan, Lei 2021)
tests the null "risk > epsilon" of each candidate in a fixed order with a valid p-value and
stops at the first one not rejected (fixed-sequence testing): the accepted set then holds no
candidate with risk above `epsilon`, with probability at least 1 - `delta` over the draw of the
calibration queries, so any choice from it (the cheapest) keeps that promise. It holds when the
calibration and deployment queries are exchangeable (drawn from the same traffic), and says
nothing about another task or another prompt style.

The order must not depend on the queries that test: `order_by_risk` ranks candidates by their
risk estimated on other queries (those the classifier was fitted on), safest first, ties by
the later exit first. Within one schedule a lower threshold only moves exits earlier, and an
estimated risk follows that, so the estimated order agrees with the threshold order where
that one is known; across schedules only data can tell which is safer.

Losses are 0/1 per query, so the exact binomial tail is a valid p-value and the tightest:
- "consistency": the answer differs from the full model's (needs no gold label: any unlabeled
  prompts of the user's own traffic calibrate);
- "accuracy": the full model answers right and the candidate wrong (an answer lost; answers
  gained are not credited, which keeps the loss 0/1 and bounds the paired accuracy drop from
  above).
Hoeffding and Hoeffding-Bentkus p-values are there for losses in [0, 1] that are not 0/1.

The price: a candidate with no loss at all passes only if (1 - epsilon)^n <= delta, i.e. with
n >= `min_queries(epsilon, delta)` testing queries (299 at epsilon 0.01, delta 0.05).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

RISKS = ("consistency", "accuracy")
METHODS = ("binomial", "hoeffding", "bentkus", "hoeffding-bentkus")
RISK = "consistency"
# The defaults, chosen on results/guarantees/ (bench/guarantees.py): see the README there.
EPSILON = 0.05
DELTA = 0.05


def check_level(epsilon: float, delta: float) -> None:
    if not 0 < epsilon < 1:
        raise ValueError(f"epsilon is a share of queries, above 0 and below 1; got {epsilon}")
    if not 0 < delta < 1:
        raise ValueError(f"delta is a probability, above 0 and below 1; got {delta}")


def losses(risk: str, answers, full_answers, gold=None) -> np.ndarray:
    """0/1 loss per query (any leading shape) of `answers` against the full model's."""
    answers, full_answers = np.asarray(answers), np.asarray(full_answers)
    if risk == "consistency":
        return answers != full_answers
    if risk == "accuracy":
        if gold is None:
            raise ValueError("the accuracy risk needs gold labels; consistency needs none")
        gold = np.asarray(gold)
        return (full_answers == gold) & (answers != gold)
    raise ValueError(f"unknown risk {risk!r}; choose from {', '.join(RISKS)}")


def p_value(loss_sum, n: int, epsilon: float, method: str = "binomial"):
    """p-value of the null "risk > epsilon" for `loss_sum` (array or number), the summed loss of
    n queries. `binomial` needs 0/1 losses; the others any loss in [0, 1]."""
    if n < 1:
        return np.ones_like(np.asarray(loss_sum, dtype=float))
    k = np.asarray(loss_sum, dtype=float)
    if method == "binomial":  # P(Binomial(n, epsilon) <= k): the null's likeliest case
        return binom.cdf(np.round(k), n, epsilon)
    hoeffding = np.exp(-2 * n * np.maximum(epsilon - k / n, 0) ** 2)
    bentkus = np.minimum(math.e * binom.cdf(np.ceil(k - 1e-9), n, epsilon), 1.0)
    by_method = {"hoeffding": hoeffding, "bentkus": bentkus}
    by_method["hoeffding-bentkus"] = np.minimum(hoeffding, bentkus)
    if method not in by_method:
        raise ValueError(f"unknown p-value {method!r}; choose from {', '.join(METHODS)}")
    return by_method[method]


def fixed_sequence(p_values, delta: float):
    """How many of the ordered `p_values` are rejected at `delta` before the first that is not:
    the accepted candidates are that prefix. [C, ...] arrays give one count per column (the
    candidates of many calibration sets at once)."""
    above = np.asarray(p_values) > delta
    if len(above) == 0:
        return 0
    count = np.where(above.any(0), above.argmax(0), len(above))
    return int(count) if count.ndim == 0 else count


def order_by_risk(estimated_risk, later_first) -> np.ndarray:
    """Candidate indices, safest first: by `estimated_risk` (on queries other than the testing
    ones), ties by `later_first` descending (the mean exit layer: a later exit is safer)."""
    return np.lexsort((-np.asarray(later_first, float), np.asarray(estimated_risk, float)))


def learn_then_test(
    loss_sums, n: int, order, epsilon: float, delta: float, method: str = "binomial"
) -> np.ndarray:
    """Indices of the candidates accepted by fixed-sequence testing in `order` (the prefix before
    the first not rejected), from each candidate's summed loss over the same n testing queries."""
    check_level(epsilon, delta)
    order = np.asarray(order, dtype=int)
    p = p_value(np.asarray(loss_sums)[order], n, epsilon, method)
    return order[: fixed_sequence(p, delta)]


def min_queries(epsilon: float, delta: float) -> int:
    """The fewest testing queries on which a candidate with no loss at all is accepted."""
    check_level(epsilon, delta)
    return math.ceil(math.log(delta) / math.log1p(-epsilon))


def replay_losses(risk: str, agrees, correct, full_correct) -> np.ndarray:
    """`losses` from what an offline replay records per query: whether the answer is the full
    model's (`agrees`), whether it is gold (`correct`), and whether the full model's is."""
    if risk == "consistency":
        return ~np.asarray(agrees, dtype=bool)
    if risk == "accuracy":
        return np.asarray(full_correct, dtype=bool) & ~np.asarray(correct, dtype=bool)
    raise ValueError(f"unknown risk {risk!r}; choose from {', '.join(RISKS)}")
