"""The paired comparison as text: the shown columns follow the metric, Markdown holds the table and the notes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from lasegseg.results.compare import compare_cells
from lasegseg.results.comparison_tables import comparison_notes, display_comparison, format_markdown


def _comparison(metric: str) -> pd.DataFrame:
    patients = [f"p{i}" for i in range(8)]
    ref = np.linspace(0.6, 0.9, 8)
    matrix = pd.DataFrame({"ref": ref, "a": ref + 0.02, "b": ref - 0.05}, index=patients)
    summary = pd.DataFrame({"model.decoder": ["ref", "a", "b"], "cell": ["ref", "a", "b"], "n": 2,
                            "val_dice_mean": [0.9, 0.8, 0.7]})  # fmt: skip
    return compare_cells(matrix, summary, "ref", metric=metric, resamples=200, seed=0)


def test_display_names_the_metric_and_marks_the_reference():
    shown = display_comparison(_comparison("iou"))
    assert "mean iou" in shown.columns and "decoder" in shown.columns
    assert shown["Δ median [95% CI]"].iloc[0] == "reference" and shown["n"].iloc[0] == "ref"
    assert shown["W/T/L"].tolist()[1:] == ["8/0/0", "0/0/8"]


def test_markdown_holds_the_table_then_every_note():
    table = _comparison("dice")
    notes = comparison_notes(table, "best mean validation Dice", resamples=200, seed=0, tie=1e-6)
    text = format_markdown(table, notes)
    lines = text.splitlines()
    assert lines[0].startswith("| decoder | cell |") and set(lines[1]) <= set("|-")
    assert all(f"- {note}" in text for note in notes) and "Δ > 0 favours the cell" in text
