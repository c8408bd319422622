"""What every volume reader shares: :class:`VolumeError`, the size limits and header checks, and turning the many
exceptions of nibabel, pynrrd and gzip into one :class:`VolumeError` naming the file.

Every failure to read user data raises :class:`VolumeError` (a :class:`~lasegseg.errors.DataError`) whose one-line
message starts with the file at fault, so validation can report many bad files at once and the CLI can print the
message alone.
"""

from __future__ import annotations

import gzip
import logging
import os
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import nrrd
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from lasegseg.errors import DataError

# Refuse volumes whose decoded data would exceed this many bytes: a corrupt or hostile header must not make us
# allocate (or try to allocate) terabytes. The largest real LA scans (640² × 88 float32) are ~150 MB.
MAX_VOLUME_BYTES = 2 * 1024**3
# Header plus extensions before the voxel data; real NIfTI extensions (DICOM dumps, CIFTI XML) are well below this.
MAX_HEADER_BYTES = 16 * 1024**2


class VolumeError(DataError):
    """A file cannot be used; ``path`` is the file and ``reason`` the one-line cause (``str`` joins both)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def check_size(path: Path, shape: tuple[int, ...], itemsize: int) -> None:
    """Refuse a header whose dimensions are not positive or whose data would exceed :data:`MAX_VOLUME_BYTES`."""
    if not shape or any(s <= 0 for s in shape):
        raise VolumeError(path, f"header has a zero or negative dimension {shape}")
    # Python ints: no overflow for absurd headers. Images are converted to float32, so count at least 4 bytes.
    nbytes = int(np.prod([int(s) for s in shape], dtype=object)) * max(itemsize, 4)
    if nbytes > MAX_VOLUME_BYTES:
        need, limit = nbytes / 1024**3, MAX_VOLUME_BYTES / 1024**3
        raise VolumeError(path, f"header dimensions {shape} would need {need:.3g} GiB (limit {limit:g} GiB)")


def spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    """The 3D shape of a volume whose dimensions past the third are all 1; anything else is refused."""
    if len(shape) < 3 or any(s != 1 for s in shape[3:]):
        raise VolumeError(path, f"expected a 3D volume, got shape {shape}")
    return shape[0], shape[1], shape[2]


def check_affine(path: Path, affine: np.ndarray) -> None:
    """Refuse a voxel-to-world matrix that is singular or not finite."""
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise VolumeError(path, "voxel-to-world matrix is singular or not finite (zero spacing?)")


@contextmanager
def reading(path: Path, fmt: str) -> Iterator[None]:
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
