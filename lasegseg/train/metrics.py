"""Segmentation metrics on plain boolean arrays (nnU-Net habit), checked against MONAI in the tests.

Conventions (MONAI's with ``ignore_empty=False``): Dice and IoU are 1 when prediction and reference are both
empty; HD95 is NaN when either is empty (it is undefined), and aggregates skip NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def dice_iou(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean arrays of the same shape."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    inter = int(np.count_nonzero(pred & ref))
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    if total == 0:
        return 1.0, 1.0
    return 2.0 * inter / total, inter / (total - inter)


def _edges(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return mask ^ binary_erosion(mask)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces of two masks, in mm if spacing given."""
    from scipy.ndimage import distance_transform_edt

    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if not pred.any() or not ref.any():
        return math.nan
    sampling = None if spacing is None else tuple(float(s) for s in spacing)
    edge_p, edge_r = _edges(pred), _edges(ref)
    d_p_to_r = distance_transform_edt(~edge_r, sampling=sampling)[edge_p]
    d_r_to_p = distance_transform_edt(~edge_p, sampling=sampling)[edge_r]
    return float(max(np.percentile(d_p_to_r, 95), np.percentile(d_r_to_p, 95)))


def slice_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean 2D Dice over the axial slices (last axis) where the reference has foreground."""
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    keep = ref.reshape(-1, ref.shape[-1]).any(axis=0)
    if not keep.any():
        return math.nan
    p = pred[..., keep].reshape(-1, int(keep.sum()))
    r = ref[..., keep].reshape(-1, int(keep.sum()))
    inter = (p & r).sum(axis=0)
    return float(np.mean(2.0 * inter / (p.sum(axis=0) + r.sum(axis=0))))


def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> dict[str, float]:
    """Dice, IoU, HD95 and mean per-slice Dice of one 3D case."""
    dice, iou = dice_iou(pred, ref)
    return {"dice": dice, "iou": iou, "hd95": hd95(pred, ref, spacing), "slice_dice": slice_dice(pred, ref)}


def summarize(rows: Sequence[dict[str, float]], prefix: str) -> dict[str, float]:
    """Mean and (population) std over cases of each metric, skipping NaN: ``{prefix}_dice_mean`` …"""
    out: dict[str, float] = {}
    for name in ("dice", "iou", "hd95", "slice_dice"):
        values = np.array([r[name] for r in rows if name in r], dtype=float)
        values = values[np.isfinite(values)]
        out[f"{prefix}_{name}_mean"] = float(values.mean()) if values.size else math.nan
        out[f"{prefix}_{name}_std"] = float(values.std()) if values.size else math.nan
    return out
