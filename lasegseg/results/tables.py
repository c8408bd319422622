"""The summary as text for people: cell labels, an aligned terminal table and Markdown."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from lasegseg import metric_table
from lasegseg.results.trials import cell_keys

# --------------------------------------------------------------------------------------------------- summary


def cell_label(row: pd.Series | dict[str, Any]) -> str:
    """A short human label of a cell: backbone · decoder · mode · few-shot size (and lr when present)."""
    parts = [str(row.get(k)) for k in ("model.backbone", "model.decoder", "model.mode") if present(row.get(k))]
    patients, fraction = row.get("data.patients"), row.get("data.fraction")
    if present(patients) and int(patients) > 0:
        parts.append(f"{int(patients)} pat.")
    elif present(fraction) and float(fraction) < 1:
        parts.append(f"{float(fraction) * 100:g}%")
    else:
        parts.append("all")
    if present(row.get("optim.lr")):
        parts.append(f"lr {float(row['optim.lr']):g}")
    return " · ".join(parts)


def present(value: Any) -> bool:
    """Whether a table cell holds a value (not None, NaN or NA)."""
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and value is not pd.NA


_TABLE_COLUMNS = {
    "model.decoder": "decoder",
    "model.mode": "mode",
    "model.backbone": "backbone",
    "data.patients": "patients",
    "data.fraction": "fraction",
    "optim.lr": "lr",
}


def _fmt(value: Any, fmt: str = ".3f") -> str:
    return "–" if pd.isna(value) else format(value, fmt)


def _str(value: Any) -> str:
    return "–" if pd.isna(value) else str(value)


def _pm(mean: Any, std: Any, fmt: str = ".3f") -> str:
    return _fmt(mean, fmt) if pd.isna(std) else f"{_fmt(mean, fmt)} ± {_fmt(std, fmt)}"


def display_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Strings for people: the usual columns plus any other config key that varies between cells."""
    out = pd.DataFrame(index=summary.index)
    for key, name in _TABLE_COLUMNS.items():
        if key not in summary:
            continue
        col = summary[key]
        if key == "data.patients":
            col = col.map(lambda v: "all" if v == 0 else _fmt(v, "d"))
        elif key == "data.fraction":
            col = col.map(lambda v: _fmt(v * 100, "g") + "%")
        elif key == "optim.lr":
            col = col.map(lambda v: _fmt(v, "g"))
        out[name] = col.map(_str)
    for key in cell_keys(summary):
        if key not in _TABLE_COLUMNS and summary[key].nunique(dropna=False) > 1:
            out[key] = summary[key].map(_str)
    out["n"] = summary["n"].map(_str)
    for m in metric_table.summarised():
        if m.over_seeds == "interval":
            means, stds = summary[f"{m.test_mean}_mean"], summary[f"{m.test_mean}_std"]
            out[f"{m.display} mean ± std"] = [_pm(a, b, m.fmt) for a, b in zip(means, stds, strict=True)]
    primary = metric_table.primary()
    out[f"val {primary.display}"] = summary[f"{primary.val}_mean"].map(lambda v: _fmt(v, primary.fmt))
    return out


def format_markdown(summary: pd.DataFrame) -> str:
    """A Markdown table of the summary (best validation Dice first)."""
    table = display_table(summary)
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def format_table(summary: pd.DataFrame, max_rows: int = 20) -> str:
    """A short aligned plain-text table for the terminal (best validation Dice first)."""
    table = display_table(summary)
    shown = table.head(max_rows)
    widths = [max(len(c), *(len(v) for v in shown[c])) if len(shown) else len(c) for c in table.columns]
    lines = ["  ".join(c.ljust(w) for c, w in zip(table.columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
        for row in shown.itertuples(index=False)
    ]
    if len(table) > max_rows:
        lines.append(f"… {len(table) - max_rows} more cell(s)")
    return "\n".join(lines)
