"""What a trial reads: its few-shot rows, its device, and whether it trains on cached features."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from lasegseg.train.checkpoint import load_model
from lasegseg.train.evaluation import evaluate
from lasegseg.train.trial import run_trial
from lasegseg.train.trial_data import TrialData, pick_device, prepare_data
from tests.train.conftest import features_cfg, trial_cfg


def test_few_shot_rows_follow_the_config(phantom_dir):
    data = prepare_data(trial_cfg(phantom_dir, **{"data.patients": 2}))
    patients = np.unique(data.cache.case_codes[data.train_rows])
    assert patients.size == 2
    everything = prepare_data(trial_cfg(phantom_dir))
    assert set(data.train_rows) < set(everything.train_rows)
    assert isinstance(data, TrialData)


def test_frozen_results_agree_with_and_without_the_cache(phantom_dir, tmp_path):
    cfg = features_cfg(
        phantom_dir, **{"train.epochs": 4, "model.decoder": "conv", "model.decoder_width": 8, "optim.lr": 1e-2}
    )
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
    cfg = features_cfg(phantom_dir, **{"train.epochs": 1, "train.augment": "spatial", "model.decoder": "linear"})
    with caplog.at_level(logging.WARNING, logger="lasegseg.train.trial_data"):
        results = run_trial(cfg)
    assert not results["feature_cache"]
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("feature cache off: spatial augmentation changes the backbone input every epoch") == 1
    assert np.isfinite(results["history"][0]["train_loss"])


def test_pick_device_takes_the_one_asked_for_else_cuda_when_there_is_one(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device() == torch.device("cuda")


def test_a_cache_of_another_image_size_is_refused(phantom_dir):
    cache = prepare_data(trial_cfg(phantom_dir)).cache
    with pytest.raises(ValueError, match="cache image size 42 != data.image_size 28"):
        prepare_data(trial_cfg(phantom_dir, **{"data.image_size": 28}), cache=cache)
