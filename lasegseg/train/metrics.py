"""Segmentation metrics on plain boolean arrays (nnU-Net habit), checked against MONAI in the tests.

Distances are in mm when a voxel spacing is given (in voxels otherwise). NSD follows MONAI's
``compute_surface_dice`` and HD95 its ``compute_hausdorff_distance(percentile=95)``; all four are computed here on
plain arrays and the tests check them against MONAI's on non-empty masks.

Empty masks (Metrics Reloaded's conventions, which MONAI's differ from only where noted):

==================  ====  ===  ===  ===========================================
reference / pred.   Dice  IoU  NSD  HD95
==================  ====  ===  ===  ===========================================
both empty          1     1    1    0
one of them empty   0     0    0    NaN (undefined; counted, see :func:`summarize`)
==================  ====  ===  ===  ===========================================

The table :mod:`lasegseg.metric_table` declares each metric (and these empty-mask values); this module holds each
one's function, registered with :func:`case_metric`, and :func:`case_metrics` applies the table's empty-mask rule
before calling it, so a function only ever sees two non-empty masks.

Both empty is perfect agreement: Metrics Reloaded sets Dice to 1 and every surface distance to 0 there, and NSD and
IoU follow Dice so that one case cannot be perfect by one overlap score and undefined by another (MONAI's NSD and
Metrics Reloaded's IoU give NaN). With one mask empty there is no surface to measure to, so HD95 is undefined: any
finite stand-in (an image diagonal, a fixed penalty) would be arbitrary, and MONAI's ``inf`` would swamp a mean.
Aggregates skip NaN, so :func:`summarize` reports how many cases were skipped next to the HD95 mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from lasegseg.errors import ConfigError
from lasegseg.metric_table import METRICS, Metric, metrics, validation
from lasegseg.registry import Registry


def _pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred, bool), np.asarray(ref, bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    return pred, ref


def dice_iou(pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Dice and IoU of two boolean arrays of the same shape (1 and 1 when both are empty)."""
    pred, ref = _pair(pred, ref)
    inter = int(np.count_nonzero(pred & ref))
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    if total == 0:
        return 1.0, 1.0
    return 2.0 * inter / total, inter / (total - inter)


