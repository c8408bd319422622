"""Overlay figures: grid PNG with ground-truth and prediction contours; informative slice choice."""

from __future__ import annotations

import matplotlib.image as mpimg
import numpy as np
import pytest

from lasegseg.train.overlay import DPI, LEGEND_INCHES, PANEL_INCHES, overlay_figure, pick_slices


def _ellipsoid(shape, center, radii):
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    return (((grid - np.array(center)) / np.array(radii)) ** 2).sum(-1) <= 1


def _count_colour(rgb, colour, tol=0.2):
    return int((np.abs(rgb - np.array(colour)).max(-1) < tol).sum())


def test_overlay_figure_size_and_contour_colours(tmp_path):
    rng = np.random.default_rng(0)
    truth = _ellipsoid((64, 48, 20), (30, 22, 10), (14, 10, 6))
    pred = _ellipsoid((64, 48, 20), (34, 24, 10), (12, 11, 6))
    image = truth * 0.8 + rng.normal(0.2, 0.05, truth.shape)
    zs = pick_slices(truth, k=3)
    path = overlay_figure(
        tmp_path / "overlay.png",
        [image[:, :, z] for z in zs],
        [truth[:, :, z] for z in zs],
        [pred[:, :, z] for z in zs],
        [f"la_004 z={z} Dice 0.91" for z in zs],
    )
    img = mpimg.imread(path)[..., :3]
    assert img.shape[:2] == (round((3 * PANEL_INCHES) * DPI), round((PANEL_INCHES + LEGEND_INCHES) * DPI))[::-1]
    # Count contour pixels inside the panels only (below the legend strip, which shows both colours too).
    panels = img[round(LEGEND_INCHES * DPI) + 10 :]
    assert _count_colour(panels, (0, 1, 0)) > 100
    assert _count_colour(panels, (1, 0, 1)) > 100
    assert _count_colour(img[: round(LEGEND_INCHES * DPI)], (0, 1, 0)) > 0  # the legend


def test_contours_are_drawn_pixel_for_pixel_as_matplotlib_draws_them(tmp_path):
    """The overlay draws contourpy's lines itself (cheaper than a ContourSet): the pixels must be contour()'s."""
    from matplotlib.figure import Figure

    from lasegseg.train.overlay import _draw_contour

    mask = (
        _ellipsoid((40, 30, 1), (18, 14, 0), (9, 6, 1))[..., 0] | _ellipsoid((40, 30, 1), (34, 5, 0), (3, 2, 1))[..., 0]
    )
    xs, ys = np.linspace(0.1, 0.9, 40), np.linspace(0.2, 0.8, 30)
    pngs = []
    for ours in (True, False):
        fig = Figure(figsize=(2, 2))
        ax = fig.add_axes((0, 0, 1, 1))
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        if ours:
            _draw_contour(ax, xs, ys, mask.T.astype(float), "#ff00ff")
        else:
            ax.contour(xs, ys, mask.T.astype(float), levels=[0.5], colors=["#ff00ff"], linewidths=1.6)
        fig.savefig(tmp_path / f"{ours}.png", dpi=100)
        pngs.append(mpimg.imread(tmp_path / f"{ours}.png"))
    assert _count_colour(pngs[0][..., :3], (1, 0, 1)) > 50  # two closed outlines were drawn
    np.testing.assert_array_equal(pngs[0], pngs[1])


def test_overlay_grid_wraps_and_handles_empty_masks(tmp_path):
    image = np.zeros((32, 32))
    empty = np.zeros((32, 32), bool)
    path = overlay_figure(tmp_path / "grid.png", [image] * 5, [empty] * 5, [empty] * 5, [str(i) for i in range(5)])
    height, width = mpimg.imread(path).shape[:2]
    assert width == round(4 * PANEL_INCHES * DPI) and height == round((2 * PANEL_INCHES + LEGEND_INCHES) * DPI)


def test_overlay_rejects_mismatched_inputs(tmp_path):
    with pytest.raises(ValueError, match="equally many"):
        overlay_figure(tmp_path / "x.png", [np.zeros((4, 4))], [], [], [])
    with pytest.raises(ValueError, match="one shape"):
        overlay_figure(
            tmp_path / "x.png", [np.zeros((4, 4))], [np.zeros((4, 5), bool)], [np.zeros((4, 4), bool)], ["a"]
        )


def test_pick_slices_largest_area_and_quartiles():
    truth = np.zeros((16, 16, 40), bool)
    for z in range(10, 31):  # LA from z=10 to z=30, widest at z=22
        r = 7 - abs(z - 22) * 0.5
        if r > 0:
            truth[:, :, z] = _ellipsoid((16, 16, 1), (8, 8, 0), (r, r, 1))[:, :, 0]
    present = np.flatnonzero(truth.any((0, 1)))
    lo, hi = present[0], present[-1]
    chosen = pick_slices(truth, k=3)
    assert len(chosen) == 3 and chosen == sorted(chosen)
    assert int(np.argmax(truth.sum((0, 1)))) in chosen
    assert round(lo + 0.25 * (hi - lo)) in chosen and round(lo + 0.75 * (hi - lo)) in chosen
    assert all(truth[:, :, z].any() for z in pick_slices(truth, k=6))
    assert len(set(pick_slices(truth, k=6))) == 6


def test_pick_slices_edge_cases():
    assert pick_slices(np.zeros((4, 4, 10), bool), k=3) == [2, 4, 7]
    thin = np.zeros((4, 4, 5), bool)
    thin[1:3, 1:3, 2] = True
    assert pick_slices(thin, k=3)[0:3] == sorted(pick_slices(thin, k=3)) and 2 in pick_slices(thin, k=3)
    assert pick_slices(thin, k=9) == [0, 1, 2, 3, 4]
