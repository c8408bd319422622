"""Intensity normalisation, slice resizing and the preprocessing parameters (lasegseg.data.preprocess)."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest

from lasegseg.config import Config
from lasegseg.data.preprocess import (
    Preprocessing,
    normalize_intensity,
    preprocess_case,
    preprocess_image,
    resize_back,
    resize_slices,
)
from tests.data.conftest import PREP, SIZE, make_case


def test_normalize_maps_percentiles_to_unit_range():
    rng = np.random.default_rng(0)
    vol = rng.normal(100, 20, (30, 30, 10))
    vol[0, 0, 0] = 1e6  # an outlier must not squash the rest
    out = normalize_intensity(vol, 0.5, 99.5)
    assert out.dtype == np.float32 and out.shape == vol.shape
    assert out.min() == 0.0 and out.max() == 1.0
    assert 0.4 < np.median(out) < 0.6
    assert (out == 1.0).mean() == pytest.approx(0.005, abs=0.002)


def test_normalize_constant_and_non_finite():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not normalize_intensity(np.full((4, 5, 6), 7.0)).any()
    vol = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    vol[0, 0, 0] = np.nan
    vol[1, 1, 1] = np.inf
    out = normalize_intensity(vol, 0, 100)
    assert np.isfinite(out).all() and out[0, 0, 0] == 0 and out[1, 1, 1] == 0 and out.max() == 1.0


@pytest.mark.parametrize("size", [17, 28, 64])
def test_nearest_resize_keeps_labels(size):
    labels = np.random.default_rng(1).random((30, 22, 4)) > 0.6
    out = resize_slices(labels, size, order=0)
    assert out.shape == (size, size, 4) and out.dtype == bool
    as_int = resize_slices(labels.astype(np.uint8), size, order=0)
    assert as_int.dtype == np.uint8 and set(np.unique(as_int)) <= {0, 1}


def test_resize_back_recovers_smooth_volume():
    x, y, z = np.meshgrid(np.linspace(0, 1, 40), np.linspace(0, 1, 36), np.arange(3), indexing="ij")
    smooth = (np.sin(3 * x + z) * np.cos(2 * y) + 1) / 2
    up = resize_slices(smooth, 64, order=1)
    assert up.shape == (64, 64, 3) and up.dtype == np.float32
    back = resize_back(up, (40, 36), order=1)
    assert back.shape == smooth.shape
    assert np.abs(back - smooth).max() < 0.01
    assert np.array_equal(resize_slices(smooth, 64, order=1), up)  # deterministic


def test_resize_back_of_label_probabilities_keeps_the_mask():
    label = make_case("x", (50, 44, 5), 0).label
    prob = resize_slices(label.astype(np.float32), 28, order=1)
    mask = resize_back(prob, (50, 44)) > 0.5
    dice = 2 * (mask & label).sum() / (mask.sum() + label.sum())
    assert dice > 0.95
    # Pixel-centre alignment: the mask's centroid does not drift by half a pixel.
    assert np.allclose(np.argwhere(mask).mean(0), np.argwhere(label).mean(0), atol=0.3)


@pytest.mark.parametrize("shape_xy", [(17, 23), (64, 70), (40, 36)])
def test_linear_resize_matches_scipy_pixel_centre_resampling(shape_xy):
    ndimage = pytest.importorskip("scipy.ndimage")
    vol = np.random.default_rng(3).random((40, 36, 2)).astype(np.float32)
    scale = np.array([40 / shape_xy[0], 36 / shape_xy[1]])
    expected = np.stack(
        [
            ndimage.affine_transform(
                vol[:, :, k], scale, offset=0.5 * scale - 0.5, output_shape=shape_xy, order=1, mode="nearest"
            )
            for k in range(2)
        ],
        axis=2,
    )
    assert np.allclose(resize_back(vol, shape_xy, order=1), expected, atol=1e-5)


def test_resize_rejects_other_orders():
    with pytest.raises(ValueError, match="order"):
        resize_slices(np.zeros((4, 4, 1)), 8, order=3)


def test_resize_same_size_is_identity():
    vol = np.random.default_rng(2).random((12, 12, 3)).astype(np.float32)
    assert np.array_equal(resize_slices(vol, 12, order=1), vol)


def test_preprocess_case_shapes_and_ranges(cases):
    case = cases[2]
    images, labels = preprocess_case(case, PREP)
    z = case.image.shape[2]
    assert images.shape == labels.shape == (z, SIZE, SIZE)
    assert images.dtype == np.float16 and labels.dtype == np.uint8
    assert images.flags.c_contiguous and labels.flags.c_contiguous
    assert images.min() >= 0 and images.max() <= 1
    assert set(np.unique(labels)) == {0, 1}
    assert np.array_equal(labels.reshape(z, -1).any(1), case.label.reshape(-1, z).any(0))


def test_preprocess_image_equals_the_public_resize_route(cases):
    # Inference built from normalize_intensity + resize_slices must see exactly the cached training inputs.
    image = cases[0].image
    route = np.moveaxis(resize_slices(normalize_intensity(image, 1.0, 99.0), SIZE, order=1), 2, 0).astype(np.float16)
    assert np.array_equal(preprocess_image(image, Preprocessing(SIZE, 1.0, 99.0)), route)


def test_preprocessing_reads_back_from_a_config_and_its_flat_view():
    cfg = Config().replace(**{"data.image_size": 56, "data.clip_low": 1, "data.clip_high": 99})
    prep = Preprocessing.from_config(cfg)
    assert prep == Preprocessing.from_flat(cfg.to_flat()) == Preprocessing(56, 1.0, 99.0)
    assert prep.as_dict() == {"image_size": 56, "clip_low": 1.0, "clip_high": 99.0}
    assert type(prep.image_size) is int and type(prep.clip_low) is float
    assert len({prep, Preprocessing(np.int64(56), 1, 99)}) == 1  # hashable, numpy scalars normalised
    with pytest.raises(dataclasses.FrozenInstanceError):
        prep.image_size = 14
    with pytest.raises(KeyError, match="data.clip_high"):
        Preprocessing.from_flat({"data.image_size": 56, "data.clip_low": 1.0})
