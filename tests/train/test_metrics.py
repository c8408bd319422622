"""Metrics on plain arrays must agree with MONAI's DiceMetric / MeanIoU / HD95."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lasegseg.train.metrics import case_metrics, dice_iou, hd95, slice_dice, summarize


def _blob(shape, center, radius, rng=None):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    d = np.linalg.norm(grid - np.array(center), axis=-1)
    if rng is not None:
        d = d + rng.normal(0, 0.7, size=shape)
    return d < radius


def _onehot(mask):
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return torch.cat([1 - t, t], dim=1)


CASES = [
    ((24, 20, 12), (12, 10, 6), 6, (13, 9, 6), 5, (1.25, 1.25, 2.5)),
    ((30, 30, 10), (10, 10, 5), 4, (18, 18, 5), 4, (1.0, 1.0, 1.0)),  # disjoint
    ((16, 16, 16), (8, 8, 8), 5, (8, 8, 8), 5, (0.7, 0.9, 1.4)),  # identical
    ((32, 28, 9), (14, 12, 4), 8, (15, 15, 5), 6, (0.625, 0.625, 2.5)),
]


@pytest.mark.parametrize("shape,c1,r1,c2,r2,spacing", CASES)
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


def test_empty_conventions():
    empty = np.zeros((5, 5, 5), bool)
    full = np.zeros((5, 5, 5), bool)
    full[1:3, 1:3, 1:3] = True
    assert dice_iou(empty, empty) == (1.0, 1.0)
    assert dice_iou(empty, full) == (0.0, 0.0)
    assert math.isnan(hd95(empty, full))
    assert math.isnan(slice_dice(full, empty))


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


def test_summarize_skips_nan_and_uses_population_std():
    rows = [case_metrics(_blob((12, 12, 6), (6, 6, 3), r), _blob((12, 12, 6), (6, 6, 3), 4)) for r in (3, 4, 5)]
    rows.append({"dice": 0.5, "iou": 1 / 3, "hd95": math.nan, "slice_dice": math.nan})
    out = summarize(rows, "test")
    dices = np.array([r["dice"] for r in rows])
    assert out["test_dice_mean"] == pytest.approx(dices.mean())
    assert out["test_dice_std"] == pytest.approx(dices.std())
    assert out["test_hd95_mean"] == pytest.approx(np.mean([r["hd95"] for r in rows[:3]]))
