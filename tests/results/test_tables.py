"""The summary as text for people."""

from __future__ import annotations

from lasegseg.results.aggregate import summarize
from lasegseg.results.tables import format_table


def test_format_table(trials):
    summary = summarize(trials)
    text = format_table(summary, max_rows=3)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["decoder", "mode", "backbone"] and "NSD mean ± std" in lines[0]
    assert len(lines) == 2 + 3 + 1 and lines[-1].startswith("… 5 more")
    assert "all" in text or "2" in text
