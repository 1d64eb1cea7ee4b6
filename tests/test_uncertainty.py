"""Intervals and paired comparisons against references computed another way."""

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from kvpress_mm.eval.metrics import bootstrap_interval, paired_comparison, score_interval, wilson_interval
from kvpress_mm.results import comparison_text, interval_text


def test_wilson_matches_the_closed_form_and_known_values():
    # 8 of 10 at 95%: the textbook interval is [0.490, 0.943]
    low, high = wilson_interval(8, 10)
    assert abs(low - 0.4902) < 1e-3 and abs(high - 0.9433) < 1e-3
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert wilson_interval(0, 0) is None


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.data())
def test_wilson_holds_the_estimate_and_inverts_the_score_test(n, data):
    k = data.draw(st.integers(0, n))
    low, high = wilson_interval(k, n)
    p = k / n
    assert 0 <= low <= p <= high <= 1

    # the interval is where the score test does not reject: |p - q| <= z sqrt(q (1 - q) / n) at its ends
    def z_stat(q):
        return abs(p - q) / math.sqrt(q * (1 - q) / n)

    for end in (low, high):
        if 0 < end < 1:
            assert abs(z_stat(end) - 1.959964) < 1e-6


def test_bootstrap_interval_covers_the_mean_and_shrinks_with_n():
    rng = random.Random(0)
    small = [rng.gauss(0, 1) for _ in range(20)]
    large = [rng.gauss(0, 1) for _ in range(2000)]
    for values in (small, large):
        low, high = bootstrap_interval(values)
        assert low <= sum(values) / len(values) <= high
    assert (lambda c: c[1] - c[0])(bootstrap_interval(large)) < (lambda c: c[1] - c[0])(bootstrap_interval(small))
    # close to the normal interval mean +- 1.96 sd / sqrt(n) for large n
    m = sum(large) / len(large)
    sd = math.sqrt(sum((v - m) ** 2 for v in large) / (len(large) - 1))
    low, high = bootstrap_interval(large)
    assert abs((high - low) - 2 * 1.96 * sd / math.sqrt(len(large))) < 0.02


def test_score_interval_picks_wilson_for_exact_match():
    assert score_interval([1, 0, 1, 1]) == wilson_interval(3, 4)
    assert score_interval([0.5, 0.25]) == bootstrap_interval([0.5, 0.25])


def test_mcnemar_exact_p_values():
    # 10 discordant pairs all one way: p = 2 / 2^10
    a, b = [1] * 10 + [1] * 5, [0] * 10 + [1] * 5
    cmp = paired_comparison(a, b)
    assert abs(cmp["p"] - 2 / 1024) < 1e-12 and cmp["significant"] and cmp["diff"] == 10 / 15
    # balanced discordance: p = 1
    cmp = paired_comparison([1, 0, 1, 0], [0, 1, 0, 1])
    assert cmp["p"] == 1.0 and not cmp["significant"]
    # identical: nothing to test
    assert paired_comparison([1, 1], [1, 1])["p"] == 1.0


def test_paired_bootstrap_for_continuous_values():
    a = [0.9 + 0.01 * i for i in range(30)]
    b = [v - 0.3 for v in a]
    cmp = paired_comparison(a, b)
    assert cmp["p"] is None and cmp["significant"] and abs(cmp["diff"] - 0.3) < 1e-9
    cmp = paired_comparison([0.5, 0.6, 0.4], [0.55, 0.45, 0.5])
    assert not cmp["significant"]


def test_table_texts():
    assert interval_text((0.1234, 0.5678)) == "[0.12, 0.57]" and interval_text(None) is None
    text = comparison_text({"diff": -0.25, "ci": (-0.4, -0.1), "p": 0.003, "significant": True, "n": 20})
    assert text == "-0.25 [-0.40, -0.10] p=0.003 *"
