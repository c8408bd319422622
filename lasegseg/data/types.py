"""Plain containers passed between the data stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Volume:
    """A volume as read from disk, in the file's own orientation.

    Args:
        data: 3D array as stored (float32 for images; any numeric dtype as read).
        affine: 4x4 voxel → RAS+ world (mm) matrix.
        path: the file it came from.
        header: format-specific header kept so a mask can be written back "like" this file.
    """

    data: np.ndarray
    affine: np.ndarray
    path: Path
    header: Any = None

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


@dataclass
class Case:
    """One patient of a dataset: where its image and label live and how to read the label."""

    case_id: str
    image_path: Path
    label_path: Path
    layout: str


@dataclass
class LoadedCase:
    """A validated case in canonical RAS+ orientation: axial slices are ``image[:, :, k]``.

    Args:
        image: float32 (X, Y, Z), raw intensities (not normalised).
        label: bool (X, Y, Z), True on the left atrium after the layout's label rule.
        affine: 4x4 canonical voxel → world matrix.
        spacing: voxel size in mm along (X, Y, Z).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    image_path: Path | None = None
    label_path: Path | None = None
    meta: dict = field(default_factory=dict)
