"""NRRD files: reading one with its header, data file and compressed payload checked before pynrrd decodes it,
its anatomical space converted to RAS+, and writing one.

What pynrrd would read unboundedly (a data file elsewhere, absurd skips, a decompression bomb) fails with a
:class:`~lasegseg.data.volume_checks.VolumeError` first.
"""

from __future__ import annotations

import bz2
import zlib
from pathlib import Path
from typing import Any

import nrrd
import numpy as np

from lasegseg.data.volume_checks import MAX_HEADER_BYTES, VolumeError, check_affine, check_size, reading

# pynrrd skips 'line skip' lines one readline() at a time; an absurd value would spin for ever on an empty file.
_MAX_LINE_SKIP = 100_000
_CHUNK = 1024**2

# Bytes per element of every NRRD type name in the format spec; read from the header alone so the size check
# happens before any data is decoded.
_NRRD_ITEMSIZE = {
    **dict.fromkeys(["signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"], 1),
    **dict.fromkeys(
        ["short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort", "unsigned short"]
        + ["unsigned short int", "uint16", "uint16_t"],
        2,
    ),
    **dict.fromkeys(
        ["int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"], 4
    ),
    **dict.fromkeys(
        ["longlong", "long long", "long long int", "signed long long", "signed long long int", "int64", "int64_t"]
        + ["ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t", "double"],
        8,
    ),
}

# Sign of each world axis of an anatomical NRRD space relative to RAS+.
_SPACE_SIGNS = {"right": 1.0, "left": -1.0, "anterior": 1.0, "posterior": -1.0, "superior": 1.0, "inferior": -1.0}
_SPACE_ABBREV = {"RAS": "right-anterior-superior", "LAS": "left-anterior-superior", "LPS": "left-posterior-superior"}


