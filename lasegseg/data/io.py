"""Reading and writing NIfTI / NRRD volumes, and the canonical (RAS+) orientation.

Every failure to read user data raises :class:`VolumeError` (a :class:`~lasegseg.errors.DataError`) whose one-line
message starts with the file at fault, so validation can report many bad files at once and the CLI can print the
message alone.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import os
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import nrrd
import numpy as np
from nibabel import orientations
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from lasegseg.data.types import Volume
from lasegseg.errors import DataError
from lasegseg.fsio import atomic_write, plain_file_mode

# Refuse volumes whose decoded data would exceed this many bytes: a corrupt or hostile header must not make us
# allocate (or try to allocate) terabytes. The largest real LA scans (640² × 88 float32) are ~150 MB.
MAX_VOLUME_BYTES = 2 * 1024**3
# Header plus extensions before the voxel data; real NIfTI extensions (DICOM dumps, CIFTI XML) are well below this.
MAX_HEADER_BYTES = 16 * 1024**2
# Deflate cannot compress better than about 1032:1, so a .gz of N bytes cannot hold more than this many times N.
_GZIP_MAX_RATIO = 1100
# Above this, a compressed payload is counted (decompressed and discarded in chunks) before nibabel allocates the
# whole array: a small truncated .nii.gz must not make us reserve gigabytes for data that is not there.
_STREAM_CHECK_BYTES = 64 * 1024**2
# pynrrd skips 'line skip' lines one readline() at a time; an absurd value would spin for ever on an empty file.
_MAX_LINE_SKIP = 100_000
_CHUNK = 1024**2

NIFTI_EXTS = (".nii.gz", ".nii")
NRRD_EXTS = (".nrrd",)
SUPPORTED_EXTS = NIFTI_EXTS + NRRD_EXTS

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


class VolumeError(DataError):
    """A file cannot be used; ``path`` is the file and ``reason`` the one-line cause (``str`` joins both)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def volume_format(path: str | os.PathLike) -> str:
    """``"nifti"`` or ``"nrrd"`` from the file name; :class:`VolumeError` for any other extension.

    Args:
        path: a file name ending in ``.nii``, ``.nii.gz`` or ``.nrrd`` (case-insensitive).
    """
    name = Path(path).name.lower()
    if name.endswith(NIFTI_EXTS):
        return "nifti"
    if name.endswith(NRRD_EXTS):
        return "nrrd"
    raise VolumeError(path, f"unsupported file type (expected one of {', '.join(SUPPORTED_EXTS)})")


