"""One case as the slice cache stores it: read (a listed :class:`~lasegseg.data.types.Case`), checked and
preprocessed, in a build worker or inline.

What a worker returns travels back by pickle: a :class:`Prepared` case, or the message of the
:class:`~lasegseg.errors.DataError` that makes the case unusable (plain strings pickle whatever the error class).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lasegseg.data import layouts
from lasegseg.data.preprocess import Preprocessing, preprocess_case
from lasegseg.data.types import Case, LoadedCase
from lasegseg.errors import DataError


@dataclass
class Prepared:
    """One case as the cache stores it, made by :func:`prepare_case` (in a worker or inline).

    ``images`` is None for a case that was only checked (the build had already failed).
    """

    case_id: str
    where: str
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    has_fg: np.ndarray | None = None
    native_shape: list[int] | None = None
    spacing: list[float] | None = None
    affine: list[float] | None = None
    native_label: bytes | None = None


def prepare_case(case: LoadedCase | Case, preprocessing: Preprocessing, check_only: bool) -> Prepared | str:
    """Read (a :class:`Case`), check and preprocess one case; a :class:`DataError` comes back as its message.

    Runs in a worker (process or thread): a :class:`DataError` comes back as its message (plain strings and arrays
    travel back by pickle whatever the error class), and the full-resolution volume is dropped before returning.

    Args:
        case: a loaded case, or a listed one that :func:`lasegseg.data.layouts.load_case` reads here.
        preprocessing: slice size and intensity percentiles.
        check_only: only read and check the case (the build has already failed): no arrays come back.
    """
    try:
        if isinstance(case, Case):
            case = layouts.load_case(case)
        where = check_case(case)
    except DataError as err:
        return str(err)
    if check_only:
        return Prepared(str(case.case_id), where)
    images, labels = preprocess_case(case, preprocessing)
    z = images.shape[0]
    label = np.asarray(case.label, dtype=bool)
    return Prepared(
        case_id=str(case.case_id),
        where=where,
        images=np.ascontiguousarray(images),
        labels=np.ascontiguousarray(labels),
        has_fg=labels.reshape(z, -1).any(axis=1),
        native_shape=list(label.shape),
        spacing=[float(s) for s in case.spacing],
        affine=np.asarray(case.affine, np.float64).ravel().tolist(),
        native_label=np.packbits(label.ravel()).tobytes(),
    )


def check_case(case: LoadedCase) -> str:
    """Check one case's arrays; returns how messages name it (``case 'id' (image file)``)."""
    where = f"case '{case.case_id}'" + (f" ({case.image_path})" if case.image_path else "")
    image, label = np.asarray(case.image), np.asarray(case.label)
    if image.ndim != 3 or image.shape != label.shape:
        raise DataError(f"{where}: image {image.shape} and label {label.shape} must be the same 3D shape")
    if min(image.shape) < 1:
        raise DataError(f"{where}: empty volume {image.shape}")
    if np.shape(case.affine) != (4, 4) or len(case.spacing) != 3:
        raise DataError(f"{where}: affine must be 4x4 and spacing 3 values")
    return where
