"""Frozen-backbone feature cache: its layout, key and values, and the checks that refuse a damaged folder."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from lasegseg.errors import DataError
from lasegseg.models.backbones import fingerprint
from lasegseg.train import feature_build as B
from lasegseg.train import features as F
from tests.train.conftest import ALL


def test_layout_key_and_values(built):
    cache, backbone, feats = built
    assert feats.path.parent == cache.path.parent / "features"
    assert feats.path.name == F.feature_key(backbone, cache, "fp32")
    assert feats.path.name.startswith(fingerprint(backbone) + "-")
    manifest = json.loads((feats.path / "manifest.json").read_text())
    assert manifest["slice_cache"] == cache.key and manifest["rows"] == len(cache)
    assert sorted(manifest["files"]) == [f"level_{i}.npy" for i in range(backbone.num_features_levels)]
    assert feats.stored == feats.levels == tuple(manifest["levels"]) == ALL
    assert manifest["blocks"] == backbone.layer_indices
    grid = -(-cache.image_size // backbone.patch_size)
    for level in feats.maps.values():
        assert level.shape == (len(cache), grid, grid, backbone.embed_dim) and level.dtype == np.float16
    rows = np.array([0, 5, 17])
    with torch.no_grad():
        ref = backbone(torch.from_numpy(np.array(cache.images[rows], np.float32))[:, None])
    got = feats.batch(rows, torch.device("cpu"))
    for a, b in zip(got, ref, strict=True):
        assert a.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-3)  # fp16 storage


def test_damaged_file_is_refused_and_rebuilt(built, tmp_path):
    cache, backbone, feats = built
    path = feats.path / "level_0.npy"
    original = path.read_bytes()
    with open(path, "r+b") as fh:  # flip one byte of the data, keep the size
        fh.seek(len(original) - 3)
        fh.write(bytes([original[-3] ^ 0xFF]))
    with pytest.raises(DataError, match="level_0.npy' is corrupt"):
        F.FeatureCache.open(feats.path)
    rebuilt = B.get_or_build_features(backbone, cache, amp="off")
    assert rebuilt.path == feats.path and path.read_bytes() == original
    with open(path, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(DataError, match="truncated or altered"):
        F.FeatureCache.open(feats.path, verify="size")
    B.get_or_build_features(backbone, cache, amp="off", verify="size")
    assert path.read_bytes() == original


def test_the_key_changes_with_the_stored_levels_and_the_precision(built):
    cache, backbone, _ = built
    keys = {F.feature_key(backbone, cache, p, levels) for p in ("fp32", "bf16") for levels in (None, (3,), (0, 3))}
    assert len(keys) == 6
    assert F.feature_key(backbone, cache, "fp32", (3, 0, 1, 2)) == F.feature_key(backbone, cache, "fp32")  # all four


def test_a_folder_under_another_name_or_missing_a_level_file_is_refused(built, tmp_path):
    _, _, feats = built
    moved = tmp_path / "elsewhere"
    shutil.copytree(feats.path, moved)
    with pytest.raises(DataError, match="is for another version or key"):
        F.FeatureCache.open(moved)
    copy = tmp_path / feats.path.name
    shutil.copytree(feats.path, copy)
    assert F.FeatureCache.open(copy).stored == ALL
    (copy / "level_0.npy").unlink()
    with pytest.raises(DataError, match="level_0.npy' is missing"):
        F.FeatureCache.open(copy, verify="size")
