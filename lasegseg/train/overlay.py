"""Qualitative figures: MRI slices with ground-truth and predicted LA contours (the reference paper's Figure 3).

Arrays are in the canonical (X, Y, Z) orientation; a slice is shown transposed with ``origin="lower"`` so that the
anatomy looks upright. matplotlib is imported inside the functions and used through ``Figure`` objects rendered
by Agg, never through pyplot: no global backend switch, safe in threads and notebooks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lasegseg.fsio import save_figure

TRUTH_COLOR = "#00ff00"
PRED_COLOR = "#ff00ff"
# Dyadic inch sizes keep the PNG's pixel size exact: a 448-px panel under a 64-px legend strip.
PANEL_INCHES = 3.5
LEGEND_INCHES = 0.5
DPI = 128


def pick_slices(truth_volume: np.ndarray, k: int = 3) -> list[int]:
    """Choose ``k`` informative axial slices of an (X, Y, Z) mask, sorted by z.

    The slice with the largest LA area comes first in priority, then the slices at the quartiles of the LA's
    z extent (for ``k`` > 3 evenly spaced between them), then the next-largest slices. Without any LA voxel the
    slices are spread evenly over the volume.
    """
    truth_volume = np.asarray(truth_volume)
    if truth_volume.ndim != 3:
        raise ValueError(f"pick_slices expects an (X, Y, Z) volume, got shape {truth_volume.shape}")
    depth = truth_volume.shape[2]
    k = min(k, depth)
    if k <= 0:
        return []
    area = truth_volume.astype(bool).sum(axis=(0, 1))
    present = np.flatnonzero(area)
    if present.size == 0:
        return sorted({int(round(z)) for z in np.linspace(0, depth - 1, k + 2)[1:-1]})

    lo, hi = present[0], present[-1]
    quantiles = np.linspace(0.25, 0.75, k - 1) if k > 2 else np.array([0.5])
    # A quartile may fall in a gap of a non-contiguous mask: take the nearest slice that has LA.
    targets = [int(np.argmax(area))] + [
        int(present[np.argmin(np.abs(present - (lo + q * (hi - lo))))]) for q in quantiles
    ]
    by_area = [int(z) for z in present[np.argsort(-area[present], kind="stable")]]
    chosen: list[int] = []
    for z in targets + by_area + list(range(depth)):
        if z not in chosen:
            chosen.append(z)
        if len(chosen) == k:
            break
    return sorted(chosen)


def overlay_figure(
    path: str | Path,
    images: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    preds: Sequence[np.ndarray],
    titles: Sequence[str],
    *,
    ncols: int | None = None,
    panel_inches: float = PANEL_INCHES,
    dpi: int = DPI,
) -> Path:
    """Write a grid PNG of grayscale 2D slices with ground-truth (green) and predicted (magenta) contours.

    Args:
        path: output PNG.
        images: 2D float slices in (X, Y) orientation.
        truths, preds: 2D boolean masks of the same shapes.
        titles: one per panel, e.g. ``"la_004 z=17 Dice 0.91"``.
        ncols: panels per row (default: up to 4).
        panel_inches, dpi: each panel is ``panel_inches * dpi`` pixels square; a legend strip sits on top.

    Returns:
        ``path``; the image is ``ncols * panel_inches * dpi`` pixels wide.
    """
    # deferred: heavy (matplotlib, only when a figure is drawn)
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    n = len(images)
    if n == 0 or not (len(truths) == len(preds) == len(titles) == n):
        raise ValueError(
            f"overlay_figure needs equally many (>0) images, truths, preds and titles, got "
            f"{len(images)}, {len(truths)}, {len(preds)}, {len(titles)}"
        )
    ncols = ncols or min(n, 4)
    nrows = math.ceil(n / ncols)
    width, height = ncols * panel_inches, nrows * panel_inches + LEGEND_INCHES
    fig = Figure(figsize=(width, height), facecolor="white")
    # One axes for every panel, in panel units (panel (r, c) spans x in [c, c + 1], y in [nrows - r - 1, nrows - r]):
    # six axes cost more to build and draw than the panels themselves.
    ax = fig.add_axes((0.0, 0.0, 1.0, 1 - LEGEND_INCHES / height))
    ax.set_xlim(0, ncols)
    ax.set_ylim(0, nrows)
    ax.set_axis_off()
    for i, panel in enumerate(zip(images, truths, preds, titles, strict=True)):
        _draw_panel(ax, i, *panel, ncols=ncols, nrows=nrows)
    handles = [
        Line2D([], [], color=TRUTH_COLOR, lw=2, label="ground truth"),
        Line2D([], [], color=PRED_COLOR, lw=2, label="prediction"),
    ]
    fig.legend(
        handles=handles,
        loc="upper center",
        ncol=2,
        frameon=False,
        fontsize=10,
        bbox_to_anchor=(0.5, 1.0),
        facecolor="white",
    )
    # Fast PNG compression: a quarter less time for a file a quarter larger; the figure is written once per trial.
    return save_figure(fig, path, dpi=dpi, compress_level=1)


def _draw_panel(ax, i: int, image, truth, pred, title: str, *, ncols: int, nrows: int) -> None:
    """Panel ``i`` of :func:`overlay_figure` on its one axes: the slice, both contours and the title."""
    pad, title_band = 0.02, 0.08
    image, truth, pred = np.asarray(image, dtype=float), np.asarray(truth, bool), np.asarray(pred, bool)
    if image.ndim != 2 or truth.shape != image.shape or pred.shape != image.shape:
        raise ValueError(
            f"panel {i}: image, truth and pred must be 2D of one shape, got {image.shape}, {truth.shape}, {pred.shape}"
        )
    row, col = divmod(i, ncols)
    # The slice fits the panel below its title band, keeping its aspect; a non-square one hangs from the top.
    scale = min((1 - 2 * pad) / image.shape[0], (1 - 2 * pad - title_band) / image.shape[1])
    w, h = image.shape[0] * scale, image.shape[1] * scale
    x0, top = col + (1 - w) / 2, nrows - row - pad - title_band
    finite = image[np.isfinite(image)]
    vmin, vmax = np.percentile(finite, (1, 99)) if finite.size else (0.0, 1.0)
    ax.imshow(image.T, cmap="gray", origin="lower", vmin=vmin, vmax=max(vmax, vmin + 1e-6),
              extent=(x0, x0 + w, top - h, top), interpolation="nearest", aspect="auto")  # fmt: skip
    # Pixel centres in panel units, so the contours sit where imshow draws the pixels.
    xs = x0 + (np.arange(image.shape[0]) + 0.5) * scale
    ys = top - h + (np.arange(image.shape[1]) + 0.5) * scale
    for mask, color in ((truth, TRUTH_COLOR), (pred, PRED_COLOR)):
        if mask.any() and not mask.all():
            _draw_contour(ax, xs, ys, mask.T.astype(float), color)
    ax.text(col + 0.5, top + 0.01, title, ha="center", va="bottom", fontsize=10)


def _draw_contour(ax, xs: np.ndarray, ys: np.ndarray, z: np.ndarray, color: str) -> None:
    """The 0.5 iso-line of ``z`` as ``ax.contour(xs, ys, z, levels=[0.5])`` draws it (same algorithm, corner
    masking and pixels), without building a ContourSet: contourpy's lines go straight into one path collection."""
    # deferred: heavy (matplotlib and contourpy, only when a figure is drawn)
    import contourpy
    from matplotlib.collections import PathCollection
    from matplotlib.path import Path as MplPath

    generator = contourpy.contour_generator(
        xs, ys, z, name="mpl2014", corner_mask=True, line_type=contourpy.LineType.SeparateCode
    )
    vertices, codes = generator.lines(0.5)
    paths = [MplPath(v, c) for v, c in zip(vertices, codes, strict=True)]
    ax.add_collection(PathCollection(paths, facecolors="none", edgecolors=[color], linewidths=1.6), autolim=False)
