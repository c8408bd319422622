"""Opening the slice cache of a dataset, building it on first use: a second run reads no volume, a damaged cache
is rebuilt, the default readers build from NIfTI files (lasegseg.data.cache)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from lasegseg.config import Config
from lasegseg.data import cache_read, cache_workers, cache_write
from lasegseg.data import fingerprint as fingerprint_mod
from lasegseg.data.cache import get_or_build_cache, open_cache
from lasegseg.data.cache_read import SliceCache
from lasegseg.errors import DataError
from lasegseg.paths import cache_root
from tests.data.conftest import PREP, SIZE, build, write_generic


def test_second_run_reads_no_volume_and_rehashes_nothing(tmp_path, dataset, monkeypatch):
    root, _, _, calls = dataset
    first = build(dataset, tmp_path / "cache")
    assert calls == ["fake"]
    assert (tmp_path / "cache" / "file_hashes.json").is_file()
    hashed = []
    real = cache_read.sha256_file
    for module in (cache_read, cache_write, fingerprint_mod):
        monkeypatch.setattr(module, "sha256_file", lambda p: hashed.append(Path(p)) or real(p))
    second = build(dataset, tmp_path / "cache")
    assert calls == ["fake"]
    assert second.key == first.key and np.array_equal(second.images, first.images)
    assert not [p for p in hashed if root in p.parents]  # only the cache's own files were verified


@pytest.mark.faults
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_cache_is_detected_and_rebuilt(tmp_path, dataset, damage, caplog):
    _, _, _, calls = dataset
    good = build(dataset, tmp_path)
    images = np.array(good.images)
    slices = good.path / "slices.arrow"
    del good
    data = bytearray(slices.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    slices.write_bytes(bytes(data))
    with pytest.raises(DataError, match="slices.arrow"):
        SliceCache.open(slices.parent)
    with caplog.at_level(logging.WARNING, logger="lasegseg.data.cache"):
        rebuilt = build(dataset, tmp_path)
    assert calls == ["fake", "fake"]
    assert "slices.arrow" in caplog.text
    assert np.array_equal(rebuilt.images, images)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_shared_cache_files_are_readable_like_the_arrow_files(tmp_path, dataset):
    old = os.umask(0o022)
    try:
        cache = build(dataset, tmp_path)
    finally:
        os.umask(old)
    for path in (cache.path / "slices.arrow", cache.path / "manifest.json", tmp_path / "file_hashes.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
    params = json.loads((cache.path / "manifest.json").read_text())["params"]
    assert {k: params[k] for k in ("image_size", "clip_low", "clip_high")} == PREP.as_dict()


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path / "env"))
    assert cache_root() == cache_root("") == tmp_path / "env"
    assert cache_root(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv("LASEGSEG_CACHE")
    assert cache_root() == Path(os.path.expanduser("~")) / ".cache" / "lasegseg"


def test_default_readers_build_from_a_nifti_dataset(tmp_path, cases, monkeypatch):
    layouts = pytest.importorskip("lasegseg.data.layouts")
    root = write_generic(tmp_path, cases)
    loads = []
    real = layouts.load_case
    monkeypatch.setattr(layouts, "load_case", lambda case: loads.append(case.case_id) or real(case))
    monkeypatch.setenv(cache_workers.WORKERS_ENV, "1")  # loads counted in this process
    first = get_or_build_cache(root, "generic", PREP, cache_dir=tmp_path / "cache")
    assert loads == ["a", "b", "c"] and first.cases == ["a", "b", "c"]
    for c in cases:
        assert np.array_equal(first.native_label(c.case_id), c.label)
    second = get_or_build_cache(root, "generic", PREP, cache_dir=tmp_path / "cache")
    assert loads == ["a", "b", "c"] and second.key == first.key


def test_open_cache_follows_the_config_and_resolves_auto(tmp_path, cases):
    root = write_generic(tmp_path, cases)
    flat = {"data.path": str(root), "data.image_size": SIZE, "data.cache_dir": str(tmp_path / "cache")}
    cache = open_cache(Config().replace(**flat))
    assert cache.image_size == SIZE and cache.cases == ["a", "b", "c"]
    explicit = get_or_build_cache(root, "generic", PREP, tmp_path / "cache")
    assert explicit.key == cache.key  # "auto" and the detected layout share one cache
    assert open_cache(Config().replace(**flat, **{"data.layout": "generic"})).key == cache.key


def test_default_loader_reports_every_bad_file(tmp_path, cases):
    root = write_generic(tmp_path, cases)
    for cid in ("a", "c"):
        (root / "labels" / f"{cid}.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=r"(?s)a\.nii\.gz.*c\.nii\.gz"):
        get_or_build_cache(root, "generic", PREP, cache_dir=tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["file_hashes.json"]


def test_stats_say_whether_this_call_built_the_cache(tmp_path, dataset):
    first, second = {}, {}
    built = build(dataset, tmp_path, stats=first)
    assert build(dataset, tmp_path, stats=second, verify="size").key == built.key
    assert first == {"built": True} and second == {}
