"""The study report page: its pure parts here; the page of a real demo sweep in tests/sweep/test_sweep_e2e.py."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from lasegseg.config import Config
from lasegseg.export.report import Study, cell_label, dot_plot, html_table, markdown_to_html, render
from lasegseg.results.aggregate import summarize
from tests.helpers import headless_chromium


def _trials() -> pd.DataFrame:
    base = Config().to_flat()
    rows = []
    for decoder, shift in (("linear", 0.0), ("conv", 0.05)):
        for seed in (0, 1):
            dice = 0.7 + shift + 0.01 * seed
            rows.append({**base, "model.decoder": decoder, "seed": seed, "test_dice_mean": dice,
                         "test_iou_mean": dice - 0.1, "val_dice": dice, "test_hd95_mean": 4.0})  # fmt: skip
    return pd.DataFrame(rows)


def _png(tmp_path, summary, per_patient):
    labels = {row["cell"]: cell_label(row) for _, row in summary.iterrows()}
    return dot_plot(per_patient, list(summary["cell"]), labels, "dice", tmp_path / "dots.png").read_bytes()


def test_markdown_of_a_model_card_becomes_escaped_html():
    text = (
        "# LA segmenter — tiny · conv\n\nBest cell of `exp` <script>.\n\n## Data\n- Dataset: `/d`\n"
        "- split: train 4,\n  validation 2\n\n| metric | cell |\n|---|---|\n| test_dice_mean | 0.8 ± 0.1 |\n\n"
        "```bash\nlasegseg predict A <b>\n```\n**Not for clinical use**"
    )
    page = markdown_to_html(text)
    assert "<h2>LA segmenter — tiny · conv</h2>" in page and "<h3>Data</h3>" in page
    assert "&lt;script&gt;" in page and "<script>" not in page
    assert "<li>split: train 4, validation 2</li>" in page
    assert "<td>test_dice_mean</td><td>0.8 ± 0.1</td>" in page and "<th>metric</th>" in page
    assert "<pre>lasegseg predict A &lt;b&gt;</pre>" in page
    assert "<strong>Not for clinical use</strong>" in page


def test_html_table_escapes_and_aligns_numbers():
    frame = pd.DataFrame({"cell": ["<a>", None], "p": ["0.01", "0.5"]})
    table = html_table(frame, numeric=["p"], table_id="t")
    assert table.startswith('<table id="t">') and "&lt;a&gt;" in table and "<td>–</td>" in table
    assert table.count('<td class="num">') == 2


def test_cell_labels_name_the_few_shot_size():
    assert cell_label({"model.backbone": "tiny", "model.decoder": "conv", "model.mode": "lora",
                       "data.patients": 2, "data.fraction": 1.0}) == "tiny · conv · lora · 2 pat."  # fmt: skip
    assert cell_label({"model.decoder": "unet", "data.patients": 0, "data.fraction": 0.05}) == "unet · 5%"


def test_page_is_self_contained_and_renders(tmp_path):
    trials = _trials()
    summary = summarize(trials)
    values = np.linspace(0.6, 0.9, 6)
    per_patient = pd.DataFrame([{"cell": c, "case_id": f"p{i}", "dice": v} for c in summary["cell"]
                                for i, v in enumerate(values)])  # fmt: skip
    study = Study("demo <exp>", "sqlite:///x.db", None, trials, summary, per_patient=per_patient,
                  best={"run_id": "r1", "run_name": "tiny·conv", "cell": summary.iloc[0].to_dict(),
                        "card": "# Card\n- a"}, notes=["overlays of the best run left out: missing"])  # fmt: skip
    png = _png(tmp_path, summary, per_patient)
    page = render(study, {"fewshot": [], "dots": [("Test Dice per patient", png)]}, created="2026-01-01")
    assert "demo &lt;exp&gt;" in page and "<exp>" not in page
    assert 'id="summary-table"' in page and "Dice 95% CI" in page
    assert "data:image/png;base64," in page
    # Nothing is fetched: no external URL in any src/href, and the CSP forbids it anyway.
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)
    assert "default-src 'none'" in page
    assert "overlays of the best run left out" in page
    out = tmp_path / "report.html"
    out.write_text(page, encoding="utf-8")
    dom = headless_chromium(out, tmp_path)
    assert 'id="summary-table"' in dom and dom.count("<tr>") >= 3


def test_dot_plot_draws_one_row_per_cell(tmp_path):
    import matplotlib.image as mpimg

    summary = summarize(_trials())
    per_patient = pd.DataFrame([{"cell": c, "case_id": f"p{i}", "dice": 0.5 + 0.1 * i} for c in summary["cell"]
                                for i in range(3)])  # fmt: skip
    path = tmp_path / "dots.png"
    path.write_bytes(_png(tmp_path, summary, per_patient))
    image = mpimg.imread(path)
    assert image.shape[0] > 100 and image[..., :3].std() > 0.05
    with pytest.raises(ValueError, match="no per-patient"):
        dot_plot(per_patient.iloc[0:0], list(summary["cell"]), {}, "dice", tmp_path / "empty.png")
