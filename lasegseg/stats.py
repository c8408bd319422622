"""Paired statistics between configurations, on plain arrays (no MLflow, no Ray).

Patients are the unit: a comparison pairs two cells' per-patient values (seeds already averaged within a patient)
and reports the median paired difference with a percentile-bootstrap CI over patients, a two-sided Wilcoxon
signed-rank p-value, Holm's correction across the comparisons made, and win/tie/loss counts. Rank stability
resamples patients and re-ranks every cell.

Every bootstrap draws its patient indices as ``np.random.default_rng(seed).integers(0, n, size=(resamples, n))``
(:func:`bootstrap_indices`), so a result can be reproduced with numpy alone.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
from scipy import stats

WILCOXON_ZERO_METHOD = "wilcox"
"""Differences within the tie tolerance are set to zero and dropped from the signed-rank test (Wilcoxon's original
rule, also R's): a tie says nothing about the direction, and it is counted in ``ties`` instead."""
MIN_PAIRS_FOR_SIGNIFICANCE = 6
"""With fewer non-tied pairs the exact two-sided Wilcoxon p cannot go below 0.05 (2 / 2**5 = 0.0625 for 5)."""
DEFAULT_TIE = 1e-6
DEFAULT_RESAMPLES = 10_000
_TAU_CHUNK = 1000


def wilcoxon_min_p(n: int) -> float:
    """The smallest exact two-sided Wilcoxon signed-rank p-value reachable with ``n`` non-tied pairs (2 / 2**n)."""
    return 1.0 if n <= 0 else min(1.0, 2.0 / 2.0**n)


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """Patient indices of ``resamples`` bootstrap samples of ``n`` patients, shape ``(resamples, n)``.

    Args:
        n: number of patients (> 0).
        resamples: number of bootstrap samples.
        seed: seed of ``np.random.default_rng``; the same seed gives the same samples.
    """
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def holm(pvalues: np.ndarray | list[float]) -> np.ndarray:
    """Holm step-down adjusted p-values: monotone in the raw p, capped at 1; NaN stays NaN and is not counted.

    Args:
        pvalues: raw p-values of the comparisons made (NaN for a comparison that could not be tested).

    Example: ``holm([0.01, 0.04, 0.03])`` → ``[0.03, 0.06, 0.06]``.
    """
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = tested.size
    if m == 0:
        return out
    order = tested[np.argsort(p[tested], kind="stable")]
    scaled = p[order] * (m - np.arange(m))
    # The running maximum keeps the adjusted values in the order of the raw ones (step-down).
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


@dataclass(frozen=True)
class PairedResult:
    """One cell against the reference, over the patients both have.

    ``median_diff``/``ci_low``/``ci_high`` are of ``cell − reference``; ``wins`` count patients where the cell is
    better (higher, or lower when ``lower_is_better``) by more than the tie tolerance; ``n_untied`` is the number
    of pairs the signed-rank test uses.
    """

    n_pairs: int
    median_diff: float
    ci_low: float
    ci_high: float
    p: float
    wins: int
    ties: int
    losses: int
    n_untied: int

    @property
    def small_sample(self) -> bool:
        """Whether no test on these pairs can reach p < 0.05."""
        return self.n_untied < MIN_PAIRS_FOR_SIGNIFICANCE


def wilcoxon_p(diff: np.ndarray, tie: float = DEFAULT_TIE) -> float:
    """Two-sided Wilcoxon signed-rank p of paired differences; 1 when every difference is a tie, NaN when empty.

    Args:
        diff: paired differences.
        tie: differences with ``|d| <= tie`` count as zero (see :data:`WILCOXON_ZERO_METHOD`).
    """
    d = np.where(np.abs(diff) <= tie, 0.0, np.asarray(diff, dtype=float))
    if d.size == 0:
        return math.nan
    if not d.any():
        return 1.0  # no evidence either way; SciPy would divide by zero on the way there
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # SciPy's note on ties/zeros when it switches to normal
        return float(stats.wilcoxon(d, zero_method=WILCOXON_ZERO_METHOD, alternative="two-sided").pvalue)


def bootstrap_median_ci(
    diff: np.ndarray, *, resamples: int = DEFAULT_RESAMPLES, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile-bootstrap CI of the median of ``diff``, resampling its entries (patients) with replacement.

    Args:
        diff: paired differences, one per patient.
        resamples: bootstrap samples.
        seed: seed of :func:`bootstrap_indices`.
        level: coverage of the interval.
    """
    if diff.size == 0:
        return math.nan, math.nan
    medians = np.median(diff[bootstrap_indices(diff.size, resamples, seed)], axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(medians, [tail, 100 - tail])
    return float(low), float(high)


def paired_comparison(
    cell: np.ndarray,
    reference: np.ndarray,
    *,
    lower_is_better: bool = False,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    tie: float = DEFAULT_TIE,
) -> PairedResult:
    """Compare a cell with the reference over the patients where both values are finite (complete pairs only).

    Args:
        cell: per-patient values of the cell (NaN where it has none).
        reference: the reference's values for the same patients, in the same order.
        lower_is_better: the metric is a distance (HD95): a win is a lower value.
        resamples: bootstrap samples for the CI.
        seed: bootstrap seed.
        tie: ``|cell − reference| <= tie`` is a tie.
    """
    cell, reference = np.asarray(cell, dtype=float), np.asarray(reference, dtype=float)
    both = np.isfinite(cell) & np.isfinite(reference)
    diff = cell[both] - reference[both]
    n = int(diff.size)
    if n == 0:
        return PairedResult(0, math.nan, math.nan, math.nan, math.nan, 0, 0, 0, 0)
    low, high = bootstrap_median_ci(diff, resamples=resamples, seed=seed)
    tied = np.abs(diff) <= tie
    better = (diff < 0 if lower_is_better else diff > 0) & ~tied
    wins, ties = int(better.sum()), int(tied.sum())
    return PairedResult(
        n_pairs=n,
        median_diff=float(np.median(diff)),
        ci_low=low,
        ci_high=high,
        p=wilcoxon_p(diff, tie),
        wins=wins,
        ties=ties,
        losses=n - wins - ties,
        n_untied=n - ties,
    )


def kendall_tau_b(x: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Kendall's τ-b between ``x`` and each row of ``ys`` (what ``scipy.stats.kendalltau`` gives, vectorised).

    Ten thousand SciPy calls take seconds; the pairwise signs of a few dozen cells take milliseconds.

    Args:
        x: values of k items, shape ``(k,)``.
        ys: values of the same items in each of r rankings, shape ``(r, k)``.

    Returns:
        shape ``(r,)``; NaN for a row (or an ``x``) without any untied pair.
    """
    x, ys = np.asarray(x, dtype=float), np.atleast_2d(np.asarray(ys, dtype=float))
    i, j = np.triu_indices(x.size, k=1)
    sx = np.sign(x[j] - x[i])
    out = np.empty(ys.shape[0])
    for start in range(0, ys.shape[0], _TAU_CHUNK):
        block = ys[start : start + _TAU_CHUNK]
        sy = np.sign(block[:, j] - block[:, i])
        # τ-b = (concordant − discordant) / sqrt(untied pairs in x · untied pairs in y)
        denom = np.sqrt(np.count_nonzero(sx) * np.count_nonzero(sy, axis=1).astype(float))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + _TAU_CHUNK] = np.where(denom > 0, (sy @ sx) / denom, np.nan)
    return out


@dataclass(frozen=True)
class RankStability:
    """How stable the ranking of cells is when the patients are resampled.

    ``p_first[c]`` is the share of resamples in which cell ``c`` ranks first (ties go to the earlier column);
    ``tau_*`` summarise Kendall's τ-b between each resample's ranking and the observed one.
    """

    p_first: np.ndarray
    tau_mean: float
    tau_low: float
    tau_high: float
    n_patients: int
    resamples: int


def rank_stability(
    values: np.ndarray, *, lower_is_better: bool = False, resamples: int = DEFAULT_RESAMPLES, seed: int = 0
) -> RankStability:
    """Resample patients, rank the cells by their mean in each resample, compare with the observed ranking.

    Args:
        values: patients × cells, complete (no NaN); a patient missing in any cell must be dropped beforehand.
        lower_is_better: rank by the lowest mean (HD95).
        resamples: bootstrap samples (patient indices from :func:`bootstrap_indices` with ``seed``).
        seed: bootstrap seed.
    """
    values = np.asarray(values, dtype=float)
    n, k = values.shape
    if n == 0 or k == 0:
        return RankStability(np.full(k, np.nan), math.nan, math.nan, math.nan, n, resamples)
    idx = bootstrap_indices(n, resamples, seed)
    # Per-resample means as counts @ values: (resamples × n) @ (n × k), never materialising resamples × n × k.
    counts = np.bincount((np.arange(resamples)[:, None] * n + idx).ravel(), minlength=resamples * n)
    means = counts.reshape(resamples, n) @ values / n
    observed = values.mean(axis=0)
    if lower_is_better:
        means, observed = -means, -observed
    p_first = np.bincount(means.argmax(axis=1), minlength=k) / resamples
    if k < 2:
        return RankStability(p_first, math.nan, math.nan, math.nan, n, resamples)
    tau = kendall_tau_b(observed, means)
    tau = tau[~np.isnan(tau)]
    if tau.size == 0:
        return RankStability(p_first, math.nan, math.nan, math.nan, n, resamples)
    low, high = np.percentile(tau, [2.5, 97.5])
    return RankStability(p_first, float(tau.mean()), float(low), float(high), n, resamples)
