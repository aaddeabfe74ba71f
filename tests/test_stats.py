"""`engine.compare.stats`: the paired test, Holm, the bootstrap and the edge flag, on fixed data.

References are independent where one exists: scipy's Wilcoxon, a brute-force enumeration of the
sign flips, Holm's step-down procedure worked by hand, and statsmodels when it is installed.
"""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
from scipy.stats import rankdata, wilcoxon

from engine.compare import stats

NO_TIES = [0.031, -0.012, 0.044, 0.007, 0.025, -0.003, 0.018, 0.052, 0.011, -0.021]
TIES_AND_ZEROS = [0.01, -0.02, 0.03, 0.0, -0.01, 0.02, 0.04, -0.03, 0.01, 0.0]
LONG = list(np.round(np.random.default_rng(7).normal(0.01, 0.02, size=20), 2))  # ties, n > 13


def brute_force_p(diff) -> float:
    """Two-sided p of the Pratt signed-rank statistic over all 2^n sign flips, by hand."""
    d = np.round(np.asarray(diff), 12)
    ranks = rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    nonzero = ranks[d != 0]
    sums = [sum(r for r, s in zip(nonzero, signs) if s)
            for signs in itertools.product((0, 1), repeat=len(nonzero))]
    low = np.mean([s <= observed + 1e-9 for s in sums])
    high = np.mean([s >= observed - 1e-9 for s in sums])
    return min(1.0, 2 * min(low, high))


@pytest.mark.parametrize("diff, method", [(NO_TIES, "exact"),
                                          (TIES_AND_ZEROS, "all 2^n sign flips"),
                                          (LONG, "normal approximation")])
def test_signed_rank_matches_scipy(diff, method):
    result = stats.signed_rank(diff)
    d = np.round(diff, 12)
    reference = wilcoxon(d, zero_method="pratt", alternative="two-sided")
    assert result.method == method
    assert result.pvalue == pytest.approx(reference.pvalue)
    assert min(result.w_plus, result.w_minus) == pytest.approx(reference.statistic)
    greater = wilcoxon(d, zero_method="pratt", alternative="greater")
    assert result.w_plus == pytest.approx(greater.statistic)
    assert stats.signed_rank(diff, "greater").pvalue == pytest.approx(greater.pvalue)
    assert result.zeros == sum(x == 0 for x in diff) and result.n == len(diff)


@pytest.mark.parametrize("diff", [NO_TIES, TIES_AND_ZEROS])
def test_exact_p_values_match_the_enumeration_of_sign_flips(diff):
    assert stats.signed_rank(diff).pvalue == pytest.approx(brute_force_p(diff))


def test_signed_rank_edge_cases():
    assert stats.signed_rank([0.02] * 10).pvalue == pytest.approx(stats.smallest_p(10))
    assert stats.smallest_p(10) == 2 / 1024
    all_equal = stats.signed_rank([0.0, 0.0, 0.0])
    assert all_equal.pvalue == 1.0 and all_equal.direction == 0
    assert stats.signed_rank(NO_TIES).direction == 1
    assert stats.signed_rank([-x for x in NO_TIES]).direction == -1
    # 0.3 - 0.1 and 0.5 - 0.3 differ in floating point; rounded, they tie as they should.
    tied = stats.signed_rank([0.3 - 0.1, 0.5 - 0.3, -0.1])
    assert tied.method == "all 2^n sign flips" and tied.w_plus == 5.0
    for bad in ([], [float("nan"), 0.1], [[0.1, 0.2]]):
        with pytest.raises(ValueError, match="finite differences"):
            stats.signed_rank(bad)
    with pytest.raises(ValueError, match="alternative"):
        stats.signed_rank(NO_TIES, "bigger")


def test_holm_by_hand():
    # Sorted: 0.005 x4 = 0.02; 0.01 x3 = 0.03; 0.03 x2 = 0.06; 0.04 x1 = 0.04 -> running max 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # Running maximum over ties, capped at 1, one p is its own correction.
    assert stats.holm([0.5, 0.2, 0.2]) == pytest.approx([0.6, 0.6, 0.6])
    assert stats.holm([0.6, 0.7]) == [1.0, 1.0]
    assert stats.holm([0.07]) == [0.07] and stats.holm([]) == []
    for bad in ([0.1, 1.5], [-0.1], [float("nan")]):
        with pytest.raises(ValueError, match=r"in \[0, 1\]"):
            stats.holm(bad)


def test_holm_matches_statsmodels():
    from statsmodels.stats import multitest

    p = [0.001, 0.2, 0.013, 0.04, 0.04, 0.5, 0.0002, 0.03]
    reject, adjusted, _, _ = multitest.multipletests(p, alpha=0.05, method="holm")
    assert stats.holm(p) == pytest.approx(list(adjusted))
    assert [a < 0.05 for a in stats.holm(p)] == list(reject)