def _edges(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion  # deferred: heavy (scipy.ndimage, ~0.3 s, only for surface metrics)

    return mask ^ binary_erosion(mask)


def surface_distances(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Distances from every surface voxel of ``pred`` to the surface of ``ref``, and back; both masks non-empty.

    MONAI's definition (``get_edge_surface_distance``): a surface voxel is a mask voxel that binary erosion removes,
    and distances are Euclidean, in mm when ``spacing`` is given. The work is done on the bounding box of both
    masks plus one voxel, which gives the same distances (every surface voxel lies inside it) at a fraction of
    the cost on a whole MRI volume.

    Args:
        pred, ref: boolean masks of the same shape, neither empty.
        spacing: voxel size along each axis (mm); None for unit voxels.
    """
    from scipy.ndimage import distance_transform_edt  # deferred: heavy (scipy.ndimage, ~0.3 s)

    union = pred | ref
    box = []
    for axis in range(union.ndim):
        hits = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - 1, 0), int(hits[-1]) + 2))
    pred, ref = pred[tuple(box)], ref[tuple(box)]
    sampling = None if spacing is None else tuple(float(s) for s in spacing)
    edge_p, edge_r = _edges(pred), _edges(ref)
    to_ref = distance_transform_edt(~edge_r, sampling=sampling)[edge_p]
    to_pred = distance_transform_edt(~edge_p, sampling=sampling)[edge_r]
    return to_ref, to_pred


def _empty_rule(pred: np.ndarray, ref: np.ndarray, both: float, one: float) -> float | None:
    """The value for empty masks (see the module notes), or None when both have foreground."""
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    if has_pred and has_ref:
        return None
    return both if has_pred == has_ref else one


def _hd95(to_ref: np.ndarray, to_pred: np.ndarray) -> float:
    return float(max(np.percentile(to_ref, 95), np.percentile(to_pred, 95)))


def _nsd(to_ref: np.ndarray, to_pred: np.ndarray, tolerance_mm: float) -> float:
    within = int(np.count_nonzero(to_ref <= tolerance_mm)) + int(np.count_nonzero(to_pred <= tolerance_mm))
    return within / (to_ref.size + to_pred.size)


def surface_metrics(
    pred: np.ndarray, ref: np.ndarray, tolerance_mm: float, spacing: Sequence[float] | None = None
) -> tuple[float, float]:
    """:func:`nsd` and :func:`hd95` of one case from one computation of the surface distances.

    Args:
        pred, ref: boolean masks of the same shape.
        tolerance_mm: NSD's tolerance.
        spacing: voxel size along each axis (mm); None for unit voxels.
    """
    pred, ref = _pair(pred, ref)
    if _empty_rule(pred, ref, 0.0, 0.0) is not None:
        return nsd(pred, ref, tolerance_mm, spacing), hd95(pred, ref, spacing)
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"NSD tolerance must be a finite distance >= 0, got {tolerance_mm}")
    distances = surface_distances(pred, ref, spacing)
    return _nsd(*distances, tolerance_mm), _hd95(*distances)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance between the surfaces of two masks, in mm if spacing given.

    Args:
        pred, ref: boolean masks of the same shape.
        spacing: voxel size along each axis (mm); None for unit voxels.

    Returns:
        the distance; 0 when both masks are empty, NaN when only one is (see the module notes).
    """
    pred, ref = _pair(pred, ref)
    if (value := _empty_rule(pred, ref, 0.0, math.nan)) is not None:
        return value
    return _hd95(*surface_distances(pred, ref, spacing))


def nsd(pred: np.ndarray, ref: np.ndarray, tolerance_mm: float, spacing: Sequence[float] | None = None) -> float:
    """Normalised surface Dice: the share of both surfaces within ``tolerance_mm`` of the other.

    MONAI's ``compute_surface_dice`` (without sub-voxel areas), computed here on :func:`surface_distances` so that
    trial workers do not import MONAI (~8 s and ~600 MB per process); the tests check the two agree.

    Args:
        pred, ref: boolean masks of the same shape (2D or 3D).
        tolerance_mm: the accepted boundary deviation, in mm (in voxels when ``spacing`` is None); >= 0.
        spacing: voxel size along each axis (mm); None for unit voxels.

    Returns:
        NSD in [0, 1]; 1 when both masks are empty, 0 when only one is (see the module notes).
    """
    if not math.isfinite(tolerance_mm) or tolerance_mm < 0:
        raise ValueError(f"NSD tolerance must be a finite distance >= 0, got {tolerance_mm}")
    pred, ref = _pair(pred, ref)
    if (value := _empty_rule(pred, ref, 1.0, 0.0)) is not None:
        return value
    return _nsd(*surface_distances(pred, ref, spacing), tolerance_mm)


def slice_dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Mean 2D Dice over the axial slices (last axis) where the reference has foreground (NaN if there are none)."""
    pred, ref = _pair(pred, ref)
    keep = ref.reshape(-1, ref.shape[-1]).any(axis=0)
    if not keep.any():
        return math.nan
    p = pred[..., keep].reshape(-1, int(keep.sum()))
    r = ref[..., keep].reshape(-1, int(keep.sum()))
    inter = (p & r).sum(axis=0)
    return float(np.mean(2.0 * inter / (p.sum(axis=0) + r.sum(axis=0))))


@dataclass
class Case:
    """One case's masks, with the work several metrics share computed once (on first use).

    Args:
        pred, ref: boolean masks of the same shape; both have foreground unless the metric's table entry sets no
            empty-mask rule (:func:`case_metrics` applies the rule before a function sees a case).
        spacing: voxel size along each axis (mm); None for unit voxels.
        nsd_tolerance_mm: NSD's tolerance (the config's ``eval.nsd_tolerance_mm``).
    """

    pred: np.ndarray
    ref: np.ndarray
    spacing: Sequence[float] | None
    nsd_tolerance_mm: float

    @cached_property
    def overlap(self) -> tuple[float, float]:
        """Dice and IoU."""
        return dice_iou(self.pred, self.ref)

    @cached_property
    def distances(self) -> tuple[np.ndarray, np.ndarray]:
        """:func:`surface_distances` of the two masks."""
        return surface_distances(self.pred, self.ref, self.spacing)


CaseFunction = Callable[[Case], float]
_FUNCTIONS: Registry[CaseFunction] = Registry("metric function", "metric functions", ConfigError, METRICS, "the table")


def case_metric(name: str) -> Callable[[CaseFunction], CaseFunction]:
    """Register the function of the table's metric ``name`` (decorator); it is called on two non-empty masks (or
    on empty ones where the table sets no empty-mask rule)."""
    return _FUNCTIONS.register(name)


def remove_case_metric(name: str) -> CaseFunction:
    """Take a metric's function out again (with its table entry, for a metric that was added for a while)."""
    return _FUNCTIONS.remove(name)


