"""Scoring on whole volumes: the validation stride within a budget, and predictions on every k-th slice."""

from __future__ import annotations

import numpy as np
import torch

from lasegseg.config import Config
from lasegseg.train.evaluation import evaluate, predict_case, strided_slices, validation_stride
from lasegseg.train.metrics import dice_iou
from lasegseg.train.trial_data import prepare_data


def test_validation_stride_is_the_smallest_that_fits_the_budget():
    assert validation_stride(0.25, 100, 400) == 1  # fits: every slice
    assert validation_stride(0.0, 1000, 10) == 1  # 0: every slice, whatever it costs
    assert validation_stride(0.25, 100, 200) == 2  # 50 allowed → every 2nd slice
    assert validation_stride(0.25, 100, 100) == 4
    assert validation_stride(0.25, 101, 100) == 5  # 25 allowed: every 4th would read 26
    assert validation_stride(0.25, 50, 1) == 50  # a budget under one slice reads one slice per 50
    assert strided_slices(10, 1).tolist() == list(range(10))
    assert strided_slices(10, 3).tolist() == [1, 4, 7]  # centred: both ends lose alike
    assert strided_slices(10, 4).tolist() == [1, 5, 9]
    assert strided_slices(3, 8).tolist() == [1]  # a stride past the volume still scores its middle slice


class _Bright(torch.nn.Module):
    """Foreground wherever the image is brighter than 0.5: a model whose every slice's prediction is known."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1) * 20


def test_a_strided_prediction_is_the_full_one_on_those_slices_and_is_scored_on_them(phantom_dir):
    data = prepare_data(Config().replace(**{"data.path": str(phantom_dir), "data.image_size": 42}))
    cid, model = data.split.val[0], _Bright()
    kwargs = {"device": "cpu", "amp": "off", "batch_size": 4}
    full = predict_case(model, data.cache, cid, **kwargs)
    picked = strided_slices(full.shape[2], 3)
    part = predict_case(model, data.cache, cid, slices=picked, **kwargs)
    assert full.shape == tuple(data.cache.native_shape(cid)) and full.any()
    assert part.shape == (*full.shape[:2], len(picked)) and np.array_equal(part, full[..., picked])
    model.train()
    (row,) = evaluate(model, data.cache, [cid], stride=3, **kwargs)
    assert model.training  # evaluation leaves the model in the mode it found it in
    dice, iou = dice_iou(part, data.cache.native_label(cid)[..., picked])
    assert row == {"case_id": cid, "dice": dice, "iou": iou}