def read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(data, affine, header)`` of an NRRD file: the 3D data, its voxel → RAS+ affine (from the space fields)
    and the header; type, size, data file and compressed payload are checked before pynrrd decodes the data."""
    with reading(path, "NRRD"):
        with open(path, "rb") as fh:
            header = nrrd.read_header(fh)
            data_start = fh.tell()
        shape = tuple(int(s) for s in np.atleast_1d(header.get("sizes", ())))
        kind = str(header.get("type", "")).strip().lower()
        if kind not in _NRRD_ITEMSIZE:
            raise VolumeError(path, f"unsupported NRRD type '{kind}'")
        check_size(path, shape, _NRRD_ITEMSIZE[kind])
        affine, spatial = _nrrd_affine(path, header, shape)
        nbytes = int(np.prod(shape, dtype=object)) * _NRRD_ITEMSIZE[kind]
        _check_nrrd_payload(path, header, data_start, nbytes)
        data, header = nrrd.read(str(path), index_order="F")
        # Axes that are not spatial must be singletons (checked in _nrrd_affine); drop them.
        data = np.asarray(data).reshape(tuple(shape[i] for i in spatial))
    check_affine(path, affine)
    return data, affine, dict(header)


def _check_nrrd_payload(path: Path, header: dict, data_start: int, nbytes: int) -> None:
    """Refuse what pynrrd would read unboundedly: a data file elsewhere, absurd skips, a decompression bomb."""
    line_skip = int(header.get("line skip", header.get("lineskip", 0)))
    byte_skip = int(header.get("byte skip", header.get("byteskip", 0)))
    if not 0 <= line_skip <= _MAX_LINE_SKIP:
        raise VolumeError(path, f"NRRD 'line skip' {line_skip} is out of range (0 to {_MAX_LINE_SKIP})")
    if byte_skip < -1 or byte_skip > MAX_HEADER_BYTES:
        raise VolumeError(path, f"NRRD 'byte skip' {byte_skip} is out of range (-1 to {MAX_HEADER_BYTES})")
    source, start = path, data_start
    name = header.get("data file", header.get("datafile"))
    if name is not None:
        source, start = _nrrd_data_file(path, str(name).strip()), 0
    encoding = str(header.get("encoding", "")).strip().lower()
    if encoding not in ("gzip", "gz", "bzip2", "bz2"):
        return  # raw and text data are read as stored: bounded by the file's own size
    # pynrrd decompresses the whole stream before comparing with the sizes; count it first, in bounded chunks.
    limit = nbytes + max(byte_skip, 0) + _CHUNK
    with open(source, "rb") as fh:
        fh.seek(start)
        for _ in range(line_skip):
            fh.readline()
        if _decompressed_exceeds(fh, encoding.startswith("gz"), limit):
            raise VolumeError(path, f"compressed data holds more than the {nbytes} bytes its 'sizes' need")


def _decompressed_exceeds(fh, gz: bool, limit: int) -> bool:
    """Whether the compressed stream in ``fh`` inflates to more than ``limit`` bytes, holding 1 MiB at a time."""
    total = 0
    if gz:
        dec = zlib.decompressobj(zlib.MAX_WBITS | 16)
        pending = b""
        while not dec.eof:
            pending = pending or fh.read(_CHUNK)
            if not pending:
                break
            total += len(dec.decompress(pending, _CHUNK))
            pending = dec.unconsumed_tail
            if total > limit:
                return True
        return False
    bzd = bz2.BZ2Decompressor()
    while not bzd.eof:
        chunk = fh.read(_CHUNK) if bzd.needs_input else b""
        if bzd.needs_input and not chunk:
            break
        total += len(bzd.decompress(chunk, max_length=_CHUNK))
        if total > limit:
            return True
    return False


def _nrrd_data_file(path: Path, name: str) -> Path:
    """A detached NRRD's data file, which must be one file in the header's own folder (or below it)."""
    if not name or name.upper().startswith("LIST") or " " in name:
        raise VolumeError(path, f"NRRD 'data file' '{name}' is not a single file name (file lists are not supported)")
    folder = path.parent.resolve()
    target = (folder / name).resolve()
    if not target.is_relative_to(folder):
        raise VolumeError(path, f"NRRD 'data file' '{name}' points outside the folder of the header")
    if not target.is_file():
        raise VolumeError(path, f"NRRD 'data file' '{name}' is missing or not a regular file")
    return target


def _nrrd_affine(path: Path, header: dict, shape: tuple[int, ...]) -> tuple[np.ndarray, list[int]]:
    """Voxel → RAS+ affine from the NRRD space fields, and which data axes are spatial."""
    directions = header.get("space directions")
    if directions is not None:
        directions = np.asarray(directions, dtype=np.float64)
        if directions.ndim != 2 or directions.shape[0] != len(shape):
            raise VolumeError(path, "NRRD 'space directions' does not match 'sizes'")
        spatial = [i for i in range(len(shape)) if np.all(np.isfinite(directions[i]))]
    else:
        spatial = [i for i, s in enumerate(shape) if s > 1] if len(shape) > 3 else list(range(len(shape)))
    if len(spatial) != 3 or any(shape[i] != 1 for i in range(len(shape)) if i not in spatial):
        raise VolumeError(path, f"expected a 3D volume, got shape {shape}")
    affine = np.eye(4)
    if directions is not None:
        if directions.shape[1] != 3:
            raise VolumeError(path, f"expected a 3D space, got {directions.shape[1]}D 'space directions'")
        affine[:3, :3] = directions[spatial].T
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64)
        if origin.shape != (3,):
            raise VolumeError(path, "NRRD 'space origin' is not a 3-vector")
        affine[:3, 3] = np.nan_to_num(origin)
        signs = _space_signs(path, header.get("space"))
        affine[:3] *= signs[:, None]
    else:
        spacings = np.asarray(header.get("spacings", np.ones(len(shape))), dtype=np.float64)
        spacings = np.where(np.isfinite(spacings), spacings, 1.0)
        affine[:3, :3] = np.diag(spacings[spatial])
    return affine, spatial


def _space_signs(path: Path, space: Any) -> np.ndarray:
    """Per-axis sign taking a NRRD anatomical space to RAS+ (LPS flips x and y); non-anatomical spaces as is."""
    if space is None:
        return np.ones(3)
    name = _SPACE_ABBREV.get(str(space).strip().upper(), str(space).strip().lower())
    words = name.split("-")
    if len(words) == 3 and all(w in _SPACE_SIGNS for w in words):
        axes = [{"right": 0, "left": 0, "anterior": 1, "posterior": 1, "superior": 2, "inferior": 2}[w] for w in words]
        # NRRD anatomical spaces list x, y, z as (left|right, anterior|posterior, superior|inferior).
        if axes != [0, 1, 2]:
            raise VolumeError(path, f"unsupported NRRD space '{space}'")
        return np.array([_SPACE_SIGNS[w] for w in words])
    if name in ("scanner-xyz", "3d-right-handed"):
        return np.ones(3)
    raise VolumeError(path, f"unsupported NRRD space '{space}' (need a 3D anatomical space such as LPS or RAS)")


def write_nrrd(tmp: str, data: np.ndarray, affine: np.ndarray, header: Any) -> None:
    """Write ``data`` to the gzip-encoded NRRD file ``tmp`` in the anatomical space of ``header`` (an NRRD header
    dict) when it names one, else in left-posterior-superior."""
    space = "left-posterior-superior"
    if isinstance(header, dict) and header.get("space") is not None:
        name = _SPACE_ABBREV.get(str(header["space"]).strip().upper(), str(header["space"]).strip().lower())
        if len(name.split("-")) == 3 and all(w in _SPACE_SIGNS for w in name.split("-")):
            space = name
    signs = np.array([_SPACE_SIGNS[w] for w in space.split("-")])
    # The reference may have had extra singleton axes; rebuilding directions from its 3D affine keeps them consistent.
    out = {
        "space": space,
        # + 0.0 turns -0.0 into 0.0 so headers read cleanly.
        "space directions": (affine[:3, :3] * signs[:, None]).T + 0.0,
        "space origin": affine[:3, 3] * signs + 0.0,
        "kinds": ["domain"] * 3,
        "encoding": "gzip",
    }
    nrrd.write(tmp, np.asarray(data), out, index_order="F")