def test_holm_is_the_step_down_procedure():
    """Rejecting where the adjusted p < alpha is Holm's procedure: walk up the sorted p-values,
    comparing the i-th (0-based) with alpha / (m - i), and stop at the first that fails."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        p = list(np.round(rng.uniform(0, 0.1, size=rng.integers(1, 9)), 3))
        rejected = set()
        for i, k in enumerate(sorted(range(len(p)), key=lambda j: p[j])):
            if p[k] >= 0.05 / (len(p) - i):
                break
            rejected.add(k)
        assert {k for k, a in enumerate(stats.holm(p)) if a < 0.05} == rejected


def test_align_pairs_by_seed_not_by_position():
    a = [(k, 0.9 + k / 100) for k in range(10)]
    b = [(k, 0.85 + k / 90) for k in range(10)]
    paired = stats.align(a, b, floor=0.0)
    shuffled = a[:]
    random.Random(1).shuffle(shuffled)
    again = stats.align(shuffled, b[::-1], floor=0.0)
    assert again.seeds == paired.seeds == tuple(range(10))
    assert np.array_equal(again.diff, paired.diff)
    assert stats.compare_pair(shuffled, b[::-1], 0.0) == stats.compare_pair(a, b, 0.0)


def test_align_refuses_seeds_that_do_not_pair():
    a = [(k, 0.9) for k in range(5)]
    with pytest.raises(ValueError, match=r"only A ran \[4\], only B ran none"):
        stats.align(a, a[:4], floor=0.0)
    with pytest.raises(ValueError, match=r"only A ran \[0\], only B ran \[7\]"):
        stats.align(a, a[1:] + [(7, 0.9)], floor=0.0)
    with pytest.raises(ValueError, match="seed 3 appears twice"):
        stats.align(a + [(3, 0.8)], a, floor=0.0)
    with pytest.raises(ValueError, match="no seeds"):
        stats.align([], [], floor=0.0)
    with pytest.raises(TypeError, match="not an integer"):
        stats.align([("1", 0.9)], [(1, 0.9)], floor=0.0)


def test_diverged_runs_score_the_floor_and_are_counted():
    a = [(0, None), (1, float("nan")), (2, 0.9), (3, 0.8)]
    b = [(0, 0.7), (1, 0.7), (2, 0.7), (3, float("inf"))]
    paired = stats.align(a, b, floor=0.1)
    assert list(paired.a) == [0.1, 0.1, 0.9, 0.8] and list(paired.b) == [0.7, 0.7, 0.7, 0.1]
    assert (paired.diverged_a, paired.diverged_b) == (2, 1)
    summary = stats.compare_pair(a, b, floor=0.1)
    assert summary["diverged"] == [2, 1] and summary["n"] == 4
    assert (summary["wins"], summary["losses"]) == (2, 2)


def test_bootstrap_interval_is_seeded_and_contains_the_estimate():
    for statistic, func in (("median", np.median), ("mean", np.mean)):
        first = stats.bootstrap_ci(TIES_AND_ZEROS, statistic, seed=5)
        assert first == stats.bootstrap_ci(TIES_AND_ZEROS, statistic, seed=5)
        assert first.estimate == pytest.approx(func(TIES_AND_ZEROS))
        assert first.low <= first.estimate <= first.high and first.low < first.high
        narrow = stats.bootstrap_ci(TIES_AND_ZEROS, statistic, seed=5, level=0.5)
        assert first.low <= narrow.low <= narrow.high <= first.high
    # The seed is used: another one moves the ends (the median's 10,000 resamples land on a
    # grid of values, so its ends are stable; the mean's are not).
    five, six = (stats.bootstrap_ci(NO_TIES, "mean", seed=k) for k in (5, 6))
    assert five != six
    constant = stats.bootstrap_ci([0.02] * 10, "median", seed=0)
    assert constant.low == constant.estimate == constant.high == pytest.approx(0.02)
    with pytest.raises(ValueError, match="median or mean"):
        stats.bootstrap_ci(NO_TIES, "mode")
    with pytest.raises(ValueError, match="level"):
        stats.bootstrap_ci(NO_TIES, level=1.0)


def test_bootstrap_resamples_seed_pairs():
    """One outlying seed pair: the interval of the mean reaches it only as often as resampling
    whole pairs draws it, so the upper end moves with the outlier and the lower end does not."""
    base = [0.01] * 9
    lone = stats.bootstrap_ci(base + [0.01], "mean", seed=0)
    outlier = stats.bootstrap_ci(base + [0.21], "mean", seed=0)
    assert lone.low == lone.high == pytest.approx(0.01)
    assert outlier.low == pytest.approx(0.01) and outlier.high > 0.05


@pytest.mark.parametrize("value, edge", [(1e-5, "low"), (1.5e-5, "low"), (10.0, "high"),
                                         (7.0, "high"), (1e-3, None), (2e-5, None), (4.0, None)])
def test_edge_flag_within_five_percent_of_the_log_range(value, edge):
    # [1e-5, 10] spans 6 decades: 5% is 0.3 decades, so up to 2e-5 and from 5e0 (10 / 2).
    assert stats.at_edge(value, 1e-5, 10.0) == edge


def test_edge_flag_bad_ranges():
    for args in ((0.1, 1.0, 0.5), (0.1, 0.0, 1.0), (0.0, 1e-3, 1.0)):
        with pytest.raises(ValueError, match="0 < low < high"):
            stats.at_edge(*args)
