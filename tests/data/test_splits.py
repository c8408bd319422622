from __future__ import annotations

import numpy as np
import pytest

from lasegseg.data.splits import Split, fewshot_patients, fewshot_slices, select_training_rows, split_patients
from lasegseg.errors import ConfigError, DataError


def ids(n: int) -> list[str]:
    return [f"p{i:03d}" for i in range(n)]


class FakeCache:
    """Duck-typed slice cache: ``slices[i]`` slices per patient, every third slice has foreground."""

    def __init__(self, case_ids: list[str], slices: int = 6):
        self.case_names = case_ids
        self.case_codes = np.repeat(np.arange(len(case_ids)), slices)
        self.has_fg = np.arange(len(self.case_codes)) % 3 == 0

    def rows_for(self, case_ids):
        codes = [self.case_names.index(c) for c in case_ids]
        return np.flatnonzero(np.isin(self.case_codes, codes)).astype(np.int64)


@pytest.mark.parametrize("n", [3, 4, 5, 7, 10, 23, 60])
@pytest.mark.parametrize("seed", range(12))
def test_split_is_disjoint_complete_and_non_empty(n, seed):
    split = split_patients(ids(n), seed)
    sets = [set(split.train), set(split.val), set(split.test)]
    assert all(sets)
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    assert sets[0] | sets[1] | sets[2] == set(ids(n))
    for part in (split.train, split.val, split.test):
        assert list(part) == sorted(part)


@pytest.mark.parametrize(
    ("n", "val", "test", "sizes"),
    [(10, 0.2, 0.2, (6, 2, 2)), (3, 0.2, 0.2, (1, 1, 1)), (20, 0.1, 0.25, (13, 2, 5)), (5, 0.5, 0.45, (1, 2, 2))],
)
def test_split_sizes(n, val, test, sizes):
    split = split_patients(ids(n), seed=0, val_fraction=val, test_fraction=test)
    assert (len(split.train), len(split.val), len(split.test)) == sizes


def test_split_is_frozen_and_ignores_input_order():
    a = split_patients(ids(12), seed=3)
    b = split_patients(list(reversed(ids(12))), seed=3)
    assert a == b
    with pytest.raises(AttributeError):
        a.test = ()  # type: ignore[misc]


@pytest.mark.parametrize("seed", range(10))
def test_test_set_depends_only_on_ids_seed_and_test_fraction(seed):
    tests = {split_patients(ids(30), seed, val_fraction=v).test for v in (0.05, 0.1, 0.2, 0.3, 0.5)}
    assert len(tests) == 1


def test_test_set_unchanged_by_trial_seed_and_fewshot_size():
    split = split_patients(ids(15), seed=4)
    cache = FakeCache(ids(15))
    held_out = set(cache.rows_for(split.test)) | set(cache.rows_for(split.val))
    for trial_seed in range(5):
        for patients, fraction in [(0, 1.0), (1, 1.0), (3, 1.0), (0, 0.1), (0, 0.5)]:
            rows = select_training_rows(cache, split, trial_seed, patients=patients, fraction=fraction)
            assert not held_out & set(rows)
            assert split_patients(ids(15), seed=4).test == split.test


def test_different_seeds_give_different_test_sets():
    assert len({split_patients(ids(20), seed).test for seed in range(10)}) > 1


@pytest.mark.parametrize("n", [0, 1, 2])
def test_too_few_patients(n):
    with pytest.raises(DataError, match="at least 3 patients"):
        split_patients(ids(n), seed=0)


def test_duplicate_ids_and_bad_fractions():
    with pytest.raises(DataError, match="p001"):
        split_patients(["p000", "p001", "p001", "p002"], seed=0)
    with pytest.raises(ConfigError, match="data.val_fraction"):
        split_patients(ids(10), seed=0, val_fraction=0.0)
    with pytest.raises(ConfigError, match="data.test_fraction"):
        split_patients(ids(10), seed=0, test_fraction=1.0)


