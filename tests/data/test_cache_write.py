"""Building a slice cache folder: failed builds leave nothing, concurrent builders keep one cache, the manifest
records the files, and stale temporary folders go (lasegseg.data.cache_write)."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from lasegseg.data.cache_read import SliceCache
from lasegseg.data.cache_write import build_cache
from lasegseg.errors import DataError
from lasegseg.fsio import sha256_file
from tests.data.conftest import PREP, make_case


def test_build_errors(tmp_path, cases):
    bad = make_case("bad", (10, 10, 3), 0)
    bad.label = bad.label[:, :, :2]
    with pytest.raises(DataError, match="'bad'"):
        build_cache([cases[0], bad], tmp_path, "k1", PREP)
    with pytest.raises(DataError, match="duplicate"):
        build_cache([cases[0], cases[0]], tmp_path, "k1", PREP)
    with pytest.raises(DataError, match="empty"):
        build_cache([], tmp_path, "k1", PREP)
    assert list(tmp_path.iterdir()) == []  # failed builds leave neither a cache nor a temporary folder


def test_concurrent_builders_keep_one_valid_cache(tmp_path, cases):
    first = build_cache(cases, tmp_path, "k1", PREP)
    manifest = (first / "manifest.json").read_text()
    assert build_cache(cases[:1], tmp_path, "k1", PREP) == first  # the loser discards its own build
    assert (first / "manifest.json").read_text() == manifest
    results, errors = [], []

    def run():
        try:
            results.append(build_cache(lambda: iter(cases), tmp_path, "k2", PREP))
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(results)) == 1
    assert len(SliceCache.open(results[0])) == len(SliceCache.open(first))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k1", "k2"]


def test_a_folder_in_the_way_without_a_manifest_fails_the_build_and_is_kept(tmp_path, cases):
    (tmp_path / "k1").mkdir()
    (tmp_path / "k1" / "stray").write_text("not a cache")
    with pytest.raises(OSError):
        build_cache(cases, tmp_path, "k1", PREP)
    assert [p.name for p in tmp_path.iterdir()] == ["k1"]  # no temporary folder left behind
    assert [p.name for p in (tmp_path / "k1").iterdir()] == ["stray"]


def test_manifest_records_the_files_and_the_preprocessing_wins_over_meta(tmp_path, cases):
    path = build_cache(cases, tmp_path, "k1", PREP, meta={"layout": "fake", "image_size": 999})
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["key"] == "k1" and manifest["params"] == {"layout": "fake", **PREP.as_dict()}
    assert manifest["files"]["cases.arrow"]["rows"] == len(cases) == len(manifest["cases"])
    for name in ("slices.arrow", "cases.arrow"):
        record = manifest["files"][name]
        assert record["bytes"] == (path / name).stat().st_size and record["sha256"] == sha256_file(path / name)


def test_temporary_folders_of_crashed_builders_go_after_a_day(tmp_path, cases):
    names = [".tmp-k0-1-aaaa", ".trash-k0-bbbb", ".tmp-k0-2-young", ".tool-old"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "part").write_bytes(b"x")
    day_ago = time.time() - 24 * 3600 - 60
    for name in (".tmp-k0-1-aaaa", ".trash-k0-bbbb", ".tool-old"):
        os.utime(tmp_path / name, (day_ago, day_ago))
    build_cache(cases, tmp_path, "k1", PREP)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-k0-2-young", ".tool-old", "k1"]
