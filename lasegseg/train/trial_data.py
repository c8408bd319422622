"""What a trial trains and evaluates on: the slice cache, the patient split, its few-shot rows, its device, and the
cached backbone features (or a weightless backbone stand-in) a frozen trial reads. Pure compute: no ray, no mlflow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lasegseg.config import Config, frozen_backbone
from lasegseg.data.cache import open_cache
from lasegseg.data.splits import select_training_rows, split_patients
from lasegseg.models.backbones import BackboneStub
from lasegseg.models.decoders import decoder_levels
from lasegseg.models.sources import backbone_source
from lasegseg.train.feature_build import get_or_build_features, levels_read
from lasegseg.train.feature_plan import uses_feature_cache
from lasegseg.train.feature_residency import for_training
from lasegseg.train.features import FeatureCache, compute_precision

logger = logging.getLogger(__name__)


@dataclass
class TrialData:
    """The cached slices and the patient split a trial trains and evaluates on.

    Args:
        cache: the slice cache.
        split: the patient split.
        train_rows: this trial's few-shot training rows.
        features: frozen-backbone features over the cache (a sweep driver builds them once); used when they fit and
            hold the levels the trial's decoder reads.
        feature_readers: the decoders of every trial that reads this backbone's features (a sweep's); a trial that
            has to build them builds the levels all of them read, so that none builds again.
        device_share: the share of its GPU this trial may fill (its Ray GPU fraction when trials are packed on one
            card; 1 alone), which bounds the training features it holds there.
    """

    cache: Any
    split: Any
    train_rows: np.ndarray
    features: FeatureCache | None = None
    feature_readers: tuple[str, ...] = ()
    device_share: float = 1.0


def prepare_data(cfg: Config, cache: Any = None) -> TrialData:
    """Open (or reuse) the cache, split patients, and pick this trial's few-shot training rows."""
    if cache is None:
        cache = open_cache(cfg)
    if cache.image_size != cfg.data.image_size:
        raise ValueError(f"cache image size {cache.image_size} != data.image_size {cfg.data.image_size}")
    split = split_patients(cache.cases, cfg.data.split_seed, cfg.data.val_fraction, cfg.data.test_fraction)
    rows = select_training_rows(cache, split, cfg.seed, patients=cfg.data.patients, fraction=cfg.data.fraction)
    return TrialData(cache=cache, split=split, train_rows=np.asarray(rows))


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device``, or CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def trial_features(
    cfg: Config, model, data: TrialData, device: torch.device, stats: dict[str, Any] | None = None
) -> FeatureCache | None:
    """The cached features this trial trains on, read as the levels its decoder reads (``model.levels``), or None
    when it runs the backbone (see :func:`~lasegseg.train.feature_plan.uses_feature_cache`). Its training rows are
    held on ``device`` when they fit, else prefetched there on a thread
    (:func:`~lasegseg.train.feature_residency.for_training`).

    Args:
        stats: gets ``built`` True when this trial had to compute them.
    """
    if not uses_feature_cache(cfg):
        if frozen_backbone(cfg.model) and cfg.train.feature_cache:
            logger.warning(
                "feature cache off: %s augmentation changes the backbone input every epoch", cfg.train.augment
            )
        return None
    given = data.features
    if (
        given is not None
        and given.matches(model.backbone, data.cache)
        and given.manifest.get("precision") == compute_precision(device, cfg.train.amp)
        and given.holds(model.levels)
    ):
        return for_training(given.reader(model.levels), data.train_rows, device, share=data.device_share)
    levels = model.levels
    if data.feature_readers:
        levels = tuple(sorted({*levels, *levels_read(data.feature_readers, model.backbone.num_features_levels)}))
    features = get_or_build_features(
        model.backbone, data.cache, levels=levels, device=device, amp=cfg.train.amp,
        batch_size=max(32, cfg.train.batch_size), stats=stats,
    )  # fmt: skip
    return for_training(features.reader(model.levels), data.train_rows, device, share=data.device_share)


def backbone_stub(cfg: Config, data: TrialData, device: torch.device) -> BackboneStub | None:
    """A weightless stand-in for a frozen trial's backbone when the features it was given serve every pass the
    trial makes (training, validation, test, overlays), else None (the backbone is loaded).

    The features must come from this backbone's source over this slice cache, at this device's precision, with
    the levels the decoder reads, and record the backbone's shape (caches built before that was recorded load it).
    """
    given = data.features
    if given is None or not uses_feature_cache(cfg):
        return None
    m = given.manifest
    if any(k not in m for k in ("family", "embed_dim", "patch_size", "backbone_source", "layer_indices")):
        return None
    if (
        m["backbone_source"] != backbone_source(cfg.model.backbone, registers=cfg.model.registers)
        or m.get("slice_cache") != data.cache.key
        or m.get("precision") != compute_precision(device, cfg.train.amp)
    ):
        return None
    stub = BackboneStub(
        source=m["backbone_source"], family=m["family"], embed_dim=m["embed_dim"], patch_size=m["patch_size"],
        layer_indices=m["layer_indices"], source_fingerprint=m["backbone_fingerprint"],
    )  # fmt: skip
    return stub if given.holds(decoder_levels(cfg.model.decoder, stub.num_features_levels)) else None