@pytest.mark.parametrize("seed", range(8))
def test_fewshot_patients_are_nested(seed):
    pool = split_patients(ids(20), seed=0).train
    subsets = [set(fewshot_patients(pool, seed, n)) for n in (1, 2, 5, len(pool))]
    assert [len(s) for s in subsets] == [1, 2, 5, len(pool)]
    assert subsets[0] <= subsets[1] <= subsets[2] <= subsets[3] == set(pool)
    assert fewshot_patients(pool, seed, 0) == tuple(sorted(pool))
    assert fewshot_patients(list(reversed(pool)), seed, 5) == fewshot_patients(pool, seed, 5)


def test_fewshot_patients_depend_on_seed():
    pool = ids(30)
    assert len({fewshot_patients(pool, seed, 3) for seed in range(10)}) > 1


def test_fewshot_patients_errors():
    with pytest.raises(
        ConfigError, match=r"config key 'data.patients' asks for 7 patients but the training pool has 6"
    ):
        fewshot_patients(ids(6), seed=0, n=7)
    with pytest.raises(ConfigError, match="data.patients"):
        fewshot_patients(ids(6), seed=0, n=-1)


@pytest.mark.parametrize("stratify", [False, True])
@pytest.mark.parametrize("seed", range(8))
def test_fewshot_slices_are_nested(seed, stratify):
    rows = np.arange(100, 337)
    has_fg = (rows % 7 == 0) if stratify else None
    subsets = [set(fewshot_slices(rows, seed, f, has_fg=has_fg)) for f in (0.01, 0.1, 0.25, 0.26, 0.5, 1.0)]
    for small, large in zip(subsets[:-1], subsets[1:], strict=True):
        assert small <= large
    assert subsets[-1] == set(rows)
    if not stratify:
        assert [len(s) for s in subsets] == [3, 24, 60, 62, 119, 237]


def test_fewshot_slices_stratified_small_share_has_foreground():
    rows = np.arange(1000)
    has_fg = rows % 50 == 0  # 2 % foreground
    for seed in range(10):
        picked = fewshot_slices(rows, seed, 0.01, has_fg=has_fg)
        assert has_fg[picked].any()
        assert len(picked) == 1 + 10


def test_fewshot_slices_order_and_types():
    rows = np.array([9, 3, 7, 1, 5])
    picked = fewshot_slices(rows, seed=1, fraction=0.01)
    assert picked.dtype == np.int64 and len(picked) == 1 and picked[0] in rows
    assert np.array_equal(fewshot_slices(rows, 1, 0.6), fewshot_slices(rows[::-1], 1, 0.6))
    assert list(fewshot_slices(rows, 1, 1.0)) == [1, 3, 5, 7, 9]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_fewshot_slices_bad_fraction(fraction):
    with pytest.raises(ConfigError, match="data.fraction"):
        fewshot_slices(np.arange(10), seed=0, fraction=fraction)


def test_fewshot_slices_needs_rows():
    with pytest.raises(DataError):
        fewshot_slices(np.array([], dtype=np.int64), seed=0, fraction=0.5)


def test_select_training_rows():
    cache = FakeCache(ids(10))
    split = split_patients(ids(10), seed=1)
    assert isinstance(split, Split)
    everything = select_training_rows(cache, split, seed=0)
    assert np.array_equal(everything, cache.rows_for(split.train))
    one = select_training_rows(cache, split, seed=0, patients=1)
    two = select_training_rows(cache, split, seed=0, patients=2)
    assert len(one) == 6 and set(one) <= set(two) <= set(everything)
    tenth = select_training_rows(cache, split, seed=0, fraction=0.1)
    half = select_training_rows(cache, split, seed=0, fraction=0.5)
    assert set(tenth) <= set(half) <= set(everything)
    assert cache.has_fg[tenth].any()
    with pytest.raises(ConfigError, match="data.patients"):
        select_training_rows(cache, split, seed=0, patients=len(split.train) + 1)
