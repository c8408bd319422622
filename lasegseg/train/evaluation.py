"""Scoring a model on whole cached volumes: per-patient 3D metrics at native resolution, from the backbone or from
cached features, optionally on every k-th axial slice (per-epoch validation within ``train.val_budget``).
Pure compute: no ray, no mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from lasegseg import metric_table
from lasegseg.config import EvalConfig
from lasegseg.train.features import FeatureCache
from lasegseg.train.inference import autocast_context, predict_slices, probabilities_to_native, to_device
from lasegseg.train.metrics import case_metrics


@torch.inference_mode()
def predict_cached_slices(
    model, features: FeatureCache, cache, rows: np.ndarray, *, batch_size: int, device, amp: str
) -> np.ndarray:
    """Foreground probabilities of cache ``rows`` decoded from cached features (as :func:`predict_slices`)."""
    device = torch.device(device)
    out = np.empty((len(rows), *cache.images.shape[1:]), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        idx = rows[start : start + batch_size]
        x = to_device(torch.from_numpy(np.asarray(cache.images[idx]))[:, None], device).float()
        feats = features.batch(idx, device)
        with autocast_context(device, amp):
            prob = torch.softmax(model.decode(feats, x).float(), dim=1)[:, 1]
        out[start : start + len(idx)] = prob.float().cpu().numpy()
    return out


def predict_case(
    model, cache, case_id: str, *, device, amp: str, batch_size: int, features: FeatureCache | None = None,
    slices: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """Boolean (X, Y, Z) prediction of one cached case at its native resolution.

    Args:
        features: decode from these cached backbone features instead of running the backbone.
        slices: predict only these axial slices (indices along Z, ascending); the result has ``len(slices)``
            along Z.
    """
    rows = cache.rows_for([case_id])
    rows = rows[np.argsort(cache.slice_index[rows], kind="stable")]
    if slices is not None:
        rows = rows[slices]
    if features is not None:
        probs = predict_cached_slices(model, features, cache, rows, batch_size=batch_size, device=device, amp=amp)
    else:
        probs = predict_slices(model, cache.images[rows], batch_size=batch_size, device=device, amp=amp)
    shape = cache.native_shape(case_id)
    return probabilities_to_native(probs, (shape[0], shape[1])) >= 0.5


def strided_slices(n: int, stride: int) -> np.ndarray:
    """Every ``stride``-th of ``n`` slices, centred (the offset is half the stride), so both ends lose alike."""
    return np.arange((stride - 1) // 2 if stride <= n else n // 2, n, max(1, stride))


def validation_stride(budget: float, val_slices: int, train_slices: int) -> int:
    """The smallest k for which every k-th validation slice fits ``budget`` slices per training slice
    (``train.val_budget``; 0 or a budget that fits them all: 1)."""
    allowed = budget * train_slices
    if budget <= 0 or val_slices <= allowed:
        return 1
    return max(1, math.ceil(val_slices / max(allowed, 1.0)))


def evaluate(
    model, cache, case_ids: Sequence[str], *, device, amp: str, batch_size: int, full: bool = False,
    features: FeatureCache | None = None, nsd_tolerance_mm: float = EvalConfig.nsd_tolerance_mm, stride: int = 1,
) -> list[dict[str, Any]]:  # fmt: skip
    """Per-patient 3D metrics at native resolution: the table's validation metrics (Dice, IoU), or with ``full``
    every metric of the table (test).

    Args:
        features: cached backbone features (frozen mode) to decode from instead of running the backbone.
        nsd_tolerance_mm: NSD's tolerance with ``full`` (``eval.nsd_tolerance_mm``); distances use each case's
            voxel spacing.
        stride: score every ``stride``-th axial slice of each volume (:func:`strided_slices`), prediction and
            reference alike: the validation metrics over that slab set (per-epoch validation within
            ``train.val_budget``).
            Not with ``full``, whose surface distances need whole volumes.
    """
    if full and stride != 1:
        raise ValueError("full metrics (NSD, HD95) need every slice: stride must be 1")
    was_training = model.training
    model.eval()
    rows = []
    for cid in case_ids:
        slices = strided_slices(cache.native_shape(cid)[2], stride) if stride > 1 else None
        pred = predict_case(
            model, cache, cid, device=device, amp=amp, batch_size=batch_size, features=features, slices=slices
        )
        ref = cache.native_label(cid)
        if slices is not None:
            ref = ref[..., slices]
        only = None if full else metric_table.validation()
        metrics = case_metrics(pred, ref, cache.spacing(cid), nsd_tolerance_mm=nsd_tolerance_mm, only=only)
        rows.append({"case_id": cid, **metrics})
    model.train(was_training)
    return rows
