"""Seeded, patient-level train/val/test splits and nested few-shot subsets.

Each draw uses its own random stream, derived from the seed and a fixed stream id, so that one choice never moves
another: the test set depends only on (sorted case ids, seed, test fraction), so it stays put when the validation
fraction, the trial seed or the few-shot size changes. Few-shot subsets are prefixes of one seeded permutation,
hence nested: for a given seed, the 1-patient subset is inside the 2-patient one, 10 % of slices inside 25 %.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lasegseg.errors import ConfigError, DataError

if TYPE_CHECKING:
    from lasegseg.data.cache_read import SliceCache

_TEST_STREAM = 0
_VAL_STREAM = 1
_PATIENT_STREAM = 2
_SLICE_STREAM = 3


@dataclass(frozen=True)
class Split:
    """Disjoint, sorted patient ids of one train/val/test split."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]


def split_patients(case_ids: Iterable[str], seed: int, val_fraction: float = 0.2, test_fraction: float = 0.2) -> Split:
    """Split patients into train/val/test, each non-empty.

    Args:
        case_ids: one id per patient (order does not matter; duplicates are an error).
        seed: the split seed (``data.split_seed``).
        val_fraction, test_fraction: share of all patients for validation and test; each set gets
            ``round(n * fraction)`` patients, at least 1, leaving at least 1 for training.

    Returns:
        A :class:`Split`. The test set depends only on the sorted ids, ``seed`` and ``test_fraction``.
    """
    ids = sorted(case_ids)
    if len(set(ids)) != len(ids):
        dupes = sorted({c for c in ids if ids.count(c) > 1})
        raise DataError(f"duplicate case ids in the dataset: {', '.join(dupes)}")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"config key 'data.val_fraction' must be in (0, 1), got {val_fraction}")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"config key 'data.test_fraction' must be in (0, 1), got {test_fraction}")
    n = len(ids)
    if n < 3:
        raise DataError(f"a train/val/test split needs at least 3 patients, the dataset has {n}")
    n_test = min(max(_round_half_up(n * test_fraction), 1), n - 2)
    test_pos = _rng(seed, _TEST_STREAM).permutation(n)[:n_test]
    test = {ids[i] for i in test_pos}
    rest = [c for c in ids if c not in test]
    n_val = min(max(_round_half_up(n * val_fraction), 1), len(rest) - 1)
    val = {rest[i] for i in _rng(seed, _VAL_STREAM).permutation(len(rest))[:n_val]}
    train = [c for c in rest if c not in val]
    return Split(train=tuple(train), val=tuple(sorted(val)), test=tuple(sorted(test)))


def fewshot_patients(train_ids: Iterable[str], seed: int, n: int) -> tuple[str, ...]:
    """The first ``n`` patients of a seeded permutation of the training pool (nested in ``n``), sorted.

    Args:
        train_ids: the training patients of a split.
        seed: the trial seed.
        n: how many patients (``data.patients``); 0 means all of them.
    """
    ids = sorted(train_ids)
    if n < 0:
        raise ConfigError(f"config key 'data.patients' must be >= 0 (0 = all), got {n}")
    if n > len(ids):
        raise ConfigError(f"config key 'data.patients' asks for {n} patients but the training pool has {len(ids)}")
    if n == 0:
        return tuple(ids)
    perm = _rng(seed, _PATIENT_STREAM).permutation(len(ids))
    return tuple(sorted(ids[i] for i in perm[:n]))


def fewshot_slices(
    row_indices: Sequence[int] | np.ndarray, seed: int, fraction: float, has_fg: np.ndarray | None = None
) -> np.ndarray:
    """A seeded share of training slice rows, nested in ``fraction`` for a given seed.

    Args:
        row_indices: candidate rows (e.g. every slice of the training patients).
        seed: the trial seed.
        fraction: share of slices to keep (``data.fraction``), in ``(0, 1]``; ``ceil(fraction * n)`` rows, at
            least 1.
        has_fg: optional bool per row of ``row_indices``; when given, foreground and background slices are drawn
            separately (``ceil`` of the fraction of each), so a small share is not all background.

    Returns:
        Ascending int64 row indices.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"config key 'data.fraction' must be in (0, 1], got {fraction}")
    rows = np.asarray(row_indices, dtype=np.int64)
    if rows.ndim != 1 or rows.size == 0:
        raise DataError("few-shot slice selection needs at least one training slice")
    order = np.argsort(rows, kind="stable")
    rows = rows[order]
    if has_fg is None:
        strata = [rows]
    else:
        fg = np.asarray(has_fg, dtype=bool)
        if fg.shape != rows.shape:
            raise ValueError(f"has_fg has shape {fg.shape}, expected {rows.shape}")
        fg = fg[order]
        strata = [rows[fg], rows[~fg]]
    # One permutation per stratum with a stream of its own, so each prefix grows monotonically with the fraction.
    picked = []
    for i, stratum in enumerate(strata):
        if stratum.size:
            k = math.ceil(fraction * stratum.size)
            picked.append(stratum[_rng(seed, _SLICE_STREAM, i).permutation(stratum.size)[:k]])
    return np.sort(np.concatenate(picked))


def select_training_rows(
    cache: SliceCache, split: Split, seed: int, patients: int = 0, fraction: float = 1.0
) -> np.ndarray:
    """The cache rows a trial trains on: a few-shot subset of the split's training patients, then of their slices.

    Args:
        cache: the opened slice cache (anything with ``rows_for`` and ``has_fg``).
        split: the patient split.
        seed: the trial seed.
        patients: ``data.patients`` (0 = all training patients).
        fraction: ``data.fraction`` (1.0 = all their slices; stratified by foreground otherwise).

    Returns:
        Ascending int64 row indices into the cache.
    """
    rows = cache.rows_for(fewshot_patients(split.train, seed, patients))
    if fraction == 1.0:
        return rows
    return fewshot_slices(rows, seed, fraction, has_fg=np.asarray(cache.has_fg)[rows])


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *stream])


def _round_half_up(x: float) -> int:
    # Python's round() is banker's rounding: round(2.5) == 2 would make split sizes jump unevenly with n.
    return math.floor(x + 0.5)
