"""NRRD files: anatomical spaces to RAS+ and back, and the payload checks made before pynrrd decodes anything
(lasegseg.data.nrrd_file)."""

from __future__ import annotations

import gzip

import nrrd
import numpy as np
import pytest

from lasegseg.data import nrrd_file
from lasegseg.data.io import read_volume, write_like
from lasegseg.data.nrrd_file import read_nrrd
from lasegseg.data.volume_checks import VolumeError
from tests.data.conftest import AFFINE, nrrd_header, volume_data


@pytest.mark.parametrize("space", ["left-posterior-superior", "right-anterior-superior", "LPS", "RAS"])
def test_nrrd_space_is_converted_to_ras(tmp_path, space):
    full = nrrd_file._SPACE_ABBREV.get(space, space)
    header = nrrd_header(full)
    header["space"] = space
    nrrd.write(str(tmp_path / "v.nrrd"), volume_data(), header)
    np.testing.assert_allclose(read_volume(tmp_path / "v.nrrd").affine, AFFINE)


def test_nrrd_without_space_directions_uses_spacings_or_unit(tmp_path):
    nrrd.write(str(tmp_path / "s.nrrd"), volume_data(), {"spacings": [0.625, 0.625, 2.5]})
    nrrd.write(str(tmp_path / "u.nrrd"), volume_data(), {})
    np.testing.assert_allclose(read_volume(tmp_path / "s.nrrd").affine, np.diag([0.625, 0.625, 2.5, 1]))
    np.testing.assert_allclose(read_volume(tmp_path / "u.nrrd").affine, np.eye(4))


def test_write_like_keeps_the_nrrd_space_of_the_reference(tmp_path):
    nrrd.write(str(tmp_path / "ref.nrrd"), volume_data(), nrrd_header("right-anterior-superior"))
    reference = read_volume(tmp_path / "ref.nrrd")
    out = write_like(tmp_path / "mask.nrrd", np.ones(reference.data.shape, np.uint8), reference)
    header = nrrd.read_header(str(out))
    assert header["space"] == "right-anterior-superior"
    np.testing.assert_allclose(header["space directions"], nrrd_header("right-anterior-superior")["space directions"])
    np.testing.assert_allclose(read_volume(out).affine, AFFINE)


def _header(body: str) -> bytes:
    return f"NRRD0004\ntype: uint8\ndimension: 3\nsizes: 2 2 2\n{body}\n".encode()


def test_read_nrrd_returns_the_stored_data_and_the_ras_affine(tmp_path):
    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    nrrd.write(str(tmp_path / "v.nrrd"), data, nrrd_header(), index_order="F")
    out, affine, header = read_nrrd(tmp_path / "v.nrrd")
    assert out.dtype == np.int16 and np.array_equal(out, data)
    np.testing.assert_allclose(affine, AFFINE)
    assert header["space"] == "left-posterior-superior"


@pytest.mark.parametrize(
    ("body", "payload", "phrase"),
    [
        ("encoding: gzip\n", gzip.compress(bytes(2 * 1024**2)), "compressed data holds more than the 8 bytes"),
        ("encoding: raw\ndata file: ../outside.raw\n", b"", "points outside the folder of the header"),
        ("encoding: raw\ndata file: LIST\n", b"", "is not a single file name"),
        ("encoding: raw\nline skip: 1000000\n", bytes(8), "'line skip' 1000000 is out of range"),
        ("encoding: raw\nbyte skip: -2\n", bytes(8), "'byte skip' -2 is out of range"),
        (
            "encoding: raw\nspace: left-right-up\nspace directions: (1,0,0) (0,1,0) (0,0,1)\n",
            bytes(8),
            "unsupported NRRD space 'left-right-up'",
        ),
    ],
)
def test_what_pynrrd_would_read_unboundedly_is_refused_first(tmp_path, body, payload, phrase):
    path = tmp_path / "v.nrrd"
    path.write_bytes(_header(body) + payload)
    (tmp_path.parent / "outside.raw").write_bytes(bytes(8))
    with pytest.raises(VolumeError, match=phrase) as info:
        read_nrrd(path)
    assert info.value.path == path and "\n" not in str(info.value)
