"""Sweep planning: which trials train on cached features and which feature slot each reads."""

from __future__ import annotations

import pytest

from lasegseg.config import Config
from lasegseg.train import feature_build as B
from lasegseg.train import feature_plan as P
from tests.train.conftest import ALL, LAST


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
    picked = P.distinct_frozen_backbones(trials)
    assert [(t["model.decoder"], t["model.registers"]) for t in picked] == [("linear", False), ("multiscale", True)]
    assert P.feature_slot(trials[0]) == P.feature_slot(trials[1]) != P.feature_slot(trials[5])
    readers = P.slot_readers(trials)
    assert readers == {P.feature_slot(trials[0]): ("conv", "linear"), P.feature_slot(trials[5]): ("multiscale",)}
    assert B.levels_read(readers[P.feature_slot(trials[0])], 4) == LAST
    assert B.levels_read(("linear", "multiscale"), 4) == ALL


def test_a_feature_slot_names_the_backbone_and_the_preprocessing_of_its_slices():
    flat = Config().to_flat()
    assert P.PREPROCESSING_KEYS == ("data.image_size", "data.clip_low", "data.clip_high")
    assert P.feature_slot(flat) == "tiny|False|auto|448|0.5|99.5"
    assert P.feature_slot({**flat, "model.registers": True, "train.amp": "off"}) == "tiny|True|off|448|0.5|99.5"
    for key in P.PREPROCESSING_KEYS:  # slices made otherwise get features of their own
        assert P.feature_slot({**flat, key: 7}) != P.feature_slot(flat)
    assert P.feature_slot({**flat, "model.decoder": "conv", "optim.lr": 0.5, "seed": 3}) == P.feature_slot(flat)
    assert P.feature_slot({"model.backbone": "tiny"}) == "tiny|False|auto|"  # keys it lacks are left out


@pytest.mark.parametrize(
    ("flat", "cached"),
    [
        ({"model.mode": "frozen"}, True),
        ({"model.mode": "finetune"}, False),
        ({"model.mode": "lora"}, False),
        ({"model.mode": "frozen", "train.augment": "flip"}, False),
        ({"model.mode": "frozen", "train.feature_cache": False}, False),
    ],
)
def test_a_config_and_its_flat_view_use_the_feature_cache_alike(flat, cached):
    cfg = Config().replace(**flat)
    assert P.uses_feature_cache(cfg) is P.uses_feature_cache(cfg.to_flat()) is cached
    assert not P.uses_feature_cache({**cfg.to_flat(), "model.backbone": "none"})  # no backbone, nothing to cache
