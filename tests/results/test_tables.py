"""The summary as text for people."""

from __future__ import annotations

from lasegseg.results.aggregate import summarize
from lasegseg.results.tables import cell_label, format_table


def test_format_table(trials):
    summary = summarize(trials)
    text = format_table(summary, max_rows=3)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["decoder", "mode", "backbone"] and "NSD mean ± std" in lines[0]
    assert len(lines) == 2 + 3 + 1 and lines[-1].startswith("… 5 more")
    assert "all" in text or "2" in text


def test_cell_labels_name_the_few_shot_size():
    assert cell_label({"model.backbone": "tiny", "model.decoder": "conv", "model.mode": "lora",
                       "data.patients": 2, "data.fraction": 1.0}) == "tiny · conv · lora · 2 pat."  # fmt: skip
    assert cell_label({"model.decoder": "unet", "data.patients": 0, "data.fraction": 0.05}) == "unet · 5%"
