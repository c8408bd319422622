"""NIfTI files: the stored data and header, the header checks made before nibabel reads anything, and writing
masks without the reference's intensity scaling (lasegseg.data.nifti_file)."""

from __future__ import annotations

import struct

import nibabel as nib
import numpy as np
import pytest

from lasegseg.data.io import read_volume, write_like
from lasegseg.data.nifti_file import read_nifti
from lasegseg.data.volume_checks import VolumeError
from tests.data.conftest import AFFINE


def test_write_like_drops_reference_intensity_scaling(tmp_path):
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.int16), AFFINE)
    img.header.set_slope_inter(2.5, -7.0)
    nib.save(img, tmp_path / "ref.nii.gz")
    reference = read_volume(tmp_path / "ref.nii.gz")
    out = write_like(tmp_path / "mask.nii.gz", np.ones((4, 4, 4), np.uint8), reference)
    np.testing.assert_array_equal(read_volume(out, label=True).data, 1)


def test_read_nifti_returns_the_stored_data_affine_and_a_header_copy(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    img = nib.Nifti1Image(data, AFFINE)
    nib.save(img, tmp_path / "v.nii")
    out, affine, header = read_nifti(tmp_path / "v.nii")
    assert out.dtype == np.int16 and np.array_equal(out, data)
    np.testing.assert_allclose(affine, AFFINE)
    assert isinstance(header, nib.Nifti1Header) and header is not img.header


def test_an_extension_that_does_not_fit_before_the_data_is_refused(tmp_path):
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), AFFINE)
    img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"x" * 24))
    nib.save(img, tmp_path / "v.nii")
    raw = bytearray((tmp_path / "v.nii").read_bytes())
    raw[352:356] = struct.pack("<i", 1 << 30)  # the first extension now claims a gigabyte
    (tmp_path / "v.nii").write_bytes(bytes(raw))
    with pytest.raises(VolumeError, match="header extension of 1073741824 bytes does not fit before the data"):
        read_nifti(tmp_path / "v.nii")


def test_complex_voxels_are_refused(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.complex64), AFFINE), tmp_path / "c.nii.gz")
    with pytest.raises(VolumeError, match="unsupported voxel type complex64"):
        read_nifti(tmp_path / "c.nii.gz")
