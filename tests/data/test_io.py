"""Reading and writing volumes through the front door: the extension picks the format, bad files fail with one
line naming them, writes are atomic (lasegseg.data.io)."""

from __future__ import annotations

import itertools
import os
import stat
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import nrrd
import numpy as np
import pytest

from lasegseg.data.io import read_volume, strip_ext, volume_format, write_like, write_volume
from lasegseg.data.types import Volume
from lasegseg.data.volume_checks import VolumeError
from lasegseg.errors import DataError
from tests.data.conftest import AFFINE, nrrd_header, volume_data


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd"])
def test_write_then_read_keeps_data_and_affine(tmp_path, ext):
    data = volume_data()
    path = write_volume(tmp_path / f"v{ext}", data, AFFINE)
    vol = read_volume(path)
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)
    assert vol.spacing == pytest.approx((1.25, 1.25, 2.5))


def test_label_mode_keeps_integer_dtype(tmp_path):
    labels = (np.arange(12 * 10 * 6).reshape(12, 10, 6) % 3).astype(np.uint8)
    for ext in (".nii.gz", ".nrrd"):
        vol = read_volume(write_volume(tmp_path / f"l{ext}", labels, AFFINE), label=True)
        assert vol.data.dtype == np.uint8
        np.testing.assert_array_equal(vol.data, labels)


def test_trailing_singleton_dimension_is_squeezed(tmp_path):
    data = volume_data()
    nib.save(nib.Nifti1Image(data[..., None], AFFINE), tmp_path / "v.nii.gz")
    header = nrrd_header()
    header["space directions"] = np.vstack([header["space directions"], np.full(3, np.nan)])
    header["kinds"] = ["domain"] * 3 + ["list"]
    nrrd.write(str(tmp_path / "v.nrrd"), data[..., None], header)
    for name in ("v.nii.gz", "v.nrrd"):
        vol = read_volume(tmp_path / name)
        assert vol.data.shape == data.shape
        np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)


# ------------------------------------------------------------------------------------------------ bad files


def _valid(path: Path) -> Path:
    return write_volume(path, volume_data(), AFFINE)


def _truncate(path: Path, keep: float = 0.5) -> Path:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])
    return path


def _truncated_nii_gz(d: Path) -> Path:
    return _truncate(_valid(d / "t.nii.gz"))


def _truncated_nii(d: Path) -> Path:
    return _truncate(_valid(d / "t.nii"), 0.7)


def _garbage_nii_gz(d: Path) -> Path:
    (d / "g.nii.gz").write_bytes(os.urandom(600))
    return d / "g.nii.gz"


def _corrupt_nrrd(d: Path) -> Path:
    (d / "c.nrrd").write_bytes(b"not an nrrd\n" + os.urandom(300))
    return d / "c.nrrd"


def _truncated_nrrd(d: Path) -> Path:
    return _truncate(_valid(d / "t.nrrd"), 0.6)


def _nifti_2d(d: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), d / "flat.nii.gz")
    return d / "flat.nii.gz"


def _nifti_4d(d: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.float32), np.eye(4)), d / "time.nii.gz")
    return d / "time.nii.gz"


def _nrrd_2d(d: Path) -> Path:
    nrrd.write(str(d / "flat.nrrd"), np.zeros((8, 8), np.float32))
    return d / "flat.nrrd"


def _negative_dim(d: Path) -> Path:
    header = nib.Nifti1Header()
    header.set_data_shape((10, 10, 10))
    header["dim"][2] = -4
    with open(d / "neg.nii", "wb") as f:
        header.write_to(f)
    return d / "neg.nii"


def _absurd_nifti(d: Path) -> Path:
    # NIfTI-2 stores 64-bit dims: a 100000³ header with no data behind it.
    header = nib.Nifti2Header()
    header.set_data_shape((100000, 100000, 100000))
    header.set_data_dtype(np.int16)
    with open(d / "huge.nii", "wb") as f:
        header.write_to(f)
    return d / "huge.nii"


def _absurd_nrrd(d: Path) -> Path:
    (d / "huge.nrrd").write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 100000 100000 100000\nencoding: raw\n\n")
    return d / "huge.nrrd"


def _singular_affine(d: Path) -> Path:
    header = nib.Nifti1Header()
    # sform only: nibabel refuses to encode a singular qform, but a file can still carry a singular sform.
    header.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)
    nib.save(nib.Nifti1Image(volume_data(), None, header), d / "flat_affine.nii.gz")
    return d / "flat_affine.nii.gz"