case_metric("dice")(lambda case: case.overlap[0])
case_metric("iou")(lambda case: case.overlap[1])
case_metric("nsd")(lambda case: _nsd(*case.distances, case.nsd_tolerance_mm))
case_metric("hd95")(lambda case: _hd95(*case.distances))
case_metric("slice_dice")(lambda case: slice_dice(case.pred, case.ref))


def metric_names() -> list[str]:
    """The per-case metrics of :func:`case_metrics`, in the order the per-patient table shows them."""
    return [m.name for m in metrics()]


def _empty_value(metric: Metric, has_pred: bool, has_ref: bool) -> float | None:
    """The table's value for a case with an empty mask; None when both have foreground or the table sets no rule."""
    if has_pred and has_ref:
        return None
    if not has_pred and not has_ref:
        return metric.empty_both
    return metric.empty_pred if has_ref else metric.empty_ref


def case_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float] | None = None, *, nsd_tolerance_mm: float,
    only: Sequence[Metric] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Every metric of the table for one 3D case (Dice, IoU, NSD, HD95, mean per-slice Dice …).

    Args:
        pred, ref: boolean masks of the same shape.
        spacing: voxel size along each axis (mm), for NSD and HD95; None for unit voxels.
        nsd_tolerance_mm: NSD's tolerance (the config's ``eval.nsd_tolerance_mm``).
        only: these metrics instead of all (``metric_table.validation()`` for a validation pass).
    """
    if not math.isfinite(nsd_tolerance_mm) or nsd_tolerance_mm < 0:
        raise ValueError(f"NSD tolerance must be a finite distance >= 0, got {nsd_tolerance_mm}")
    pred, ref = _pair(pred, ref)
    has_pred, has_ref = bool(pred.any()), bool(ref.any())
    case = Case(pred, ref, spacing, nsd_tolerance_mm)
    out = {}
    for m in metrics() if only is None else only:
        value = _empty_value(m, has_pred, has_ref)
        out[m.name] = float(_FUNCTIONS.get(m.name)(case)) if value is None else value
    return out


def validation_scores(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """An epoch's validation values: each validation metric's mean over the validation patients (``val_dice`` …)."""
    return {m.val: float(np.mean([r[m.name] for r in rows])) for m in validation()}


def summarize(rows: Sequence[dict[str, float]], prefix: str) -> dict[str, float]:
    """Mean and (population) std over cases of each metric, skipping NaN: ``{prefix}_dice_mean`` …

    Also ``{prefix}_<metric>_n_undefined`` for the table's metrics that count it (HD95): how many cases had a value
    that the mean skipped (one mask empty), so a mean over fewer cases is visible as such. Metrics no row has
    (older rows without ``nsd``) come out NaN.
    """
    out: dict[str, float] = {}
    for m in metrics():
        values = np.array([r[m.name] for r in rows if m.name in r], dtype=float)
        values = values[np.isfinite(values)]
        out[f"{prefix}_{m.name}_mean"] = float(values.mean()) if values.size else math.nan
        out[f"{prefix}_{m.name}_std"] = float(values.std()) if values.size else math.nan
    for m in metrics():
        if m.count_undefined:
            out[f"{prefix}_{m.name}_n_undefined"] = sum(1 for r in rows if m.name in r and not math.isfinite(r[m.name]))
    return out
