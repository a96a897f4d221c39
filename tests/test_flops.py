import numpy as np

from adainfer.flops import paper_ratio, true_ratio


def test_paper_ratio_formula():
    # (2 l'(6h+s) + V) / (2 L(6h+s) + V) with h=10, s=5, V=100, L=4
    assert paper_ratio([4], 4, 10, 100, [5])[0] == 1.0
    np.testing.assert_allclose(
        paper_ratio([2], 4, 10, 100, [5]), (2 * 2 * 65 + 100) / (2 * 4 * 65 + 100)
    )


def test_true_ratio_charges_every_check():
    full = true_ratio([4], [0], 4, 10, 100, [5])
    assert full[0] == 1.0  # no checks, full depth: the plain model
    never_checked = true_ratio([2], [0], 4, 10, 100, [5])[0]
    checked = true_ratio([2], [2], 4, 10, 100, [5])[0]
    assert checked > never_checked  # checks cost
    layer = 5 * 2 * 65
    np.testing.assert_allclose(checked, (2 * layer + 2 * 100) / (4 * layer + 100))
    # running to the end after 3 useless checks costs more than the plain model
    assert true_ratio([4], [3], 4, 10, 100, [5])[0] > 1.0


def test_shortlist_checks_are_charged_their_size_plus_a_confirmation():
    exact = true_ratio([2], [2], 4, 10, 100, [5])[0]
    short = true_ratio([2], [2], 4, 10, 100, [5], short_checks=[1], shortlist_size=8, confirms=[1])[
        0
    ]
    # one exact check + one 8-token check + the exact confirmation at the stop
    layer = 5 * 2 * 65
    assert short == (2 * layer + 100 + 8 + 100) / (4 * layer + 100)
    assert short > exact  # with V = 100 the confirmation outweighs what the shortlist saved
    many = true_ratio(
        [3], [3], 4, 10, 10_000, [5], short_checks=[2], shortlist_size=8, confirms=[1]
    )[0]
    assert many < true_ratio([3], [3], 4, 10, 10_000, [5])[0]  # with a big vocabulary it pays
