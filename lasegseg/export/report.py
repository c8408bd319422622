"""One self-contained HTML page per study, built from MLflow alone (the study itself is read by
:mod:`lasegseg.results.study`).

The page holds the summary table (mean ± std and 95% t-interval over seeds), the paired comparison against the
reference cell, the few-shot curves, per-patient dot plots per cell, and the best cell's overlays and model card.
Images are PNG ``data:`` URIs and the styles are inline: the file opens anywhere, with no network and no script.
"""

from __future__ import annotations

import base64
import html
import re
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from lasegseg import metric_table
from lasegseg.errors import LasegsegError, first_line
from lasegseg.export.export import best_run_card
from lasegseg.fsio import atomic_write
from lasegseg.results.comparison_tables import display_comparison
from lasegseg.results.plots import curve_metrics, dot_plot, plot_all
from lasegseg.results.study import Study, dot_metrics, gather
from lasegseg.results.tables import cell_label, display_table, present
from lasegseg.results.trials import log_to_sweep_run

REPORT_FILE = "report.html"


# --------------------------------------------------------------------------------------------------- figures


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _figures(study: Study, tmp: Path) -> dict[str, list[tuple[str, bytes]]]:
    """Few-shot curves and dot plots as (caption, PNG bytes), by section."""
    out: dict[str, list[tuple[str, bytes]]] = {"fewshot": [], "dots": []}
    names = {m.name: m.display for m in curve_metrics().values()}
    for path in plot_all(study.summary, tmp):
        axis, metric = path.stem.split("_", 2)[1:3]
        out["fewshot"].append((f"Test {names[metric]} against training {axis}", path.read_bytes()))
    if study.per_patient is not None and not study.per_patient.empty:
        order = list(study.summary["cell"])
        labels = {row["cell"]: cell_label(row) for _, row in study.summary.iterrows()}
        for metric in dot_metrics():
            if metric in study.per_patient and study.per_patient[metric].notna().any():
                path = dot_plot(study.per_patient, order, labels, metric, tmp / f"dots_{metric}.png")
                name = metric_table.metric(metric).display
                out["dots"].append((f"Test {name} per patient, per cell", path.read_bytes()))
    return out


