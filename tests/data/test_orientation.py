"""The canonical RAS+ orientation and its inverse (lasegseg.data.orientation)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from nibabel import orientations

from lasegseg.data.orientation import from_canonical, to_canonical


def _axis_affines():
    """Every permutation × flip of the axes, with random spacings and origins."""
    rng = np.random.default_rng(1)
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            affine = np.eye(4)
            affine[:3, :3] = 0
            for axis, (world, sign) in enumerate(zip(perm, signs, strict=True)):
                affine[world, axis] = sign * rng.uniform(0.5, 3.0)
            affine[:3, 3] = rng.uniform(-100, 100, 3)
            yield affine


def _rotated(deg: float) -> np.ndarray:
    t = np.deg2rad(deg)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]]) @ np.diag([1, 1, 3])
    return affine


@pytest.mark.parametrize("affine", [*_axis_affines(), _rotated(20.0), _rotated(-160.0)])
def test_to_canonical_is_ras_and_from_canonical_inverts_it(affine):
    shape = (5, 6, 7)
    data = np.arange(np.prod(shape)).reshape(shape)
    data_c, affine_c, ornt = to_canonical(data, affine)
    assert orientations.aff2axcodes(affine_c) == ("R", "A", "S")
    np.testing.assert_array_equal(from_canonical(data_c, ornt), data)
    # Every voxel keeps its world position: canonical index → original index via the stored value.
    idx_c = np.stack(np.meshgrid(*[np.arange(s) for s in data_c.shape], indexing="ij"), -1).reshape(-1, 3)
    idx = np.stack(np.unravel_index(data_c.reshape(-1), shape), -1)
    world_c = idx_c @ affine_c[:3, :3].T + affine_c[:3, 3]
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    np.testing.assert_allclose(world_c, world, atol=1e-9)


def test_an_lps_volume_is_flipped_along_x_and_y():
    data = np.arange(24).reshape(2, 3, 4)
    data_c, affine_c, _ = to_canonical(data, np.diag([-1.0, -2.0, 3.0, 1.0]))
    assert np.array_equal(data_c, data[::-1, ::-1, :]) and data_c.flags.c_contiguous
    np.testing.assert_allclose(affine_c, [[1, 0, 0, -1], [0, 2, 0, -4], [0, 0, 3, 0], [0, 0, 0, 1]])
