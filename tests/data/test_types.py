"""The plain containers passed between the data stages (lasegseg.data.types)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lasegseg.data.types import Case, LoadedCase, Volume


def test_volume_spacing_is_the_length_of_each_voxel_axis_in_world_space():
    affine = np.array([[0.0, -2.0, 0.0, 10.0], [0.6, 0.0, 0.0, -4.0], [0.8, 0.0, 3.0, 7.0], [0, 0, 0, 1]])
    vol = Volume(np.zeros((2, 3, 4), np.float32), affine, Path("scan.nii.gz"))
    assert vol.spacing == pytest.approx((1.0, 2.0, 3.0))
    assert all(type(s) is float for s in vol.spacing)
    assert vol.header is None


def test_cases_compare_by_value_and_loaded_cases_get_their_own_meta():
    assert Case("a", Path("i.nii"), Path("l.nii"), "msd") == Case("a", Path("i.nii"), Path("l.nii"), "msd")
    assert Case("a", Path("i.nii"), Path("l.nii"), "msd") != Case("a", Path("i.nii"), Path("l.nii"), "generic")
    first, second = (LoadedCase(cid, np.zeros(1), np.zeros(1, bool), np.eye(4), (1.0, 1.0, 1.0)) for cid in "ab")
    first.meta["layout"] = "msd"
    assert second.meta == {} and first.image_path is None and first.label_path is None
