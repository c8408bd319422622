"""Metrics on plain arrays must agree with MONAI's DiceMetric / MeanIoU / HD95 / surface Dice; empty masks follow
the table in :mod:`lasegseg.train.metrics`."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lasegseg.train.metrics import case_metrics, dice_iou, hd95, nsd, slice_dice, summarize, surface_metrics


def _blob(shape, center, radius, rng=None):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    d = np.linalg.norm(grid - np.array(center), axis=-1)
    if rng is not None:
        d = d + rng.normal(0, 0.7, size=shape)
    return d < radius


def _onehot(mask):
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.cat([1 - t, t], dim=1)


# MONAI warns about a deprecated argument its own metric functions pass internally.
_MONAI_INTERNAL = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")

CASES = [
    ((24, 20, 12), (12, 10, 6), 6, (13, 9, 6), 5, (1.25, 1.25, 2.5)),
    ((30, 30, 10), (10, 10, 5), 4, (18, 18, 5), 4, (1.0, 1.0, 1.0)),  # disjoint
    ((16, 16, 16), (8, 8, 8), 5, (8, 8, 8), 5, (0.7, 0.9, 1.4)),  # identical
    ((32, 28, 9), (14, 12, 4), 8, (15, 15, 5), 6, (0.625, 0.625, 2.5)),
]


@pytest.mark.parametrize("shape,c1,r1,c2,r2,spacing", CASES)
@_MONAI_INTERNAL
def test_dice_iou_hd95_match_monai(shape, c1, r1, c2, r2, spacing):
    from monai.metrics import DiceMetric, MeanIoU, compute_hausdorff_distance

    rng = np.random.default_rng(0)
    pred, ref = _blob(shape, c1, r1, rng), _blob(shape, c2, r2, rng)
    dice, iou = dice_iou(pred, ref)
    dm = DiceMetric(include_background=False, reduction="mean", ignore_empty=False)
    im = MeanIoU(include_background=False, reduction="mean", ignore_empty=False)
    dm(_onehot(pred), _onehot(ref))
    im(_onehot(pred), _onehot(ref))
    assert dice == pytest.approx(float(dm.aggregate()), abs=1e-6)
    assert iou == pytest.approx(float(im.aggregate()), abs=1e-6)
    ours = hd95(pred, ref, spacing)
    theirs = float(compute_hausdorff_distance(_onehot(pred), _onehot(ref), percentile=95, spacing=list(spacing)))
    assert ours == pytest.approx(theirs, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("shape,c1,r1,c2,r2,spacing", CASES)
@pytest.mark.parametrize("tolerance", [1.0, 2.5])
@_MONAI_INTERNAL
def test_nsd_matches_monai_with_anisotropic_spacing(shape, c1, r1, c2, r2, spacing, tolerance):
    from monai.metrics import compute_surface_dice

    rng = np.random.default_rng(1)
    pred, ref = _blob(shape, c1, r1, rng), _blob(shape, c2, r2, rng)
    theirs = compute_surface_dice(
        _onehot(pred), _onehot(ref), class_thresholds=[tolerance], spacing=list(spacing), include_background=False
    )
    ours = nsd(pred, ref, tolerance, spacing)
    assert ours == pytest.approx(float(theirs[0, 0]), abs=1e-6)
    assert 0.0 <= ours <= 1.0


def test_nsd_tolerance_is_in_mm():
    ref = np.zeros((10, 10, 8), bool)
    ref[2:8, 2:8, 2:6] = True
    pred = np.roll(ref, 1, axis=2)  # one slice off: 2.5 mm at this spacing, 1 voxel without it
    spacing = (1.0, 1.0, 2.5)
    assert nsd(pred, ref, 2.5, spacing) == 1.0
    assert nsd(pred, ref, 2.0, spacing) < 0.9
    assert nsd(pred, ref, 1.0) == 1.0
    assert nsd(ref, ref, 0.5, spacing) == 1.0


_EMPTY = np.zeros((6, 6, 4), bool)
_BOX = np.zeros((6, 6, 4), bool)
_BOX[1:4, 2:5, 1:3] = True
NAN = math.nan


@pytest.mark.parametrize(
    "pred,ref,expected",
    [
        (_EMPTY, _EMPTY, {"dice": 1.0, "iou": 1.0, "nsd": 1.0, "hd95": 0.0}),  # agreement on "nothing here"
        (_BOX, _EMPTY, {"dice": 0.0, "iou": 0.0, "nsd": 0.0, "hd95": NAN}),  # false positive only
        (_EMPTY, _BOX, {"dice": 0.0, "iou": 0.0, "nsd": 0.0, "hd95": NAN}),  # missed structure
        (_BOX, _BOX, {"dice": 1.0, "iou": 1.0, "nsd": 1.0, "hd95": 0.0}),  # not empty, for contrast
    ],
    ids=["both-empty", "ref-empty", "pred-empty", "identical"],
)
def test_empty_mask_rules(pred, ref, expected):
    row = case_metrics(pred, ref, (1.0, 1.0, 2.5), nsd_tolerance_mm=2.0)
    for name, value in expected.items():
        if math.isnan(value):
            assert math.isnan(row[name]), name
        else:
            assert row[name] == value, name


def test_slice_dice_is_undefined_without_reference_slices():
    assert math.isnan(slice_dice(_BOX, _EMPTY))


def test_slice_dice_only_counts_slices_with_reference():
    ref = np.zeros((4, 4, 3), bool)
    pred = np.zeros((4, 4, 3), bool)
    ref[:2, :2, 0] = True  # 4 voxels
    pred[:2, :1, 0] = True  # 2 of them → Dice 2*2/6
    pred[:, :, 2] = True  # false positives on a slice without reference: not counted per slice
    assert slice_dice(pred, ref) == pytest.approx(4 / 6)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        dice_iou(np.zeros((2, 2, 2), bool), np.zeros((2, 2, 3), bool))


def test_summarize_skips_nan_counts_it_and_uses_population_std():
    ref = _blob((12, 12, 6), (6, 6, 3), 4)
    rows = [case_metrics(_blob((12, 12, 6), (6, 6, 3), r), ref, nsd_tolerance_mm=1.0) for r in (3, 4, 5)]
    rows.append(case_metrics(np.zeros_like(ref), ref, nsd_tolerance_mm=1.0))  # nothing predicted: HD95 undefined
    out = summarize(rows, "test")
    for name in ("dice", "nsd"):
        values = np.array([r[name] for r in rows])
        assert out[f"test_{name}_mean"] == pytest.approx(values.mean())
        assert out[f"test_{name}_std"] == pytest.approx(values.std())
    assert out["test_hd95_mean"] == pytest.approx(np.mean([r["hd95"] for r in rows[:3]]))
    assert out["test_hd95_n_undefined"] == 1


def test_summarize_rows_without_nsd():
    out = summarize([{"dice": 0.5, "iou": 1 / 3, "hd95": 2.0, "slice_dice": 0.5}], "test")
    assert math.isnan(out["test_nsd_mean"]) and out["test_hd95_n_undefined"] == 0


@_MONAI_INTERNAL
def test_surface_metrics_on_the_bounding_box_equal_monai_when_masks_touch_the_border():
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(2)
    shape, spacing = (40, 36, 10), (0.8, 0.8, 2.0)
    pred, ref = _blob(shape, (2, 30, 8), 9, rng), _blob(shape, (5, 28, 9), 8, rng)  # cut by three faces
    pred[30:, :, :] = False
    value_nsd, value_hd95 = surface_metrics(pred, ref, 1.5, spacing)
    theirs_nsd = compute_surface_dice(
        _onehot(pred), _onehot(ref), class_thresholds=[1.5], spacing=list(spacing), include_background=False
    )
    theirs_hd = compute_hausdorff_distance(_onehot(pred), _onehot(ref), percentile=95, spacing=list(spacing))
    assert value_nsd == pytest.approx(float(theirs_nsd[0, 0]), abs=1e-6)
    assert value_hd95 == pytest.approx(float(theirs_hd), rel=1e-5, abs=1e-5)
    assert (value_nsd, value_hd95) == (nsd(pred, ref, 1.5, spacing), hd95(pred, ref, spacing))
