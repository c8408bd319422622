"""NIfTI files: reading one with its header checked before nibabel allocates anything, and writing one.

A hostile or corrupt header (absurd dimensions, a gigabyte extension, a truncated gzip) fails with a
:class:`~lasegseg.data.volume_checks.VolumeError` before any large allocation.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from lasegseg.data.volume_checks import (
    MAX_HEADER_BYTES,
    VolumeError,
    check_affine,
    check_size,
    reading,
    spatial_shape,
)

# Deflate cannot compress better than about 1032:1, so a .gz of N bytes cannot hold more than this many times N.
_GZIP_MAX_RATIO = 1100
# Above this, a compressed payload is counted (decompressed and discarded in chunks) before nibabel allocates the
# whole array: a small truncated .nii.gz must not make us reserve gigabytes for data that is not there.
_STREAM_CHECK_BYTES = 64 * 1024**2


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, Any]:
    """``(data, affine, header)`` of a NIfTI-1/2 file: the 3D data as stored, its voxel → RAS+ affine and a copy
    of its header; the extension table, dimensions, size and payload are checked before the data is read."""
    with reading(path, "NIfTI"):
        _check_nifti_extensions(path)
        # mmap=False: the data is copied anyway and an open memory map would pin the file (Windows, atomic writes).
        img = nib.load(path, mmap=False)
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise VolumeError(path, f"not a NIfTI image ({type(img).__name__})")
        dtype = img.header.get_data_dtype()
        _check_dtype(path, dtype)
        shape = tuple(int(s) for s in img.header.get_data_shape())
        check_size(path, shape, dtype.itemsize)
        shape3 = spatial_shape(path, shape)
        offset = float(img.header.get_data_offset())
        if not np.isfinite(offset) or offset < 0:
            raise VolumeError(path, f"header vox_offset {offset:g} is not a valid data offset")
        _check_payload(path, int(offset) + int(np.prod(shape, dtype=object)) * dtype.itemsize)
        affine = np.asarray(img.affine, dtype=np.float64)
        data = np.asarray(img.dataobj).reshape(shape3)
    check_affine(path, affine)
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


def write_nifti(tmp: str, data: np.ndarray, affine: np.ndarray, header: Any) -> None:
    """Write ``data`` to the NIfTI file ``tmp`` (``.nii`` or ``.nii.gz``, by its name), starting from ``header``
    when it is a NIfTI header (its intensity scaling dropped), else with the affine as both qform and sform."""
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
