"""Frozen-backbone feature cache: layout, reuse, damage, locking, and trials trained on it."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest
import torch

from lasegseg.config import Config
from lasegseg.errors import DataError
from lasegseg.models.backbones import fingerprint
from lasegseg.train import features as F
from lasegseg.train.checkpoint import load_model
from lasegseg.train.trial import evaluate, prepare_data, run_trial


def _cfg(phantom_dir, **flat):
    base = {
        "data.path": str(phantom_dir), "data.image_size": 42, "train.epochs": 2, "train.batch_size": 16,
        "model.decoder": "multiscale", "model.mode": "frozen", "optim.lr": 3e-3, "model.decoder_width": 16,
    }  # fmt: skip
    return Config().replace(**{**base, **flat})


@pytest.fixture(scope="module")
def built(phantom_dir):
    from lasegseg.models.segmenter import load_backbone

    data = prepare_data(_cfg(phantom_dir))
    backbone = load_backbone("tiny").requires_grad_(False)
    return data.cache, backbone, F.get_or_build_features(backbone, data.cache, amp="off")


def test_layout_key_and_values(built):
    cache, backbone, feats = built
    assert feats.path.parent == cache.path.parent / "features"
    assert feats.path.name == F.feature_key(backbone, cache, "fp32")
    assert feats.path.name.startswith(fingerprint(backbone) + "-")
    manifest = json.loads((feats.path / "manifest.json").read_text())
    assert manifest["slice_cache"] == cache.key and manifest["rows"] == len(cache)
    assert sorted(manifest["files"]) == [f"level_{i}.npy" for i in range(backbone.num_features_levels)]
    grid = -(-cache.image_size // backbone.patch_size)
    for level in feats.levels:
        assert level.shape == (len(cache), grid, grid, backbone.embed_dim) and level.dtype == np.float16
    rows = np.array([0, 5, 17])
    with torch.no_grad():
        ref = backbone(torch.from_numpy(np.array(cache.images[rows], np.float32))[:, None])
    got = feats.batch(rows, torch.device("cpu"))
    for a, b in zip(got, ref, strict=True):
        assert a.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-3)  # fp16 storage


def test_second_call_reuses_the_folder(built, monkeypatch):
    cache, backbone, feats = built
    monkeypatch.setattr(F, "build_features", lambda *a, **k: pytest.fail("rebuilt a valid cache"))
    again = F.get_or_build_features(backbone, cache, amp="off")
    assert again.path == feats.path and again.matches(backbone, cache)


def test_damaged_file_is_refused_and_rebuilt(built, tmp_path):
    cache, backbone, feats = built
    path = feats.path / "level_0.npy"
    original = path.read_bytes()
    with open(path, "r+b") as fh:  # flip one byte of the data, keep the size
        fh.seek(len(original) - 3)
        fh.write(bytes([original[-3] ^ 0xFF]))
    with pytest.raises(DataError, match="level_0.npy' is corrupt"):
        F.FeatureCache.open(feats.path)
    rebuilt = F.get_or_build_features(backbone, cache, amp="off")
    assert rebuilt.path == feats.path and path.read_bytes() == original
    with open(path, "ab") as fh:
        fh.write(b"x")
    with pytest.raises(DataError, match="truncated or altered"):
        F.FeatureCache.open(feats.path, verify="size")
    F.get_or_build_features(backbone, cache, amp="off", verify="size")
    assert path.read_bytes() == original


def test_concurrent_builders_build_once(phantom_dir, tmp_path, monkeypatch):
    from lasegseg.models.segmenter import load_backbone

    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))  # a fresh slice cache → no features yet
    cache = prepare_data(_cfg(phantom_dir)).cache
    backbone = load_backbone("tiny").requires_grad_(False)
    calls, real = [], F.build_features
    monkeypatch.setattr(F, "build_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    out: list = []
    threads = [threading.Thread(target=lambda: out.append(F.get_or_build_features(backbone, cache, amp="off")))
               for _ in range(3)]  # fmt: skip
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({f.path for f in out}) == 1


def test_frozen_results_agree_with_and_without_the_cache(phantom_dir, tmp_path):
    cfg = _cfg(phantom_dir, **{"train.epochs": 4, "model.decoder": "conv", "model.decoder_width": 8, "optim.lr": 1e-2})
    cached = run_trial(cfg, tmp_path / "cached")
    plain = run_trial(cfg.replace(**{"train.feature_cache": False}))
    assert cached["feature_cache"] and not plain["feature_cache"]
    assert plain["val_dice"] > 0.2 and plain["test_dice_mean"] > 0.2  # a model that learned something
    # Frozen features are fp16-rounded on both paths, so training sees the same numbers.
    for a, b in zip(cached["history"], plain["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert cached["val_dice"] == pytest.approx(plain["val_dice"], abs=1e-4)
    assert cached["test_dice_mean"] == pytest.approx(plain["test_dice_mean"], abs=1e-4)
    # The model folder is like any other: decoder weights + backbone fingerprint; it predicts without the cache.
    model, cfg2, _ = load_model(tmp_path / "cached" / "model")
    data = prepare_data(cfg2)
    rows = evaluate(model, data.cache, data.split.test, device="cpu", amp="off", batch_size=8, full=True)
    assert np.mean([r["dice"] for r in rows]) == pytest.approx(cached["test_dice_mean"], abs=1e-4)


def test_spatial_augmentation_turns_the_cache_off(phantom_dir, caplog):
    cfg = _cfg(phantom_dir, **{"train.epochs": 1, "train.augment": "spatial", "model.decoder": "linear"})
    with caplog.at_level(logging.WARNING, logger="lasegseg.train.trial"):
        results = run_trial(cfg)
    assert not results["feature_cache"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("feature cache off: spatial augmentation changes the backbone input every epoch") == 1
    assert np.isfinite(results["history"][0]["train_loss"])


def test_sweep_helpers_pick_one_cache_per_frozen_backbone():
    base = Config().to_flat()
    trials = [
        {**base, "model.mode": "frozen", "model.decoder": "linear"},
        {**base, "model.mode": "frozen", "model.decoder": "conv"},
        {**base, "model.mode": "finetune"},
        {**base, "model.mode": "frozen", "train.augment": "flip"},
        {**base, "model.mode": "frozen", "train.feature_cache": False},
        {**base, "model.mode": "frozen", "model.registers": True},
    ]
    picked = F.distinct_frozen_backbones(trials)
    assert [(t["model.decoder"], t["model.registers"]) for t in picked] == [("linear", False), ("multiscale", True)]
    assert F.feature_slot(trials[0]) == F.feature_slot(trials[1]) != F.feature_slot(trials[5])
