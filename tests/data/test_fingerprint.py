"""Dataset fingerprints and slice-cache keys: content, not location, and the parameters decide the key
(lasegseg.data.fingerprint)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lasegseg.data import fingerprint as fingerprint_mod
from lasegseg.data.fingerprint import cache_key, dataset_fingerprint
from lasegseg.data.preprocess import Preprocessing
from lasegseg.errors import DataError
from tests.data.conftest import SHAPES, SIZE, build, make_case


def test_key_depends_on_params_and_content(tmp_path, dataset):
    root, list_cases, _, calls = dataset
    small, large = build(dataset, tmp_path, image_size=14), build(dataset, tmp_path, image_size=SIZE)
    assert small.key != large.key and small.images.shape[1:] == (14, 14)
    fp = dataset_fingerprint(list_cases(root, ""), "fake", cache_dir=tmp_path)
    keys = {
        cache_key(fp, Preprocessing(SIZE, 0.5, 99.5), "fake"),
        cache_key(fp, Preprocessing(SIZE, 1.0, 99.5), "fake"),
        cache_key(fp, Preprocessing(SIZE, 0.5, 99.0), "fake"),
        cache_key(fp, Preprocessing(SIZE, 0.5, 99.5), "msd"),
        cache_key(fp, Preprocessing(14, 0.5, 99.5), "fake"),
    }
    assert len(keys) == 5 and large.key in keys
    # The same bytes elsewhere share the fingerprint; one changed byte does not.
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert dataset_fingerprint(list_cases(copy, ""), "fake", cache_dir=tmp_path) == fp
    label = copy / "b" / "label.bin"
    label.write_bytes(b"\x01" + label.read_bytes()[1:])
    assert dataset_fingerprint(list_cases(copy, ""), "fake", cache_dir=tmp_path) != fp
    assert dataset_fingerprint(list_cases(root, ""), "other", cache_dir=tmp_path) != fp


def test_keys_of_existing_caches_are_unchanged():
    # Computed with the (image_size, clip_low, clip_high) signature this replaced: old caches stay valid.
    fp = "0" * 64
    assert cache_key(fp, Preprocessing(448, 0.5, 99.5), "msd") == "837f6bf863fe92f7f1fc0727"
    assert cache_key(fp, Preprocessing(28, 1, 99), "generic") == "5acbb164ef152120e849907a"


def test_fingerprint_of_paths_and_in_memory_cases(tmp_path, cases):
    root = tmp_path / "d"
    (root / "sub").mkdir(parents=True)
    (root / "x.nii").write_bytes(b"x")
    (root / "sub" / "y.nii").write_bytes(b"y")
    fp = dataset_fingerprint(fingerprint_mod.dataset_files(root), cache_dir=tmp_path)
    assert fp == dataset_fingerprint([root / "sub" / "y.nii", str(root / "x.nii")], cache_dir=tmp_path)
    (root / "sub" / "y.nii").rename(root / "sub" / "z.nii")
    assert dataset_fingerprint(fingerprint_mod.dataset_files(root), cache_dir=tmp_path) != fp
    assert dataset_fingerprint(cases, cache_dir=tmp_path) == dataset_fingerprint(cases, cache_dir=tmp_path)
    changed = make_case("a", SHAPES["a"], 1)
    assert dataset_fingerprint([changed, *cases[1:]], cache_dir=tmp_path) != dataset_fingerprint(
        cases, cache_dir=tmp_path
    )
    with pytest.raises(DataError, match="missing.nii"):
        dataset_fingerprint([root / "missing.nii"], cache_dir=tmp_path)


def test_file_digests_are_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    data = tmp_path / "d" / "x.nii"
    data.parent.mkdir()
    data.write_bytes(b"scan")
    fp = dataset_fingerprint([data], cache_dir=tmp_path / "c")
    hashed = []
    real = fingerprint_mod.sha256_file
    monkeypatch.setattr(fingerprint_mod, "sha256_file", lambda p: hashed.append(Path(p)) or real(p))
    assert dataset_fingerprint([data], cache_dir=tmp_path / "c") == fp and hashed == []
    later = data.stat().st_mtime_ns + 10**9
    os.utime(data, ns=(later, later))  # touched, same bytes: hashed again, the same fingerprint
    assert dataset_fingerprint([data], cache_dir=tmp_path / "c") == fp and hashed == [data]
    (tmp_path / "c" / "file_hashes.json").write_text("{damaged")  # only costs rehashing
    assert dataset_fingerprint([data], cache_dir=tmp_path / "c") == fp and hashed == [data, data]


def test_duplicate_entries_and_unknown_items_are_refused(tmp_path, cases):
    with pytest.raises(DataError, match="lists 'a/arrays' twice"):
        dataset_fingerprint([cases[0], cases[0]], cache_dir=tmp_path)
    with pytest.raises(TypeError, match="cannot fingerprint int"):
        dataset_fingerprint([3], cache_dir=tmp_path)
