"""Slice-wise inference: probabilities per slice, back to the native grid, autocast policy, largest component."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from lasegseg.train.inference import autocast_context, largest_component, predict_slices, probabilities_to_native

GAIN = 8.0


class Threshold(torch.nn.Module):
    """Two-class logits whose foreground softmax is ``sigmoid(GAIN * (x - 0.5) + ramp[w])`` pixel by pixel.

    ``ramp`` (along the last axis) makes the model not left-right symmetric, so flip TTA changes its output.
    Every input it sees is recorded (shape and dtype) to check the batching.
    """

    def __init__(self, ramp: float = 0.0) -> None:
        super().__init__()
        self.ramp = ramp
        self.seen: list[tuple[tuple[int, ...], torch.dtype]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((tuple(x.shape), x.dtype))
        bias = self.ramp * torch.linspace(-1.0, 1.0, x.shape[-1])
        fg = GAIN * (x - 0.5) + bias
        return torch.cat([torch.zeros_like(fg), fg], dim=1)


def _expected(slices: np.ndarray, ramp: float = 0.0) -> np.ndarray:
    bias = ramp * np.linspace(-1.0, 1.0, slices.shape[-1])
    return 1.0 / (1.0 + np.exp(-(GAIN * (slices.astype(np.float64) - 0.5) + bias)))


def _slices(z: int = 5, s: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((z, s, s)).astype(np.float32)


# ------------------------------------------------------------------------------------------------ predict_slices


def test_predict_slices_gives_the_softmax_foreground_per_pixel():
    slices = _slices()
    probs = predict_slices(Threshold(), slices, amp="off")
    assert probs.shape == slices.shape and probs.dtype == np.float32
    assert 0.0 <= probs.min() and probs.max() <= 1.0
    np.testing.assert_allclose(probs, _expected(slices), atol=1e-6)


def test_predict_slices_feeds_batches_of_one_channel_float32_slices():
    model = Threshold()
    slices = _slices(z=10, s=8).astype(np.float16)  # the slice cache stores float16
    predict_slices(model, slices, batch_size=4, amp="off")
    assert model.seen == [((4, 1, 8, 8), torch.float32), ((4, 1, 8, 8), torch.float32), ((2, 1, 8, 8), torch.float32)]


def test_predict_slices_of_an_empty_stack_is_empty():
    model = Threshold()
    probs = predict_slices(model, np.zeros((0, 8, 8), np.float32))
    assert probs.shape == (0, 8, 8) and model.seen == []


def test_predict_slices_does_not_depend_on_the_batch_size():
    from lasegseg.config import Config
    from lasegseg.models.segmenter import build_segmenter

    torch.manual_seed(0)
    cfg = Config().replace(**{"model.backbone": "tiny", "model.decoder": "linear", "data.image_size": 28})
    model = build_segmenter(cfg.model).eval()
    slices = _slices(z=7, s=28, seed=3)
    ref = predict_slices(model, slices, batch_size=16, amp="off")
    for batch_size in (1, 3):
        np.testing.assert_allclose(predict_slices(model, slices, batch_size=batch_size, amp="off"), ref, atol=1e-5)
    assert 0.0 <= ref.min() and ref.max() <= 1.0 and ref.std() > 0  # a real, non-constant prediction


def test_flip_tta_averages_with_the_mirrored_prediction():
    slices = _slices(s=10)
    plain = predict_slices(Threshold(ramp=2.0), slices, amp="off")
    tta = predict_slices(Threshold(ramp=2.0), slices, amp="off", flip_tta=True)
    mirrored = _expected(slices[..., ::-1], ramp=2.0)[..., ::-1]
    np.testing.assert_allclose(plain, _expected(slices, ramp=2.0), atol=1e-6)
    np.testing.assert_allclose(tta, 0.5 * (_expected(slices, ramp=2.0) + mirrored), atol=1e-6)
    # A left-right symmetric input gives a symmetric mask with TTA, whatever the model's own bias.
    symmetric = np.concatenate([slices[..., :5], slices[..., :5][..., ::-1]], axis=-1)
    out = predict_slices(Threshold(ramp=2.0), symmetric, amp="off", flip_tta=True)
    np.testing.assert_allclose(out, out[..., ::-1], atol=1e-6)
    assert not np.allclose(predict_slices(Threshold(ramp=2.0), symmetric, amp="off")[..., ::-1], out, atol=1e-3)


def test_flip_tta_leaves_a_mirror_equivariant_model_unchanged():
    slices = _slices()
    np.testing.assert_allclose(
        predict_slices(Threshold(), slices, amp="off", flip_tta=True), predict_slices(Threshold(), slices, amp="off"),
        atol=1e-6,
    )  # fmt: skip


def test_bf16_on_the_cpu_returns_float32_close_to_fp32():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 2, 3, padding=1).eval()
    slices = _slices()
    probs = predict_slices(model, slices, amp="bf16")
    assert probs.dtype == np.float32 and probs.shape == slices.shape
    np.testing.assert_allclose(probs, predict_slices(model, slices, amp="off"), atol=2e-2)


# ------------------------------------------------------------------------------------------------ autocast


@pytest.mark.parametrize(
    "device,amp,bf16",
    [("cpu", "auto", False), ("cpu", "off", False), ("cpu", "bf16", True), ("cuda", "off", False)],
)
def test_autocast_is_bf16_on_the_cpu_only_when_asked(device, amp, bf16):
    ctx = autocast_context(torch.device(device), amp)
    assert isinstance(ctx, torch.autocast) == bf16
    assert isinstance(ctx, contextlib.nullcontext) != bf16
    x = torch.ones(4, 4)
    with ctx:
        y = x @ x
    assert y.dtype == (torch.bfloat16 if bf16 else torch.float32)


@pytest.mark.filterwarnings("ignore:CUDA is not available")
@pytest.mark.parametrize("amp", ["auto", "bf16"])
def test_autocast_is_bf16_on_the_gpu_by_default(amp):
    ctx = autocast_context(torch.device("cuda"), amp)
    assert isinstance(ctx, torch.autocast) and ctx.device == "cuda" and ctx.fast_dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------ native grid


def test_probabilities_to_native_moves_slices_last_at_the_same_size():
    probs = _slices(z=4, s=6)
    out = probabilities_to_native(probs, (6, 6))
    assert out.shape == (6, 6, 4) and out.dtype == np.float32
    np.testing.assert_allclose(out, np.moveaxis(probs, 0, -1), atol=1e-7)


def test_probabilities_to_native_interpolates_linearly_on_pixel_centres():
    # 2 → 4 columns: output centres sit at input coordinates -0.25, 0.25, 0.75, 1.25 (edges clamped).
    probs = np.array([[[0.0, 1.0], [0.0, 1.0]]], np.float32)  # (Z=1, S=2, S=2), a left-right step
    out = probabilities_to_native(probs, (2, 4))
    assert out.shape == (2, 4, 1)
    np.testing.assert_allclose(out[:, :, 0], [[0.0, 0.25, 0.75, 1.0]] * 2, atol=1e-6)
    # 4 → 2 rows: each output centre falls halfway between two input rows.
    probs = np.array([[0.0, 0.2, 0.6, 1.0]], np.float32).T[None].repeat(3, axis=2)  # (1, 4, 3)
    out = probabilities_to_native(probs, (2, 3))
    np.testing.assert_allclose(out[:, :, 0], [[0.1] * 3, [0.8] * 3], atol=1e-6)


def test_probabilities_to_native_keeps_slice_order_and_range_on_a_non_square_grid():
    probs = np.stack([np.full((16, 16), k / 4, np.float32) for k in range(5)])
    probs[2] = _slices(z=1, s=16)[0]
    out = probabilities_to_native(probs, (40, 24))
    assert out.shape == (40, 24, 5)
    for k in (0, 1, 3, 4):
        np.testing.assert_allclose(out[:, :, k], k / 4, atol=1e-6)  # a constant slice stays constant
    assert probs[2].min() - 1e-6 <= out[:, :, 2].min() and out[:, :, 2].max() <= probs[2].max() + 1e-6


# ------------------------------------------------------------------------------------------------ largest component


def test_largest_component_keeps_the_biggest_26_connected_blob():
    mask = np.zeros((10, 10, 6), bool)
    mask[1:4, 1:4, 1:4] = True  # 27 voxels
    mask[4, 4, 4] = True  # touches the cube by a corner only: the same 26-connected component
    mask[7:9, 7:9, 0:2] = True  # 8 voxels, separate
    out = largest_component(mask)
    assert out.dtype == bool and out.sum() == 28
    assert out[4, 4, 4] and not out[7:9, 7:9, 0:2].any()


@pytest.mark.parametrize("n_blobs", [0, 1])
def test_largest_component_returns_a_mask_with_at_most_one_blob_unchanged(n_blobs):
    mask = np.zeros((6, 6, 3), np.uint8)
    if n_blobs:
        mask[1:3, 2:5, :] = 1
    out = largest_component(mask)
    assert out.dtype == bool
    np.testing.assert_array_equal(out, mask.astype(bool))
