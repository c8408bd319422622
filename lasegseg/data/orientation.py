"""The canonical (RAS+) orientation: axis 0 → right, 1 → anterior, 2 → superior, so axial slices are last.

Only permutations and flips (no resampling): :func:`to_canonical` and its inverse :func:`from_canonical`.
"""

from __future__ import annotations

import numpy as np
from nibabel import orientations


def to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder and flip axes so the array is RAS+: axis 0 → right, 1 → anterior, 2 → superior (axial slices last).

    Only permutations and flips are applied (no resampling); oblique scans go to the closest RAS+ axes.

    Args:
        data: 3D array in the file's orientation.
        affine: its 4x4 voxel → RAS+ world matrix.

    Returns:
        ``(data_c, affine_c, ornt)``: the contiguous canonical array, its affine, and the nibabel orientation that
        :func:`from_canonical` needs to undo it.
    """
    ornt = orientations.io_orientation(affine)
    data_c = np.ascontiguousarray(orientations.apply_orientation(data, ornt))
    affine_c = affine @ orientations.inv_ornt_aff(ornt, data.shape)
    return data_c, affine_c, ornt


def from_canonical(data_c: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Undo :func:`to_canonical`: bring a canonical array (e.g. a predicted mask) back to the file's orientation.

    Args:
        data_c: array in canonical RAS+ order.
        ornt: the orientation returned by :func:`to_canonical`.
    """
    identity = orientations.axcodes2ornt(("R", "A", "S"))
    back = orientations.ornt_transform(identity, np.asarray(ornt))
    return np.ascontiguousarray(orientations.apply_orientation(data_c, back))
