"""Reading and writing NIfTI / NRRD volumes: the file's extension picks the format.

:func:`read_volume` returns a :class:`~lasegseg.data.types.Volume` in the file's own orientation (see
:mod:`lasegseg.data.orientation` for the canonical one); every failure is a
:class:`~lasegseg.data.volume_checks.VolumeError` naming the file. The formats themselves live in
:mod:`lasegseg.data.nifti_file` and :mod:`lasegseg.data.nrrd_file`. Writes are atomic.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from lasegseg.data.nifti_file import read_nifti, write_nifti
from lasegseg.data.nrrd_file import read_nrrd, write_nrrd
from lasegseg.data.types import Volume
from lasegseg.data.volume_checks import VolumeError
from lasegseg.fsio import atomic_write, plain_file_mode

NIFTI_EXTS = (".nii.gz", ".nii")
NRRD_EXTS = (".nrrd",)
SUPPORTED_EXTS = NIFTI_EXTS + NRRD_EXTS


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
    data, affine, header = read_nifti(path) if fmt == "nifti" else read_nrrd(path)
    if not label:
        data = data.astype(np.float32, copy=False)
    return Volume(data=data, affine=affine, path=path, header=header)


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
    write = write_nifti if fmt == "nifti" else write_nrrd
    # The temporary file keeps the extension because nibabel picks the format (and gzip) from it.
    return atomic_write(path, lambda tmp: write(str(tmp), data, affine, header), mode=plain_file_mode(), suffix=ext)


def write_like(path: str | os.PathLike, mask: np.ndarray, reference: Volume) -> Path:
    """Write a uint8 mask on the grid of ``reference`` (same shape, affine and space), atomically.

    Args:
        path: output file; its extension decides the format, whatever the reference's format.
        mask: array in the reference file's orientation (see
            :func:`~lasegseg.data.orientation.from_canonical`), cast to uint8.
        reference: the volume the mask was predicted from.
    """
    mask = np.asarray(mask)
    if mask.shape != reference.data.shape:
        raise VolumeError(path, f"mask shape {mask.shape} differs from reference shape {reference.data.shape}")
    return write_volume(path, mask.astype(np.uint8, copy=False), reference.affine, header=reference.header)
