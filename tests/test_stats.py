"""Paired statistics over patients: the numbers against SciPy and numpy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from lasegseg import stats

REF = np.array([0.80, 0.75, 0.90, 0.60, 0.85, 0.70, 0.82, 0.78])
CELL = np.array([0.84, 0.74, 0.95, 0.66, 0.85, 0.79, 0.88, 0.80])  # one tie (patient 5), one loss (patient 2)


def test_paired_comparison_matches_scipy_and_numpy():
    result = stats.paired_comparison(CELL, REF, resamples=5000, seed=7)
    diff = CELL - REF
    assert result.n_pairs == 8 and (result.wins, result.ties, result.losses) == (6, 1, 1)
    assert result.median_diff == pytest.approx(np.median(diff))
    untied = diff[np.abs(diff) > 1e-6]
    assert result.p == pytest.approx(sps.wilcoxon(untied, alternative="two-sided").pvalue)
    assert result.n_untied == 7 and result.small_sample is False
    # The CI is reproducible with numpy alone from the documented draw.
    idx = np.random.default_rng(7).integers(0, 8, size=(5000, 8))
    low, high = np.percentile(np.median(diff[idx], axis=1), [2.5, 97.5])
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high))
    assert result.ci_low <= result.median_diff <= result.ci_high
    assert stats.paired_comparison(CELL, REF, resamples=5000, seed=7) == result  # same seed, same interval
    # …and it is SciPy's percentile bootstrap, fed the same generator.
    theirs = sps.bootstrap(
        (diff,), np.median, n_resamples=5000, method="percentile", rng=np.random.default_rng(7), vectorized=True
    ).confidence_interval
    assert (result.ci_low, result.ci_high) == pytest.approx((theirs.low, theirs.high))


def test_lower_is_better_flips_wins_not_the_difference():
    result = stats.paired_comparison(CELL, REF, lower_is_better=True, resamples=100)
    assert (result.wins, result.ties, result.losses) == (1, 1, 6)
    assert result.median_diff > 0  # still cell − reference


def test_complete_pairs_only_and_tie_tolerance():
    cell = np.array([1.0, 2.0, np.nan, 4.0, np.inf])
    ref = np.array([1.0 + 1e-9, 1.5, 3.0, np.nan, 5.0])
    result = stats.paired_comparison(cell, ref, resamples=100)
    assert result.n_pairs == 2 and (result.wins, result.ties, result.losses) == (1, 1, 0)
    assert stats.paired_comparison(cell, ref, tie=0.6, resamples=100).ties == 2


def test_all_zero_differences_give_p_one():
    result = stats.paired_comparison(REF, REF.copy(), resamples=100)
    assert result.p == 1.0 and result.ties == 8 and result.median_diff == 0.0
    assert (result.ci_low, result.ci_high) == (0.0, 0.0) and result.small_sample
    assert stats.wilcoxon_p(np.array([])) != stats.wilcoxon_p(np.array([]))  # NaN: nothing to test


def test_small_samples_cannot_reach_significance():
    diff = np.array([0.1, 0.2, 0.3, 0.4, 0.5])
    result = stats.paired_comparison(diff, np.zeros(5), resamples=100)
    assert result.small_sample and result.p == pytest.approx(0.0625) == stats.wilcoxon_min_p(5)
    assert not stats.paired_comparison(np.append(diff, 0.6), np.zeros(6), resamples=100).small_sample


def test_holm_known_example_monotone_and_nan():
    np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(stats.holm([0.5, 0.4]), [0.8, 0.8])  # monotone: never below a smaller raw p's
    np.testing.assert_allclose(stats.holm([0.9, 0.8, np.nan]), [1.0, 1.0, np.nan])  # capped; NaN not counted
    np.testing.assert_allclose(stats.holm([0.01, np.nan, 0.04]), [0.02, np.nan, 0.04])


def test_kendall_tau_b_matches_scipy():
    rng = np.random.default_rng(0)
    x = np.array([1.0, 2.0, 2.0, 3.0, 0.5, 4.0])  # a tie in x
    ys = rng.integers(0, 4, size=(50, 6)).astype(float)  # plenty of ties in y
    expected = [sps.kendalltau(x, y).statistic for y in ys]
    np.testing.assert_allclose(stats.kendall_tau_b(x, ys), expected)


def test_rank_stability():
    rng = np.random.default_rng(1)
    clear = np.column_stack([rng.normal(m, 0.01, 20) for m in (0.9, 0.5, 0.1)])
    rs = stats.rank_stability(clear, resamples=500, seed=3)
    np.testing.assert_allclose(rs.p_first, [1.0, 0.0, 0.0])
    assert rs.tau_mean == 1.0 and (rs.tau_low, rs.tau_high) == (1.0, 1.0)
    assert stats.rank_stability(clear, lower_is_better=True, resamples=100).p_first[2] == 1.0
    noisy = rng.normal(0.5, 0.2, size=(10, 4))
    rs = stats.rank_stability(noisy, resamples=500, seed=3)
    assert rs.p_first.sum() == pytest.approx(1.0) and -1 <= rs.tau_low < rs.tau_mean < rs.tau_high <= 1
    one = stats.rank_stability(clear[:, :1], resamples=10)
    assert one.p_first[0] == 1.0 and np.isnan(one.tau_mean)