def strip_ext(name: str) -> str:
    """The file name without its volume extension (``la_003.nii.gz`` → ``la_003``).

    Args:
        name: a file name with a supported extension.
    """
    low = name.lower()
    for ext in SUPPORTED_EXTS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def read_volume(path: str | os.PathLike, *, label: bool = False) -> Volume:
    """Read a 3D NIfTI or NRRD volume with its voxel → RAS+ affine, in the file's own orientation.

    The header is read and checked first (dimensions, size) so an absurd header fails before any allocation.
    A 4D+ volume whose extra dimensions are all 1 is squeezed to 3D.

    Args:
        path: ``.nii``, ``.nii.gz`` or ``.nrrd`` file.
        label: keep the stored dtype (integer label values stay exact); otherwise the data is float32.
    """
    path = Path(path)
    fmt = volume_format(path)
    if not path.is_file():
        raise VolumeError(path, "missing file" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise VolumeError(path, "empty file (0 bytes)")
    data, affine, header = _read_nifti(path) if fmt == "nifti" else _read_nrrd(path)
    if not label:
        data = data.astype(np.float32, copy=False)
    return Volume(data=data, affine=affine, path=path, header=header)


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    with _reading(path, "NIfTI"):
        _check_nifti_extensions(path)
        # mmap=False: the data is copied anyway and an open memory map would pin the file (Windows, atomic writes).
        img = nib.load(path, mmap=False)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise VolumeError(path, f"not a NIfTI image ({type(img).__name__})")
        dtype = img.header.get_data_dtype()
        _check_dtype(path, dtype)
        shape = tuple(int(s) for s in img.header.get_data_shape())
        _check_size(path, shape, dtype.itemsize)
        shape3 = _spatial_shape(path, shape)
        offset = float(img.header.get_data_offset())
        if not np.isfinite(offset) or offset < 0:
            raise VolumeError(path, f"header vox_offset {offset:g} is not a valid data offset")
        _check_payload(path, int(offset) + int(np.prod(shape, dtype=object)) * dtype.itemsize)
        affine = np.asarray(img.affine, dtype=np.float64)
        data = np.asarray(img.dataobj).reshape(shape3)
    _check_affine(path, affine)
    return data, affine, img.header.copy()


def _check_nifti_extensions(path: Path) -> None:
    """Walk the NIfTI extension table with bounded reads before nibabel does.

    nibabel reads each extension with one ``read(esize)`` (esize up to 2 GiB) whatever the file holds, so a
    400-byte hostile file could make it reserve a gigabyte. Mirrors nibabel's own header parsing (magic picks the
    class; nibabel guesses the byte order) so the table walked is the one nibabel would read.
    """
    with gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb") as fh:
        head = fh.read(nib.Nifti2Header.sizeof_hdr + 4)
        klass = None
        if head[344:347] in (b"n+1", b"ni1"):
            klass = nib.Nifti1Header
        elif head[4:7] in (b"n+2", b"ni2"):
            klass = nib.Nifti2Header
        # Anything else nibabel refuses from the header alone, without reading further.
        if klass is None or len(head) < klass.sizeof_hdr + 4 or head[klass.sizeof_hdr] == 0:
            return
        hdr = klass(head[: klass.sizeof_hdr], check=True)
        start = klass.sizeof_hdr + 4
        vox_offset = float(hdr["vox_offset"])
        if not np.isfinite(vox_offset) or vox_offset > MAX_HEADER_BYTES:
            raise VolumeError(path, f"header vox_offset {vox_offset:g} is not a plausible data offset")
        # nibabel reads extensions up to vox_offset, or to the end of the file when vox_offset lies inside the header.
        remaining = int(vox_offset) - start
        to_eof = remaining < 0
        if to_eof:
            remaining = MAX_HEADER_BYTES
        size = None if isinstance(fh, gzip.GzipFile) else os.fstat(fh.fileno()).st_size
        fh.seek(start)
        while to_eof or remaining >= 16:
            pos = fh.tell()
            ext = fh.read(8)
            if len(ext) < 8:
                return  # the end: nibabel stops here, or reports the short read itself
            esize = int(np.frombuffer(ext, dtype=hdr.endianness + "i4")[0])
            if esize < 16 or esize > remaining:
                where = (
                    f"more than {MAX_HEADER_BYTES} bytes of extensions" if to_eof else "does not fit before the data"
                )
                raise VolumeError(path, f"header extension of {esize} bytes {where}")
            # Seeking forward reads nothing into memory (gzip inflates and drops); then the bytes must exist.
            fh.seek(pos + esize)
            if (size is not None and pos + esize > size) or (size is None and fh.tell() < pos + esize):
                raise VolumeError(path, f"truncated or corrupt NIfTI file (header extension of {esize} bytes is cut)")
            remaining -= esize


def _check_payload(path: Path, needed: int) -> None:
    """The file holds at least ``needed`` bytes (header + data), checked without allocating them."""
    have = path.stat().st_size
    if not path.name.lower().endswith(".gz"):
        if have < needed:
            raise VolumeError(
                path, f"truncated or corrupt NIfTI file (the header needs {needed} bytes, the file has {have})"
            )
        return
    if needed > have * _GZIP_MAX_RATIO:
        reason = f"the header needs {needed} bytes, more than {have} gzip bytes can hold"
        raise VolumeError(path, f"truncated or corrupt gzip ({reason})")
    if needed > _STREAM_CHECK_BYTES:
        with gzip.open(path, "rb") as fh:
            fh.seek(needed - 1)
            if not fh.read(1):
                raise VolumeError(
                    path, f"truncated or corrupt gzip (the header needs {needed} bytes, the stream has fewer)"
                )


def _check_dtype(path: Path, dtype: np.dtype) -> None:
    # Complex voxels would silently lose their imaginary part and RGB (structured) ones cannot become intensities.
    if dtype.kind not in "iuf":
        name = f"RGB-like record ({', '.join(dtype.names)})" if dtype.names else str(dtype)
        raise VolumeError(path, f"unsupported voxel type {name} (need integer or real scalars)")


def _read_nrrd(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    with _reading(path, "NRRD"):
        with open(path, "rb") as fh:
            header = nrrd.read_header(fh)
            data_start = fh.tell()
        shape = tuple(int(s) for s in np.atleast_1d(header.get("sizes", ())))
        kind = str(header.get("type", "")).strip().lower()
        if kind not in _NRRD_ITEMSIZE:
            raise VolumeError(path, f"unsupported NRRD type '{kind}'")
        _check_size(path, shape, _NRRD_ITEMSIZE[kind])
        affine, spatial = _nrrd_affine(path, header, shape)
        nbytes = int(np.prod(shape, dtype=object)) * _NRRD_ITEMSIZE[kind]
        _check_nrrd_payload(path, header, data_start, nbytes)
        data, header = nrrd.read(str(path), index_order="F")
        # Axes that are not spatial must be singletons (checked in _nrrd_affine); drop them.
        data = np.asarray(data).reshape(tuple(shape[i] for i in spatial))
    _check_affine(path, affine)
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


def _check_size(path: Path, shape: tuple[int, ...], itemsize: int) -> None:
    if not shape or any(s <= 0 for s in shape):
        raise VolumeError(path, f"header has a zero or negative dimension {shape}")
    # Python ints: no overflow for absurd headers. Images are converted to float32, so count at least 4 bytes.
    nbytes = int(np.prod([int(s) for s in shape], dtype=object)) * max(itemsize, 4)
    if nbytes > MAX_VOLUME_BYTES:
        need, limit = nbytes / 1024**3, MAX_VOLUME_BYTES / 1024**3
        raise VolumeError(path, f"header dimensions {shape} would need {need:.3g} GiB (limit {limit:g} GiB)")


def _spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise VolumeError(path, f"expected a 3D volume, got shape {shape}")
    return shape[0], shape[1], shape[2]


def _check_affine(path: Path, affine: np.ndarray) -> None:
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(path, "voxel-to-world matrix is singular or not finite (zero spacing?)")


@contextmanager
def _reading(path: Path, fmt: str) -> Iterator[None]:
    """Turn the many exceptions of nibabel / pynrrd / gzip into one :class:`VolumeError` naming the file.

    nibabel's header fix-up reports and the libraries' warnings are silenced here: the user gets the one line.
    """
    nib_log = logging.getLogger("nibabel.global")
    level = nib_log.level
    nib_log.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    except VolumeError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise VolumeError(path, f"truncated or corrupt gzip{_detail(exc, path)}") from exc
    except (ImageFileError, HeaderDataError) as exc:
        if path.name.lower().endswith(".gz") and "gzip" in str(exc).lower():
            raise VolumeError(path, "truncated or corrupt gzip (not a gzip stream)") from exc
        raise VolumeError(path, f"not a valid {fmt} file{_detail(exc, path)}") from exc
    except nrrd.NRRDError as exc:
        raise VolumeError(path, f"corrupt NRRD{_detail(exc, path)}") from exc
    except MemoryError as exc:
        raise VolumeError(path, "not enough memory to read the volume") from exc
    except RecursionError as exc:
        raise VolumeError(path, f"corrupt {fmt} file (nested too deeply)") from exc
    except (OSError, ValueError, ArithmeticError, KeyError, IndexError, TypeError, StopIteration) as exc:
        raise VolumeError(path, f"truncated or corrupt {fmt} file{_detail(exc, path)}") from exc
    finally:
        nib_log.setLevel(level)


def _detail(exc: BaseException, path: Path) -> str:
    """`` (first line of the library message)`` without the path it repeats, capped so messages stay one line."""
    lines = str(exc).strip().splitlines()
    first = lines[0].strip() if lines else ""
    for name in (str(path), path.name):
        first = first.replace(f'"{name}"', "the file").replace(f"'{name}'", "the file").replace(name, "the file")
    return f" ({first[:120]})" if first else ""


# ---------------------------------------------------------------------------------------------------- orientation


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


# ---------------------------------------------------------------------------------------------------- writing


def write_volume(path: str | os.PathLike, data: np.ndarray, affine: np.ndarray, *, header: Any = None) -> Path:
    """Write a 3D array atomically (temporary file in the same folder, then rename); the extension picks the format.

    Args:
        path: output ``.nii``, ``.nii.gz`` or ``.nrrd``.
        data: 3D array; its dtype is written as is.
        affine: 4x4 voxel → RAS+ matrix.
        header: optional header to start from (a NIfTI header, or an NRRD header dict whose ``space`` is kept).
    """
    path = Path(path)
    fmt = volume_format(path)
    if data.ndim != 3:
        raise VolumeError(path, f"can only write 3D volumes, got shape {data.shape}")
    ext = next(e for e in SUPPORTED_EXTS if path.name.lower().endswith(e))
    write = _write_nifti if fmt == "nifti" else _write_nrrd
    # The temporary file keeps the extension because nibabel picks the format (and gzip) from it.
    return atomic_write(path, lambda tmp: write(str(tmp), data, affine, header), mode=plain_file_mode(), suffix=ext)


def write_like(path: str | os.PathLike, mask: np.ndarray, reference: Volume) -> Path:
    """Write a uint8 mask on the grid of ``reference`` (same shape, affine and space), atomically.

    Args:
        path: output file; its extension decides the format, whatever the reference's format.
        mask: array in the reference file's orientation (see :func:`from_canonical`), cast to uint8.
        reference: the volume the mask was predicted from.
    """
    mask = np.asarray(mask)
    if mask.shape != reference.data.shape:
        raise VolumeError(path, f"mask shape {mask.shape} differs from reference shape {reference.data.shape}")
    return write_volume(path, mask.astype(np.uint8, copy=False), reference.affine, header=reference.header)


def _write_nifti(tmp: str, data: np.ndarray, affine: np.ndarray, header: Any) -> None:
    header = header.copy() if isinstance(header, (nib.Nifti1Header, nib.Nifti2Header)) else None
    cls = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    img = cls(data, affine, header)
    img.header.set_data_dtype(data.dtype)
    # A reference image's intensity scaling must not apply to a mask.
    img.header.set_slope_inter(1.0, 0.0)
    if header is None:
        img.header.set_qform(affine, code=1)
        img.header.set_sform(affine, code=1)
    img.to_filename(tmp)


def _write_nrrd(tmp: str, data: np.ndarray, affine: np.ndarray, header: Any) -> None:
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