# --------------------------------------------------------------------------------------------------- HTML

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d2330;background:#fff}
main{max-width:1180px;margin:0 auto;padding:24px 32px 48px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:19px;margin:32px 0 8px;border-bottom:1px solid #dde2ea;padding-bottom:4px}
h3{font-size:16px;margin:20px 0 6px}.meta{color:#5b6474;margin:0 0 12px}
table{border-collapse:collapse;margin:8px 0 12px;font-size:13px}
th,td{border:1px solid #dde2ea;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f5f9;font-weight:600}tr:nth-child(even) td{background:#fafbfd}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
figure{margin:12px 0}figure img{max-width:min(100%,960px);border:1px solid #e6e9ef}
figcaption{color:#5b6474;font-size:12px}
.note{background:#fff8e1;border-left:4px solid #f0b429;padding:6px 10px;margin:8px 0}
.card{border:1px solid #dde2ea;padding:4px 16px;background:#fcfcfe}
code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,monospace;font-size:12px}
pre{background:#f3f5f9;padding:8px;overflow-x:auto}
"""


def _e(value: Any) -> str:
    return html.escape("–" if not present(value) else str(value))


def html_table(frame: pd.DataFrame, *, numeric: Iterable[str] = (), table_id: str | None = None) -> str:
    """An escaped HTML table of string-like cells; ``numeric`` columns are right-aligned."""
    numeric = set(numeric)
    head = "".join(f"<th>{_e(c)}</th>" for c in frame.columns)
    rows = []
    for values in frame.itertuples(index=False):
        cells = "".join(
            f'<td class="num">{_e(v)}</td>' if c in numeric else f"<td>{_e(v)}</td>"
            for c, v in zip(frame.columns, values, strict=True)
        )
        rows.append(f"<tr>{cells}</tr>")
    ident = f' id="{html.escape(table_id)}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _summary_frame(summary: pd.DataFrame) -> pd.DataFrame:
    shown = display_table(summary)
    for m in metric_table.summarised():
        low, high = summary.get(f"{m.test_mean}_ci95_low"), summary.get(f"{m.test_mean}_ci95_high")
        if low is not None and high is not None:
            shown[f"{m.display} 95% CI"] = [
                "–" if pd.isna(lo) or pd.isna(hi) else f"{m.format(lo)} – {m.format(hi)}"
                for lo, hi in zip(low, high, strict=True)
            ]
    return shown


_INLINE = [
    (re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
]


def _inline(text: str) -> str:
    out = html.escape(text, quote=False)
    for pattern, repl in _INLINE:
        out = pattern.sub(repl, out)
    return out


def markdown_to_html(text: str) -> str:
    """The Markdown that lasegseg writes (headings, lists, pipe tables, code fences, paragraphs) as escaped HTML."""
    out: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), len(lines))
            out.append("<pre>" + html.escape("\n".join(lines[i + 1 : end])) + "</pre>")
            i = end + 1
        elif m := re.match(r"^(#{1,4})\s+(.*)$", line):
            level = min(len(m.group(1)) + 1, 4)  # the page's own h1 stays the only one
            out.append(f"<h{level}>{_inline(m.group(2))}</h{level}>")
            i += 1
        elif line.startswith("|"):
            block = []
            while i < len(lines) and lines[i].startswith("|"):
                block.append([c.strip() for c in lines[i].strip().strip("|").split("|")])
                i += 1
            body = [r for r in block[1:] if not all(set(c) <= set("-: ") for c in r)]
            head = "".join(f"<th>{_inline(c)}</th>" for c in block[0])
            rows = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in body)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif re.match(r"^\s*[-*]\s+", line):
            items = []
            while i < len(lines) and (re.match(r"^\s*[-*]\s+", lines[i]) or lines[i].startswith("  ")):
                if re.match(r"^\s*[-*]\s+", lines[i]):
                    items.append(re.sub(r"^\s*[-*]\s+", "", lines[i]))
                else:
                    items[-1] += " " + lines[i].strip()
                i += 1
            out.append("<ul>" + "".join(f"<li>{_inline(t)}</li>" for t in items) + "</ul>")
        elif not line.strip():
            i += 1
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"^(#|\||```|\s*[-*]\s)", lines[i]):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


def render(study: Study, figures: dict[str, list[tuple[str, bytes]]], *, created: str | None = None) -> str:
    """The page as one HTML string (pure: no I/O)."""
    created = created or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    n_trials, n_cells = len(study.trials), len(study.summary)
    skipped = study.trials.attrs.get("skipped") or {}
    scope = f"sweep run <code>{_e(study.parent_run_id)}</code>" if study.parent_run_id else "all sweep runs"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        # No network: images are data: URIs, nothing is fetched.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">",
        f"<title>lasegseg report — {_e(study.experiment)}</title>",
        f"<style>{_CSS}</style></head><body><main>",
        f"<h1>Study report: {_e(study.experiment)}</h1>",
        f'<p class="meta">MLflow {_e(study.tracking_uri)} · {scope} · {n_trials} finished trial(s) in {n_cells} '
        f"cell(s) · written {_e(created)}</p>",
    ]
    if skipped:
        parts.append(
            '<p class="note">Not aggregated: '
            + ", ".join(f"{n} {_e(s)} trial run(s)" for s, n in sorted(skipped.items()))
            + ".</p>"
        )
    parts += [
        '<h2 id="summary">Summary</h2>',
        "<p>Test metrics are the mean ± sample standard deviation over seeds, with a Student-t 95% interval; cells "
        "are ordered by validation Dice (best first). Seeds within a cell share the data split, so the interval "
        "measures training noise, not the spread over patients.</p>",
        html_table(_summary_frame(study.summary), table_id="summary-table"),
        '<h2 id="comparison">Paired comparison</h2>',
    ]
    if study.comparison is not None:
        parts.append(html_table(display_comparison(study.comparison), table_id="comparison-table"))
        parts.append(markdown_to_html(study.comparison_text))
    else:
        parts.append('<p class="note">No paired comparison (see the notes at the end).</p>')
    parts.append('<h2 id="fewshot">Few-shot curves</h2>')
    if figures.get("fewshot"):
        parts += [_figure(c, d) for c, d in figures["fewshot"]]
    else:
        parts.append("<p>The sweep has fewer than two few-shot sizes along either axis: no curve to draw.</p>")
    parts.append('<h2 id="patients">Per-patient results</h2>')
    if figures.get("dots"):
        parts += [_figure(c, d) for c, d in figures["dots"]]
    else:
        parts.append("<p>No per-patient values were found in the trial runs.</p>")
    parts += _best_section(study)
    if study.notes:
        parts.append('<h2 id="notes">Notes</h2><ul>' + "".join(f"<li>{_e(n)}</li>" for n in study.notes) + "</ul>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


def _figure(caption: str, data: bytes) -> str:
    return f'<figure><img alt="{_e(caption)}" src="{_png_uri(data)}"><figcaption>{_e(caption)}</figcaption></figure>'


def _best_section(study: Study) -> list[str]:
    best = study.best
    if not best:
        return []
    parts = [
        '<h2 id="best">Best model (chosen on validation)</h2>',
        f"<p>{_e(cell_label(best.get('cell') or {}))}: run <code>{_e(best.get('run_name'))}</code> "
        f"(<code>{_e(best.get('run_id'))}</code>). Export it with <code>lasegseg export --experiment "
        f"{_e(study.experiment)}</code>.</p>",
    ]
    if best.get("overlay"):
        parts.append(_figure("Test slices of the best run: prediction against the reference", best["overlay"]))
    if best.get("card"):
        parts.append('<div class="card">' + markdown_to_html(best["card"]) + "</div>")
    return parts


# --------------------------------------------------------------------------------------------------- writing


def _add_card(study: Study) -> None:
    """The best run's model card, as :func:`lasegseg.export.export.export_best` would write it."""
    if study.selection is None:
        return
    with tempfile.TemporaryDirectory(prefix="lasegseg-report-") as tmp:
        try:
            study.best["card"] = best_run_card(study.tracking_uri, study.experiment, study.selection, Path(tmp))
        except LasegsegError as exc:
            study.notes.append(f"model card left out: {exc}")


def write_report(
    tracking_uri: str,
    experiment: str,
    out: str | Path,
    *,
    parent_run_id: str | None = None,
    metric: str = "dice",
    log_to_parent: bool = True,
) -> Path:
    """Gather the study, write ``out`` atomically and, optionally, log it to the sweep's parent run.

    Args:
        tracking_uri: the MLflow tracking URI.
        experiment: the sweep's experiment name.
        out: the HTML file to write.
        parent_run_id: only this sweep run's trials (default: all of the experiment's); the page is logged to it,
            else to the experiment's latest sweep run.
        metric: the per-patient metric of the paired comparison.
        log_to_parent: log the page as ``report/report.html`` of the parent run.

    Returns:
        the written path.
    """
    study = gather(tracking_uri, experiment, parent_run_id, metric=metric)
    _add_card(study)
    with tempfile.TemporaryDirectory(prefix="lasegseg-report-") as tmp:
        page = render(study, _figures(study, Path(tmp)))
    out = atomic_write(Path(out), lambda p: p.write_text(page, encoding="utf-8"))
    if log_to_parent:
        try:
            log_to_sweep_run(tracking_uri, experiment, parent_run_id, [out], "report", "the report")
        except Exception as exc:  # noqa: BLE001 - the page is written; say why MLflow did not get it
            raise LasegsegError(f"report written to {out} but not logged to MLflow: {first_line(exc)}") from exc
    return out
