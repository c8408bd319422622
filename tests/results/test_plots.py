"""Few-shot curves and per-patient dot plots: real PNGs of the expected size."""

from __future__ import annotations

import itertools

import matplotlib.image as mpimg
import pandas as pd
import pytest

from lasegseg.config import Config
from lasegseg.results.aggregate import summarize
from lasegseg.results.plots import dot_plot, plot_all
from lasegseg.results.tables import cell_label
from tests.results.conftest import two_cell_trials


def test_plots_are_real_pngs(tmp_path, trials):
    summary = summarize(trials)
    paths = plot_all(summary, tmp_path)
    names = sorted(p.name for p in paths)
    # Only the patient axis varies in this sweep (2 patients and all 12).
    assert names == ["fewshot_patients_dice.png", "fewshot_patients_iou.png"]
    for path in paths:
        assert path.stat().st_size > 20_000
        img = mpimg.imread(path)
        assert img.shape[:2] == (750, 1200)
        assert img[..., :3].std() > 0.05  # not blank


def test_fraction_axis_plot(tmp_path):
    base = Config().to_flat()
    rows = []
    for dec, frac, seed in itertools.product(("linear", "unet"), (0.1, 0.25, 0.5, 1.0), (0, 1)):
        dice = 0.5 + 0.3 * frac + 0.02 * seed + (0.05 if dec == "unet" else 0)
        rows.append(
            {
                **base,
                "model.decoder": dec,
                "data.fraction": frac,
                "seed": seed,
                "test_dice_mean": dice,
                "test_iou_mean": dice - 0.1,
                "val_dice": dice,
                "test_hd95_mean": 4.0,
            }
        )
    summary = summarize(pd.DataFrame(rows))
    paths = plot_all(summary, tmp_path)
    assert sorted(p.name for p in paths) == ["fewshot_fraction_dice.png", "fewshot_fraction_iou.png"]
    assert mpimg.imread(paths[0]).shape[:2] == (750, 1200)


def test_dot_plot_draws_one_row_per_cell(tmp_path):
    import matplotlib.image as mpimg

    summary = summarize(two_cell_trials())
    per_patient = pd.DataFrame([{"cell": c, "case_id": f"p{i}", "dice": 0.5 + 0.1 * i} for c in summary["cell"]
                                for i in range(3)])  # fmt: skip
    path = tmp_path / "dots.png"
    labels = {row["cell"]: cell_label(row) for _, row in summary.iterrows()}
    dot_plot(per_patient, list(summary["cell"]), labels, "dice", path)
    image = mpimg.imread(path)
    assert image.shape[0] > 100 and image[..., :3].std() > 0.05
    with pytest.raises(ValueError, match="no per-patient"):
        dot_plot(per_patient.iloc[0:0], list(summary["cell"]), {}, "dice", tmp_path / "empty.png")