BAD_FILES = {
    "missing file": (lambda d: d / "nope.nii.gz", "missing file"),
    "unknown extension": (lambda d: d / "scan.mha", "unsupported file type"),
    "truncated .nii.gz": (_truncated_nii_gz, "truncated or corrupt gzip"),
    "truncated .nii": (_truncated_nii, "truncated or corrupt NIfTI"),
    "garbage .nii.gz": (_garbage_nii_gz, "truncated or corrupt gzip"),
    "corrupt .nrrd": (_corrupt_nrrd, "corrupt NRRD"),
    "truncated .nrrd": (_truncated_nrrd, "NRRD"),
    "2D NIfTI": (_nifti_2d, "expected a 3D volume"),
    "4D NIfTI": (_nifti_4d, "expected a 3D volume"),
    "2D NRRD": (_nrrd_2d, "expected a 3D volume"),
    "negative dim": (_negative_dim, "zero or negative dimension"),
    "absurd NIfTI dims": (_absurd_nifti, "GiB"),
    "absurd NRRD dims": (_absurd_nrrd, "GiB"),
    "singular affine": (_singular_affine, "singular"),
}


@pytest.mark.parametrize("case", list(BAD_FILES), ids=list(BAD_FILES))
def test_bad_file_raises_one_line_error_naming_it(tmp_path, case):
    make, phrase = BAD_FILES[case]
    path = make(tmp_path)
    with pytest.raises(DataError) as info:
        read_volume(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert phrase in message
    assert "\n" not in message
    assert isinstance(info.value, VolumeError) and info.value.path == path


@pytest.mark.parametrize("make", [_absurd_nifti, _absurd_nrrd])
def test_absurd_header_is_refused_before_allocating(tmp_path, make):
    path = make(tmp_path)
    tracemalloc.start()
    start = time.perf_counter()
    with pytest.raises(DataError, match="limit"):
        read_volume(path)
    elapsed = time.perf_counter() - start
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 20 * 1024**2
    assert elapsed < 2.0


# ------------------------------------------------------------------------------------------------ writing masks


@pytest.mark.parametrize(("ref_ext", "out_ext"), list(itertools.product([".nii.gz", ".nrrd"], [".nii.gz", ".nrrd"])))
def test_write_like_keeps_the_reference_grid(tmp_path, ref_ext, out_ext):
    reference = read_volume(write_volume(tmp_path / f"ref{ref_ext}", volume_data() * 3.7, AFFINE))
    mask = reference.data > 100
    out = write_like(tmp_path / f"mask{out_ext}", mask, reference)
    back = read_volume(out, label=True)
    assert back.data.dtype == np.uint8
    np.testing.assert_array_equal(back.data, mask.astype(np.uint8))
    np.testing.assert_allclose(back.affine, reference.affine, atol=1e-5)
    if out_ext == ".nrrd":
        assert nrrd.read_header(str(out))["space"] == "left-posterior-superior"
    else:
        header = nib.load(out).header
        assert header.get_data_dtype() == np.uint8
        assert header.get_slope_inter() in ((None, None), (1.0, 0.0))


def test_written_volumes_get_plain_permissions_and_their_format(tmp_path):
    old = os.umask(0o027)
    try:
        for name in ("v.nii.gz", "v.nii", "v.nrrd"):
            assert stat.S_IMODE(write_volume(tmp_path / name, volume_data(), AFFINE).stat().st_mode) == 0o640
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii", "v.nii.gz", "v.nrrd"]  # no temporary left
    assert (tmp_path / "v.nii.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip, as the extension asks
    assert (tmp_path / "v.nii").read_bytes()[344:348] == b"n+1\x00"  # an uncompressed single-file NIfTI-1


@pytest.mark.parametrize("out_ext", [".nii.gz", ".nrrd"])
def test_write_like_is_atomic(tmp_path, monkeypatch, out_ext):
    reference = Volume(volume_data(), AFFINE, tmp_path / "ref.nii.gz")
    out = tmp_path / f"mask{out_ext}"
    out.write_bytes(b"previous result")

    def broken(path, *args, **kwargs):
        Path(path).write_bytes(b"half written")
        raise OSError("disk full")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", lambda self, path: broken(path))
    monkeypatch.setattr(nrrd, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        write_like(out, np.zeros(reference.data.shape, np.uint8), reference)
    assert out.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_write_like_refuses_a_mask_of_another_shape(tmp_path):
    reference = Volume(volume_data(), AFFINE, tmp_path / "ref.nii.gz")
    with pytest.raises(DataError, match="differs from reference shape"):
        write_like(tmp_path / "mask.nii.gz", np.zeros((3, 3, 3), np.uint8), reference)
    assert not (tmp_path / "mask.nii.gz").exists()


def test_the_extension_picks_the_format_and_is_stripped_from_case_names():
    assert [volume_format(n) for n in ("a.nii.gz", "B.NII", "c.nrrd")] == ["nifti", "nifti", "nrrd"]
    with pytest.raises(VolumeError) as info:
        volume_format("scan.mha")
    assert str(info.value) == "scan.mha: unsupported file type (expected one of .nii.gz, .nii, .nrrd)"
    assert [strip_ext(n) for n in ("la_003.nii.gz", "x.NRRD", "notes.txt")] == ["la_003", "x", "notes.txt"]


def test_only_3d_arrays_are_written(tmp_path):
    with pytest.raises(VolumeError, match=r"can only write 3D volumes, got shape \(4, 4\)"):
        write_volume(tmp_path / "flat.nii.gz", np.zeros((4, 4)), AFFINE)
    assert list(tmp_path.iterdir()) == []
