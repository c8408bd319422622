"""Reading, writing and reorienting volumes (lasegseg.data.io)."""

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
from nibabel import orientations

from lasegseg.data import io
from lasegseg.data.io import VolumeError, from_canonical, read_volume, to_canonical, write_like, write_volume
from lasegseg.data.types import Volume
from lasegseg.errors import DataError

AFFINE = np.array([[-1.25, 0, 0, 40.0], [0, 1.25, 0, -30.0], [0, 0, 2.5, 12.5], [0, 0, 0, 1]])


def _data(shape=(12, 10, 6), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100, 20, shape).astype(np.float32)


def _nrrd_header(space: str | None = "left-posterior-superior") -> dict:
    """NRRD space fields equal to AFFINE (RAS) in the given space."""
    signs = np.array([-1.0, -1.0, 1.0]) if space == "left-posterior-superior" else np.ones(3)
    header = {"space directions": (AFFINE[:3, :3] * signs[:, None]).T, "space origin": AFFINE[:3, 3] * signs}
    if space is not None:
        header["space"] = space
    return header


@pytest.mark.parametrize("ext", [".nii.gz", ".nii", ".nrrd"])
def test_write_then_read_keeps_data_and_affine(tmp_path, ext):
    data = _data()
    path = write_volume(tmp_path / f"v{ext}", data, AFFINE)
    vol = read_volume(path)
    assert vol.data.dtype == np.float32
    np.testing.assert_array_equal(vol.data, data)
    np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)
    assert vol.spacing == pytest.approx((1.25, 1.25, 2.5))


@pytest.mark.parametrize("space", ["left-posterior-superior", "right-anterior-superior", "LPS", "RAS"])
def test_nrrd_space_is_converted_to_ras(tmp_path, space):
    full = io._SPACE_ABBREV.get(space, space)
    header = _nrrd_header(full)
    header["space"] = space
    nrrd.write(str(tmp_path / "v.nrrd"), _data(), header)
    np.testing.assert_allclose(read_volume(tmp_path / "v.nrrd").affine, AFFINE)


def test_nrrd_without_space_directions_uses_spacings_or_unit(tmp_path):
    nrrd.write(str(tmp_path / "s.nrrd"), _data(), {"spacings": [0.625, 0.625, 2.5]})
    nrrd.write(str(tmp_path / "u.nrrd"), _data(), {})
    np.testing.assert_allclose(read_volume(tmp_path / "s.nrrd").affine, np.diag([0.625, 0.625, 2.5, 1]))
    np.testing.assert_allclose(read_volume(tmp_path / "u.nrrd").affine, np.eye(4))


def test_label_mode_keeps_integer_dtype(tmp_path):
    labels = (np.arange(12 * 10 * 6).reshape(12, 10, 6) % 3).astype(np.uint8)
    for ext in (".nii.gz", ".nrrd"):
        vol = read_volume(write_volume(tmp_path / f"l{ext}", labels, AFFINE), label=True)
        assert vol.data.dtype == np.uint8
        np.testing.assert_array_equal(vol.data, labels)


def test_trailing_singleton_dimension_is_squeezed(tmp_path):
    data = _data()
    nib.save(nib.Nifti1Image(data[..., None], AFFINE), tmp_path / "v.nii.gz")
    header = _nrrd_header()
    header["space directions"] = np.vstack([header["space directions"], np.full(3, np.nan)])
    header["kinds"] = ["domain"] * 3 + ["list"]
    nrrd.write(str(tmp_path / "v.nrrd"), data[..., None], header)
    for name in ("v.nii.gz", "v.nrrd"):
        vol = read_volume(tmp_path / name)
        assert vol.data.shape == data.shape
        np.testing.assert_allclose(vol.affine, AFFINE, atol=1e-5)


# ------------------------------------------------------------------------------------------------ bad files


def _valid(path: Path) -> Path:
    return write_volume(path, _data(), AFFINE)


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
    nib.save(nib.Nifti1Image(_data(), None, header), d / "flat_affine.nii.gz")
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


# ------------------------------------------------------------------------------------------------ orientation


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


# ------------------------------------------------------------------------------------------------ writing masks


@pytest.mark.parametrize(("ref_ext", "out_ext"), list(itertools.product([".nii.gz", ".nrrd"], [".nii.gz", ".nrrd"])))
def test_write_like_keeps_the_reference_grid(tmp_path, ref_ext, out_ext):
    reference = read_volume(write_volume(tmp_path / f"ref{ref_ext}", _data() * 3.7, AFFINE))
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
            assert stat.S_IMODE(write_volume(tmp_path / name, _data(), AFFINE).stat().st_mode) == 0o640
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.nii", "v.nii.gz", "v.nrrd"]  # no temporary left
    assert (tmp_path / "v.nii.gz").read_bytes()[:2] == b"\x1f\x8b"  # gzip, as the extension asks
    assert (tmp_path / "v.nii").read_bytes()[344:348] == b"n+1\x00"  # an uncompressed single-file NIfTI-1


def test_write_like_keeps_the_nrrd_space_of_the_reference(tmp_path):
    nrrd.write(str(tmp_path / "ref.nrrd"), _data(), _nrrd_header("right-anterior-superior"))
    reference = read_volume(tmp_path / "ref.nrrd")
    out = write_like(tmp_path / "mask.nrrd", np.ones(reference.data.shape, np.uint8), reference)
    header = nrrd.read_header(str(out))
    assert header["space"] == "right-anterior-superior"
    np.testing.assert_allclose(header["space directions"], _nrrd_header("right-anterior-superior")["space directions"])
    np.testing.assert_allclose(read_volume(out).affine, AFFINE)


def test_write_like_drops_reference_intensity_scaling(tmp_path):
    img = nib.Nifti1Image(np.ones((4, 4, 4), np.int16), AFFINE)
    img.header.set_slope_inter(2.5, -7.0)
    nib.save(img, tmp_path / "ref.nii.gz")
    reference = read_volume(tmp_path / "ref.nii.gz")
    out = write_like(tmp_path / "mask.nii.gz", np.ones((4, 4, 4), np.uint8), reference)
    np.testing.assert_array_equal(read_volume(out, label=True).data, 1)


@pytest.mark.parametrize("out_ext", [".nii.gz", ".nrrd"])
def test_write_like_is_atomic(tmp_path, monkeypatch, out_ext):
    reference = Volume(_data(), AFFINE, tmp_path / "ref.nii.gz")
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
    reference = Volume(_data(), AFFINE, tmp_path / "ref.nii.gz")
    with pytest.raises(DataError, match="differs from reference shape"):
        write_like(tmp_path / "mask.nii.gz", np.zeros((3, 3, 3), np.uint8), reference)
    assert not (tmp_path / "mask.nii.gz").exists()
