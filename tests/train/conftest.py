"""Shared set-up of the feature-cache tests: a frozen trial's config on the phantom, the tiny backbone's features
over its slices, and slice caches of their own for tests that must start with no features."""

from __future__ import annotations

from pathlib import Path

import pytest

from lasegseg.config import Config
from lasegseg.train.feature_build import get_or_build_features
from lasegseg.train.features import features_root
from lasegseg.train.trial_data import prepare_data

ALL = (0, 1, 2, 3)  # the tiny backbone taps four blocks
LAST = (3,)


def trial_cfg(phantom_dir, **flat) -> Config:
    """A 2-epoch frozen linear trial on the phantom at 42 px; ``flat`` overrides."""
    base = {
        "data.path": str(phantom_dir),
        "data.image_size": 42,
        "train.epochs": 2,
        "train.batch_size": 16,
        "model.decoder": "linear",
        "model.mode": "frozen",
        "optim.lr": 1e-3,
    }
    return Config().replace(**{**base, **flat})


def features_cfg(phantom_dir, **flat) -> Config:
    """A frozen multiscale trial on the phantom, small enough for the CPU; ``flat`` overrides."""
    base = {
        "data.path": str(phantom_dir), "data.image_size": 42, "train.epochs": 2, "train.batch_size": 16,
        "model.decoder": "multiscale", "model.mode": "frozen", "optim.lr": 3e-3, "model.decoder_width": 16,
    }  # fmt: skip
    return Config().replace(**{**base, **flat})


@pytest.fixture(scope="module")
def built(phantom_dir):
    """The phantom's slice cache, the tiny backbone, and its features over every level."""
    from lasegseg.models.segmenter import load_backbone

    data = prepare_data(features_cfg(phantom_dir))
    backbone = load_backbone("tiny").requires_grad_(False)
    return data.cache, backbone, get_or_build_features(backbone, data.cache, amp="off")


def fresh_cache(phantom_dir, tmp_path, monkeypatch):
    """A slice cache in a cache folder of its own, so that no feature cache exists yet."""
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    return prepare_data(features_cfg(phantom_dir)).cache


def feature_folders(cache) -> list[Path]:
    return sorted(p for p in features_root(cache).iterdir() if not p.name.startswith("."))
