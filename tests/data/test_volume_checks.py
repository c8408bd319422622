"""The failure vocabulary of the volume readers: one-line VolumeErrors naming the file, the header checks, and the
translation of library exceptions (lasegseg.data.volume_checks)."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import nrrd
import numpy as np
import pytest

from lasegseg.data.volume_checks import (
    MAX_VOLUME_BYTES,
    VolumeError,
    check_affine,
    check_size,
    reading,
    spatial_shape,
)
from lasegseg.errors import DataError

PATH = Path("/data/imagesTr/la_001.nii.gz")


def test_a_volume_error_is_a_data_error_that_starts_with_its_file():
    err = VolumeError(PATH, "missing file")
    assert isinstance(err, DataError) and (err.path, err.reason) == (PATH, "missing file")
    assert str(err) == "/data/imagesTr/la_001.nii.gz: missing file"


def test_sizes_are_checked_before_anything_is_allocated():
    check_size(PATH, (512, 512, 88), 2)
    side = int(round((MAX_VOLUME_BYTES / 4) ** (1 / 3))) + 1
    with pytest.raises(VolumeError, match=r"header dimensions \(\d+, \d+, \d+\) would need 2.01 GiB \(limit 2 GiB\)"):
        check_size(PATH, (side, side, side), 1)  # uint8 voxels still count as float32
    for shape in ((), (4, 0, 3), (4, -1, 3)):
        with pytest.raises(VolumeError, match="zero or negative dimension"):
            check_size(PATH, shape, 4)


def test_only_trailing_singleton_dimensions_are_dropped():
    assert spatial_shape(PATH, (4, 5, 6, 1, 1)) == (4, 5, 6)
    for shape in ((4, 5), (4, 5, 6, 2)):
        with pytest.raises(VolumeError, match=r"expected a 3D volume, got shape"):
            spatial_shape(PATH, shape)


def test_singular_or_non_finite_affines_are_refused():
    check_affine(PATH, np.diag([0.5, 0.5, 2.0, 1.0]))
    for affine in (np.diag([1.0, 0.0, 1.0, 1.0]), np.diag([1.0, np.nan, 1.0, 1.0])):
        with pytest.raises(VolumeError, match="singular or not finite"):
            check_affine(PATH, affine)


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (zlib.error("invalid stored block lengths"), "truncated or corrupt gzip (invalid stored block lengths)"),
        (EOFError(), "truncated or corrupt gzip"),
        (nrrd.NRRDError("bad field"), "corrupt NRRD (bad field)"),
        (ValueError(f"cannot read '{PATH}'\nmore"), "truncated or corrupt NIfTI file (cannot read the file)"),
        (MemoryError(), "not enough memory to read the volume"),
        (RecursionError(), "corrupt NIfTI file (nested too deeply)"),
        (VolumeError(PATH, "as raised"), "as raised"),
    ],
)
def test_library_errors_become_one_line_naming_the_file(error, reason):
    nib_log = logging.getLogger("nibabel.global")
    before = nib_log.level
    with pytest.raises(VolumeError) as info, reading(PATH, "NIfTI"):
        raise error
    assert info.value.path == PATH and info.value.reason == reason
    assert nib_log.level == before  # nibabel's own reports are silenced only while reading


def test_other_errors_pass_through():
    with pytest.raises(KeyboardInterrupt), reading(PATH, "NRRD"):
        raise KeyboardInterrupt
