"""Pure array operations that turn a canonical volume into model-ready axial slices and back.

Volumes are ``(X, Y, Z)`` in canonical RAS+ orientation with axial slices ``volume[:, :, k]``; the model sees
``(Z, S, S)`` stacks of square slices. Resizing uses pixel-centre alignment (like ``align_corners=False``) with
edge clamping, so ``resize_back(resize_slices(x))`` lands on the original grid without a half-pixel shift.
Only numpy is used so the slice cache can be built from light processes; the results are deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from lasegseg.data.types import LoadedCase

if TYPE_CHECKING:
    from lasegseg.config import Config


@dataclass(frozen=True)
class Preprocessing:
    """How a raw canonical volume becomes model input; the cache, its key and every trained model agree on it.

    The field names are the ``data.*`` config keys and the slice cache's manifest ``params`` keys, so a model's
    ``config.json`` and an existing cache both read back into this value unchanged.

    Args:
        image_size: square in-plane size ``S`` of the slices.
        clip_low, clip_high: intensity percentiles mapped to 0 and 1 (over the whole volume).
    """

    image_size: int
    clip_low: float
    clip_high: float

    def __post_init__(self) -> None:
        # Plain int/float whatever came in (numpy scalars, YAML ints): the cache key hashes their JSON form.
        object.__setattr__(self, "image_size", int(self.image_size))
        object.__setattr__(self, "clip_low", float(self.clip_low))
        object.__setattr__(self, "clip_high", float(self.clip_high))

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> Preprocessing:
        """Read it from a flat dotted config (``{"data.image_size": 448, …}``), e.g. a model's ``config.json``.

        Args:
            flat: a flat config with the three ``data.*`` keys; a missing one is a :class:`KeyError`.
        """
        return cls(**{f.name: flat[f"data.{f.name}"] for f in fields(cls)})

    @classmethod
    def from_config(cls, cfg: Config) -> Preprocessing:
        """The preprocessing a trial config trains with (``cfg.data.image_size``, ``clip_low``, ``clip_high``)."""
        return cls.from_flat(cfg.to_flat())

    def as_dict(self) -> dict[str, Any]:
        """``{"image_size": …, "clip_low": …, "clip_high": …}``: the cache manifest's and cache key's entries."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def normalize_intensity(volume: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Clip a volume to its ``[low, high]`` intensity percentiles and map that range to ``[0, 1]``.

    Args:
        volume: any real array; non-finite voxels are ignored for the percentiles and set to 0.
        low, high: percentiles in ``[0, 100]`` with ``low < high``.

    Returns:
        float32 array of the same shape in ``[0, 1]``; all zeros when the clipped range is empty (a constant
        volume), so a blank scan never divides by zero.
    """
    if not 0 <= low < high <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
    vol = np.asarray(volume, dtype=np.float32)
    finite = np.isfinite(vol)
    all_finite = bool(finite.all())
    values = vol if all_finite else vol[finite]
    if values.size == 0:
        return np.zeros(vol.shape, np.float32)
    lo, hi = (float(v) for v in np.percentile(values, [low, high]))
    if not hi > lo:
        return np.zeros(vol.shape, np.float32)
    out = np.clip(vol, lo, hi)
    out -= lo
    out *= np.float32(1.0 / (hi - lo))
    if not all_finite:
        out[~finite] = 0.0
    # float32 rounding of the scale factor can overshoot 1 by an ulp.
    return np.clip(out, 0.0, 1.0, out=out)


def resize_slices(volume: np.ndarray, size: int, order: int) -> np.ndarray:
    """Resize every axial slice of an ``(X, Y, Z)`` volume to ``(size, size)``.

    Non-square slices are stretched; :func:`resize_back` with the original ``(X, Y)`` undoes it.

    Args:
        volume: ``(X, Y, Z)`` array (bool, integer or float).
        size: output in-plane size.
        order: 1 (bilinear) for images, 0 (nearest) for labels so they keep their values.

    Returns:
        ``(size, size, Z)``; float32 for ``order == 1``, the input dtype for ``order == 0``.
    """
    return resize_xy(volume, (size, size), order)


def resize_back(slices: np.ndarray, shape_xy: tuple[int, int], order: int = 1) -> np.ndarray:
    """Inverse of :func:`resize_slices`: bring ``(S, S, Z)`` slices back to the native ``(X, Y)`` grid.

    Args:
        slices: ``(S, S, Z)`` labels or foreground probabilities.
        shape_xy: native in-plane shape ``(X, Y)``.
        order: 1 (default) interpolates probabilities linearly so that thresholding at 0.5 afterwards
            gives a smooth native-resolution mask; 0 copies the nearest label.

    Returns:
        ``(X, Y, Z)``; float32 for ``order == 1``, the input dtype for ``order == 0``.
    """
    return resize_xy(slices, shape_xy, order)


def resize_xy(volume: np.ndarray, shape_xy: tuple[int, int], order: int) -> np.ndarray:
    """Resize the first two axes of an ``(X, Y, Z)`` or ``(X, Y)`` array to ``shape_xy``; see :func:`resize_slices`."""
    vol = np.asarray(volume)
    if vol.ndim == 2:
        return resize_xy(vol[:, :, None], shape_xy, order)[:, :, 0]
    if vol.ndim != 3:
        raise ValueError(f"expected an (X, Y, Z) array, got shape {vol.shape}")
    stack = _resize_stack(np.moveaxis(vol, 2, 0), shape_xy, order)
    return np.moveaxis(stack, 0, 2)


def preprocess_image(image: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    """Canonical ``(X, Y, Z)`` raw image → ``(Z, S, S)`` float16 model input in ``[0, 1]``, as the cache stores it.

    Inference on new scans should call this too, so that the model sees exactly what it was trained on.

    Args:
        image: raw intensities in canonical orientation.
        preprocessing: slice size and intensity percentiles.
    """
    norm = normalize_intensity(image, preprocessing.clip_low, preprocessing.clip_high)
    size = preprocessing.image_size
    images = _resize_stack(np.moveaxis(norm, 2, 0), (size, size), order=1)
    # Linear blends of [0, 1] values can round a hair outside it.
    np.clip(images, 0.0, 1.0, out=images)
    return images.astype(np.float16)


def preprocess_case(case: LoadedCase, preprocessing: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """Normalise, resize and reorder one case into slices-first stacks for the cache.

    Args:
        case: a validated case in canonical orientation.
        preprocessing: slice size and intensity percentiles.

    Returns:
        ``images`` float16 ``(Z, S, S)`` in ``[0, 1]`` (see :func:`preprocess_image`) and ``labels`` uint8
        ``(Z, S, S)`` in ``{0, 1}`` (nearest neighbour).
    """
    images = preprocess_image(case.image, preprocessing)
    size = preprocessing.image_size
    labels = _resize_stack(np.moveaxis(np.asarray(case.label, dtype=bool), 2, 0), (size, size), order=0)
    return images, labels.view(np.uint8)


def _resize_stack(stack: np.ndarray, shape_xy: tuple[int, int], order: int) -> np.ndarray:
    """Resize each ``stack[k]`` (a ``(X, Y)`` slice) to ``shape_xy``; returns a C-contiguous ``(Z, *shape_xy)``.

    Separable gathers with precomputed indices and weights: the same values as ``scipy.ndimage.affine_transform``
    (``mode="nearest"``) up to float rounding, several times faster. Slices are processed a few at a time so the
    temporaries stay small next to the volume.
    """
    out_x, out_y = (int(s) for s in shape_xy)
    if out_x < 1 or out_y < 1:
        raise ValueError(f"output shape must be positive, got {shape_xy}")
    if order not in (0, 1):
        raise ValueError(f"interpolation order must be 0 (nearest) or 1 (linear), got {order}")
    n, in_x, in_y = stack.shape
    dtype = stack.dtype if order == 0 else np.dtype(np.float32)
    out = np.empty((n, out_x, out_y), dtype=dtype)
    if order == 0:
        rows, cols = _nearest(in_x, out_x), _nearest(in_y, out_y)
    else:
        (x0, x1, wx), (y0, y1, wy) = _linear(in_x, out_x), _linear(in_y, out_y)
        wx = wx[:, None]
    for start in range(0, n, _CHUNK):
        chunk = np.ascontiguousarray(stack[start : start + _CHUNK], dtype=dtype)
        if order == 0:
            out[start : start + _CHUNK] = chunk[:, rows[:, None], cols[None, :]]
        else:
            tmp = chunk[:, x0]
            tmp += (chunk[:, x1] - tmp) * wx
            res = tmp[:, :, y0]
            res += (tmp[:, :, y1] - res) * wy
            out[start : start + _CHUNK] = res
    return out


_CHUNK = 8


def _source_coords(n_in: int, n_out: int) -> np.ndarray:
    # Pixel centres line up: output centre o sits at input coordinate (o + 0.5) * n_in / n_out - 0.5.
    return (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5


def _nearest(n_in: int, n_out: int) -> np.ndarray:
    return np.clip(np.floor(_source_coords(n_in, n_out) + 0.5), 0, n_in - 1).astype(np.intp)


def _linear(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Clamping the coordinate, not the index, extends edge pixels outward (scipy's mode="nearest").
    coords = np.clip(_source_coords(n_in, n_out), 0, n_in - 1)
    lo = np.floor(coords).astype(np.intp)
    return lo, np.minimum(lo + 1, n_in - 1), (coords - lo).astype(np.float32)
