"""A frozen trial on a sweep's cached features decodes them without loading its backbone (BackboneStub)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lasegseg.config import Config
from lasegseg.errors import ModelError
from lasegseg.models import segmenter as S
from lasegseg.models.backbones import BackboneStub
from lasegseg.models.sources import backbone_source
from lasegseg.train import features as F
from lasegseg.train.checkpoint import load_model
from lasegseg.train.feature_build import get_or_build_features
from lasegseg.train.trial import run_trial
from lasegseg.train.trial_data import prepare_data


def _cfg(phantom_dir, **flat):
    base = {
        "data.path": str(phantom_dir), "data.image_size": 42, "train.epochs": 2, "train.batch_size": 16,
        "model.decoder": "conv", "model.mode": "frozen", "optim.lr": 3e-3, "model.decoder_width": 16,
    }  # fmt: skip
    return Config().replace(**{**base, **flat})


@pytest.fixture(scope="module")
def given(phantom_dir):
    """The slice cache and the features a sweep driver hands its frozen trials (every level)."""
    data = prepare_data(_cfg(phantom_dir))
    backbone = S.load_backbone("tiny").requires_grad_(False)
    return data.cache, get_or_build_features(backbone, data.cache, amp="off"), backbone


def _data(cfg, cache, features):
    data = prepare_data(cfg, cache=cache)
    data.features = features
    return data


def test_frozen_trial_on_given_features_never_loads_its_backbone(given, phantom_dir, tmp_path, monkeypatch):
    cache, feats, backbone = given
    cfg = _cfg(phantom_dir)

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was loaded")

    monkeypatch.setattr(S, "load_backbone", refuse)
    timings: dict = {}
    stubbed = run_trial(cfg, tmp_path / "stub", data=_data(cfg, cache, feats), timings=timings)
    assert timings["backbone_loaded"] is False and timings["feature_cache"]
    assert (tmp_path / "stub" / "overlays.png").stat().st_size > 0
    monkeypatch.undo()

    # The same trial with the backbone loaded (no features handed over: it finds the same cache) trains the same.
    full_timings: dict = {}
    full = run_trial(cfg, tmp_path / "full", data=_data(cfg, cache, None), timings=full_timings)
    assert full_timings["backbone_loaded"] is True
    assert [r["dice"] for r in full["per_patient"]] == [r["dice"] for r in stubbed["per_patient"]]
    a = (tmp_path / "stub" / "model" / "model.safetensors").read_bytes()
    b = (tmp_path / "full" / "model" / "model.safetensors").read_bytes()
    assert a == b
    meta = json.loads((tmp_path / "stub" / "model" / "config.json").read_text())
    assert meta["backbone_fingerprint"] == backbone.source_fingerprint

    # The exported model loads its real backbone (fingerprint checked) and runs end to end.
    model, _, _ = load_model(tmp_path / "stub" / "model")
    with torch.inference_mode():
        out = model(torch.from_numpy(np.asarray(cache.images[:2], np.float32))[:, None])
    assert out.shape == (2, 2, 42, 42)


def test_the_backbone_is_loaded_when_the_features_cannot_serve(given, phantom_dir, tmp_path):
    cache, feats, _ = given
    # Augmentation changes the backbone input every epoch: no cache, so the backbone runs.
    cfg = _cfg(phantom_dir, **{"train.augment": "flip", "train.epochs": 1})
    timings: dict = {}
    run_trial(cfg, data=_data(cfg, cache, feats), timings=timings)
    assert timings["backbone_loaded"] is True and not timings["feature_cache"]
    # A cache written before the backbone's shape was recorded in manifests.
    old = F.FeatureCache(feats.path, {k: v for k, v in feats.manifest.items() if k != "embed_dim"}, feats.levels)
    cfg = _cfg(phantom_dir, **{"train.epochs": 1})
    timings = {}
    run_trial(cfg, data=_data(cfg, cache, old), timings=timings)
    assert timings["backbone_loaded"] is True and timings["feature_cache"]


def test_a_stub_refuses_to_run_and_serves_frozen_models_only(given):
    _, feats, backbone = given
    m = feats.manifest
    stub = BackboneStub(
        source=m["backbone_source"], family=m["family"], embed_dim=m["embed_dim"], patch_size=m["patch_size"],
        layer_indices=m["layer_indices"], source_fingerprint=m["backbone_fingerprint"],
    )  # fmt: skip
    assert m["backbone_source"] == backbone_source("tiny") == backbone.source
    assert (stub.embed_dim, stub.patch_size, stub.layer_indices) == (
        backbone.embed_dim, backbone.patch_size, backbone.layer_indices
    )  # fmt: skip
    assert list(stub.parameters()) == []
    model = S.build_segmenter(Config().replace(**{"model.mode": "frozen", "model.decoder": "linear"}).model,
                              backbone=stub)  # fmt: skip
    with pytest.raises(ModelError, match="was not loaded: this frozen model decodes cached features only"):
        model(torch.zeros(1, 1, 42, 42))
    with pytest.raises(ModelError, match="frozen models only, not mode 'finetune'"):
        S.build_segmenter(Config().replace(**{"model.mode": "finetune"}).model, backbone=stub)
