"""Opening a slice cache: the memory-mapped arrays, per-case lookups and the checks against the manifest
(lasegseg.data.cache_read)."""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from lasegseg.data.cache_read import SliceCache
from lasegseg.data.cache_write import build_cache
from lasegseg.data.fingerprint import CACHE_VERSION
from lasegseg.data.preprocess import preprocess_case
from lasegseg.errors import DataError
from tests.data.conftest import PREP, SIZE


def test_build_then_open_roundtrip(tmp_path, cases):
    path = build_cache(cases, tmp_path, "k1", PREP, meta={"layout": "fake"})
    assert sorted(p.name for p in path.iterdir()) == ["cases.arrow", "manifest.json", "slices.arrow"]
    assert [p.name for p in tmp_path.iterdir()] == ["k1"]  # no temporary folder left behind
    cache = SliceCache.open(path)
    expected = [preprocess_case(c, PREP) for c in cases]
    assert cache.key == "k1" and cache.image_size == SIZE and len(cache) == sum(c.image.shape[2] for c in cases)
    assert np.array_equal(cache.images, np.concatenate([e[0] for e in expected]))
    assert np.array_equal(cache.labels, np.concatenate([e[1] for e in expected]))
    assert cache.cases == cache.case_names == ["a", "b", "c"]
    assert list(cache.case_ids) == [c.case_id for c in cases for _ in range(c.image.shape[2])]
    assert np.array_equal(cache.slice_index, np.concatenate([np.arange(c.image.shape[2]) for c in cases]))
    assert np.array_equal(cache.has_fg, cache.labels.reshape(len(cache), -1).any(1))
    assert not cache.has_fg[0] and cache.has_fg[1]
    for c in cases:
        rows = cache.rows_for([c.case_id])
        assert np.array_equal(cache.case_ids[rows], [c.case_id] * c.image.shape[2])
        native = cache.native_label(c.case_id)
        assert native.dtype == bool and np.array_equal(native, c.label)
        assert cache.native_shape(c.case_id) == c.image.shape
        assert cache.spacing(c.case_id) == pytest.approx(c.spacing)
        assert np.array_equal(cache.affine(c.case_id), c.affine)
    assert np.array_equal(cache.rows_for(["c", "a"]), np.concatenate([cache.rows_for("a"), cache.rows_for("c")]))
    with pytest.raises(DataError, match="'zz'"):
        cache.rows_for(["zz"])
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["version"] == CACHE_VERSION and manifest["cases"] == ["a", "b", "c"]
    assert manifest["rows"] == manifest["files"]["slices.arrow"]["rows"] == len(cache)
    assert manifest["params"]["layout"] == "fake" and manifest["params"]["image_size"] == SIZE


def test_views_are_memory_mapped_and_read_only(tmp_path, cases):
    path = build_cache(cases, tmp_path, "k1", PREP)
    before = pa.total_allocated_bytes()
    cache = SliceCache.open(path)
    # Zero-copy: opening allocates nothing from Arrow's pool and the arrays do not own their memory.
    assert pa.total_allocated_bytes() - before < 1024
    for arr in (cache.images, cache.labels, cache.case_codes, cache.slice_index):
        assert not arr.flags.owndata and not arr.flags.writeable
        base = arr
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base, pa.Buffer)
    assert np.shares_memory(cache.images[3], cache.images)
    with pytest.raises(ValueError):
        cache.images[0, 0, 0] = 1


def test_pickle_reopens_by_path(tmp_path, cases):
    cache = SliceCache.open(build_cache(cases, tmp_path, "k1", PREP))
    clone = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 1000
    assert clone.path == cache.path and np.array_equal(clone.images, cache.images)


@pytest.mark.faults
def test_damaged_manifest_is_detected(tmp_path, cases):
    path = build_cache(cases, tmp_path, "k1", PREP)
    (path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="manifest.json"):
        SliceCache.open(path)
    shutil.rmtree(path)
    with pytest.raises(DataError, match="manifest.json"):
        SliceCache.open(path)


@pytest.mark.faults
def test_the_size_check_finds_truncation_and_only_the_full_check_a_flipped_byte(tmp_path, cases):
    path = build_cache(cases, tmp_path, "k1", PREP)
    slices = path / "slices.arrow"
    data = bytearray(slices.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the image buffer: same size, same schema
    slices.write_bytes(bytes(data))
    assert len(SliceCache.open(path, verify="size")) == sum(c.image.shape[2] for c in cases)
    with pytest.raises(DataError, match=r"slices\.arrow' is corrupt: its sha256 does not match"):
        SliceCache.open(path)
    slices.write_bytes(bytes(data[:-10]))
    with pytest.raises(DataError, match=r"slices\.arrow' is truncated or altered: \d+ bytes, manifest says \d+"):
        SliceCache.open(path, verify="size")


@pytest.mark.faults
def test_a_manifest_of_another_key_or_version_or_a_missing_file_is_refused(tmp_path, cases):
    path = build_cache(cases, tmp_path, "k1", PREP)
    manifest = json.loads((path / "manifest.json").read_text())
    moved = path.rename(tmp_path / "k2")
    with pytest.raises(DataError, match="is for key 'k1', not 'k2'"):
        SliceCache.open(moved)
    (moved / "manifest.json").write_text(json.dumps(manifest | {"key": "k2", "version": CACHE_VERSION + 1}))
    with pytest.raises(DataError, match=f"has version {CACHE_VERSION + 1}, expected {CACHE_VERSION}"):
        SliceCache.open(moved)
    (moved / "manifest.json").write_text(json.dumps(manifest | {"key": "k2"}))
    assert SliceCache.open(moved).key == "k2"
    (moved / "cases.arrow").unlink()
    with pytest.raises(DataError, match=r"cases\.arrow' is missing"):
        SliceCache.open(moved)


def test_lookups_of_unknown_cases_name_them(tmp_path, cases):
    cache = SliceCache.open(build_cache(cases, tmp_path, "k1", PREP))
    assert cache.rows_for([]).dtype == np.int64 and len(cache.rows_for([])) == 0
    for lookup in (cache.native_label, cache.native_shape, cache.spacing, cache.affine):
        with pytest.raises(DataError, match=f"case 'zz' is not in slice cache {cache.path}"):
            lookup("zz")
    assert repr(cache) == f"SliceCache('{cache.path}', cases=3, slices={len(cache)}, size={SIZE})"


def test_opening_a_cache_needs_neither_nibabel_nor_pynrrd():
    code = "import sys, lasegseg.data.cache_read; print(sorted({'nibabel', 'nrrd', 'torch'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
