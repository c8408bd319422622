"""The study report page: its pure parts here; the page of a real demo sweep in tests/sweep/test_sweep_e2e.py."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from lasegseg.export.report import html_table, markdown_to_html, render
from lasegseg.results.aggregate import summarize
from lasegseg.results.plots import dot_plot
from lasegseg.results.study import Study
from lasegseg.results.tables import cell_label
from tests.helpers import headless_chromium
from tests.results.conftest import two_cell_trials


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


def test_page_is_self_contained_and_renders(tmp_path):
    trials = two_cell_trials()
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
