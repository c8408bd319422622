"""Which feature cache a sweep's trials read: the trials that train on cached features and the slots they share.

A feature slot is one backbone (with its registers and precision setting) over slices of one preprocessing; the
trials of a slot read one cache, which holds the levels all their decoders read (built by
:mod:`lasegseg.train.feature_build`). Light: plain configs in, names out; no torch, no ray, no mlflow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from lasegseg.config import Config, frozen_backbone
from lasegseg.data.preprocess import Preprocessing

# The flat keys of the preprocessing the slices were made with, in Preprocessing's field order (as its from_flat
# reads them): a sweep may mix image sizes or clipping, and each gets features of its own.
PREPROCESSING_KEYS = tuple(f"data.{f.name}" for f in fields(Preprocessing))


def feature_slot(flat: Mapping[str, Any]) -> str:
    """Which feature cache of a sweep a trial reads: backbone, registers, precision setting and the preprocessing
    of the slices it encodes (:data:`PREPROCESSING_KEYS`: a sweep may mix image sizes).

    Args:
        flat: the trial's flat config.
    """
    prep = "|".join(str(flat[k]) for k in PREPROCESSING_KEYS if k in flat)
    return f"{flat['model.backbone']}|{flat.get('model.registers', False)}|{flat.get('train.amp', 'auto')}|{prep}"


def uses_feature_cache(cfg: Config | Mapping[str, Any]) -> bool:
    """Whether a trial trains on cached features: a frozen backbone, no augmentation, ``train.feature_cache`` on (the
    one definition: the sweep's planning, its workers and the trial all ask this).

    Args:
        cfg: the trial config, or its flat view.
    """
    if isinstance(cfg, Mapping):
        model, augment, cache_on = cfg, cfg.get("train.augment", "none"), cfg.get("train.feature_cache", True)
    else:
        model, augment, cache_on = cfg.model, cfg.train.augment, cfg.train.feature_cache
    return frozen_backbone(model) and augment == "none" and bool(cache_on)


def distinct_frozen_backbones(trials: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The flat configs of the first trial of each distinct frozen backbone that would use the feature cache.

    Args:
        trials: flat trial configs of a sweep.
    """
    seen: dict[str, dict[str, Any]] = {}
    for flat in trials:
        if uses_feature_cache(flat):
            seen.setdefault(feature_slot(flat), flat)
    return list(seen.values())


def slot_readers(trials: Sequence[dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    """The decoders that read each feature cache of a sweep: ``{feature_slot: sorted distinct model.decoder}``.

    Args:
        trials: flat trial configs of a sweep.
    """
    readers: dict[str, set[str]] = {}
    for flat in trials:
        if uses_feature_cache(flat):
            readers.setdefault(feature_slot(flat), set()).add(flat["model.decoder"])
    return {slot: tuple(sorted(names)) for slot, names in readers.items()}
