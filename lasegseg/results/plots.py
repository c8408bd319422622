"""A sweep's figures: few-shot curves from its summary (the reference paper's Figure 2: mean ± std over seeds per
model) and per-patient dot plots per cell. Which metrics get which figure is said in :mod:`lasegseg.metric_table`.

matplotlib is imported inside the functions (``Figure`` objects rendered by Agg, no pyplot state) so that importing
this module stays cheap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lasegseg import metric_table
from lasegseg.config_checks import Mode
from lasegseg.fsio import save_figure
from lasegseg.metric_table import Metric
from lasegseg.results.trials import ranking_column

AXES = {"data.fraction": "fraction", "data.patients": "patients"}
SERIES = ("model.backbone", "model.decoder", "model.mode")
_LINESTYLES = {Mode.FINETUNE: "-", Mode.FROZEN: "--", Mode.LORA: ":"}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def curve_metrics() -> dict[str, Metric]:
    """``{test mean column: metric}`` of the metrics drawn as few-shot curves."""
    return {m.test_mean: m for m in metric_table.metrics() if m.curves}


def fewshot_points(summary: pd.DataFrame, x: str) -> pd.DataFrame:
    """The cells that belong on the few-shot curve of axis ``x``, with a numeric ``_x`` column.

    The fraction curve uses cells trained on all patients (``data.patients == 0``); the patient curve uses
    cells trained on all slices (``data.fraction == 1``), placing "all" patients at ``n_train_patients`` when
    the summary has that column and dropping it otherwise. Where several cells share a model and an x value
    (e.g. a learning-rate screen), the one with the best validation Dice is kept.
    """
    if x not in AXES:
        raise ValueError(f"x must be one of {', '.join(AXES)}, got '{x}'")
    if summary.empty or x not in summary.columns:
        return summary.iloc[0:0].assign(_x=pd.Series(dtype=float))
    if x == "data.fraction":
        cells = summary[summary["data.patients"] == 0] if "data.patients" in summary else summary
        cells = cells.assign(_x=cells["data.fraction"].astype(float) * 100)
    else:
        cells = summary[summary["data.fraction"] == 1.0] if "data.fraction" in summary else summary
        patients = cells["data.patients"].astype(float)
        if "n_train_patients" in cells:
            patients = patients.where(patients > 0, cells["n_train_patients"].astype(float))
        cells = cells.assign(_x=patients.where(patients > 0))
    cells = cells.dropna(subset=["_x"])
    series = [c for c in SERIES if c in cells.columns]
    if ranking_column() in cells:
        cells = cells.sort_values(ranking_column(), ascending=False, na_position="last", kind="stable")
    return cells.drop_duplicates(subset=[*series, "_x"], keep="first").sort_values([*series, "_x"], kind="stable")


def plot_fewshot(summary: pd.DataFrame, x: str, metric: str, path: str | Path) -> Path:
    """Plot ``metric`` (mean ± std over seeds) against few-shot axis ``x``, one line per (backbone, decoder, mode).

    Args:
        summary: the output of :func:`lasegseg.results.aggregate.summarize`.
        x: ``"data.fraction"`` (shown in %) or ``"data.patients"``.
        metric: the test mean of a metric drawn as curves (:func:`curve_metrics`: ``"test_dice_mean"``,
            ``"test_iou_mean"``); the summary columns ``<metric>_mean`` and ``<metric>_std`` are plotted.
        path: output PNG (1200 × 750 px).
    """
    # deferred: heavy (matplotlib, only where a figure is drawn)
    from matplotlib import colormaps
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullLocator

    curves = curve_metrics()
    if metric not in curves:
        raise ValueError(f"metric must be one of {', '.join(curves)}, got '{metric}'")
    entry = curves[metric]
    points = fewshot_points(summary, x)
    if points.empty:
        raise ValueError(f"no cells to plot along {x}")
    series = [c for c in SERIES if c in points.columns]
    show_backbone = "model.backbone" in series and points["model.backbone"].nunique() > 1
    decoders = sorted({tuple(k[:-1]) for k in points.groupby(series, sort=True).groups})
    colors = colormaps["tab10"]

    fig = Figure(figsize=(8, 5), facecolor="white")
    ax = fig.subplots()
    for i, (key, cells) in enumerate(points.groupby(series, sort=True)):
        key = dict(zip(series, key if isinstance(key, tuple) else (key,), strict=True))
        mode = key.get("model.mode", "")
        color = colors(decoders.index(tuple(key[c] for c in series[:-1])) % 10)
        xs = cells["_x"].to_numpy(float)
        mean = cells[f"{metric}_mean"].to_numpy(float)
        std = np.nan_to_num(cells[f"{metric}_std"].to_numpy(float))
        label_parts = [str(key[c]) for c in series if c != "model.backbone" or show_backbone]
        ax.plot(
            xs,
            mean,
            linestyle=_LINESTYLES.get(mode, "-."),
            marker=_MARKERS[i % len(_MARKERS)],
            color=color,
            lw=1.8,
            ms=6,
            label=" · ".join(label_parts),
        )
        ax.fill_between(xs, mean - std, mean + std, color=color, alpha=0.15, lw=0)

    ticks = np.unique(points["_x"].to_numpy(float))
    if ticks.max() / ticks.min() >= 8:
        ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([_tick_label(x, t, points) for t in ticks])
    name = f"Test {entry.display}"
    backbone = "" if show_backbone or "model.backbone" not in points else f" ({points['model.backbone'].iloc[0]})"
    if x == "data.fraction":
        ax.set_xlabel("training data (% of training slices)")
        ax.set_title(f"Few-shot: {name} vs share of training slices{backbone}")
    else:
        ax.set_xlabel("training patients")
        ax.set_title(f"Few-shot: {name} vs number of training patients{backbone}")
    ax.set_ylabel(f"{name} (mean ± std over seeds)")
    low, high = ax.get_ylim()
    ax.set_ylim(max(low, entry.low), min(high, entry.high))
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=9, framealpha=0.9)
    fig.tight_layout()
    return save_figure(fig, path, dpi=150)


def _tick_label(x: str, value: float, points: pd.DataFrame) -> str:
    if x == "data.fraction":
        return f"{value:g}%"
    is_all = ((points["_x"] == value) & (points["data.patients"] == 0)).any()
    return f"all ({value:g})" if is_all else f"{value:g}"


def plot_all(summary: pd.DataFrame, out_dir: str | Path) -> list[Path]:
    """Write the few-shot curves (Dice, IoU: :func:`curve_metrics`) for each axis that has at least two distinct
    values; return the paths."""
    out_dir = Path(out_dir)
    paths: list[Path] = []
    for x, axis_name in AXES.items():
        points = fewshot_points(summary, x)
        if points["_x"].nunique() < 2:
            continue
        for metric, entry in curve_metrics().items():
            if f"{metric}_mean" in points and points[f"{metric}_mean"].notna().any():
                paths.append(plot_fewshot(summary, x, metric, out_dir / f"fewshot_{axis_name}_{entry.name}.png"))
    return paths


def dot_plot(per_patient: pd.DataFrame, order: list[str], labels: dict[str, str], metric: str, path: Path) -> Path:
    """One row per cell (in ``order``), one dot per test patient (seed-averaged), the median as a bar.

    Args:
        per_patient: rows with ``cell``, ``case_id`` and a ``metric`` column.
        order: cell hashes, top to bottom.
        labels: cell hash → label.
        metric: the column to plot, a metric of :mod:`lasegseg.metric_table`.
        path: output PNG.
    """
    from matplotlib.figure import Figure  # deferred: heavy (matplotlib, only where a figure is drawn)

    entry = metric_table.metric(metric)
    cells = [c for c in order if (per_patient["cell"] == c).any()]
    if not cells:
        raise ValueError(f"no per-patient '{metric}' values to plot")
    fig = Figure(figsize=(9, 0.9 + 0.42 * len(cells)), facecolor="white")
    ax = fig.subplots()
    rng = np.random.default_rng(0)  # the jitter only separates dots; fixed so the page is reproducible
    for i, cell in enumerate(cells):
        values = per_patient.loc[per_patient["cell"] == cell, metric].to_numpy(float)
        values = values[np.isfinite(values)]
        if not values.size:
            continue
        y = len(cells) - 1 - i
        ax.scatter(values, y + rng.uniform(-0.18, 0.18, values.size), s=16, alpha=0.75, color="#1f77b4", lw=0)
        ax.plot([np.median(values)] * 2, [y - 0.3, y + 0.3], color="#d62728", lw=2)
    if entry.bounded:  # overlap scores live in [0, 1]: a fixed axis keeps cells and reports comparable
        pad = 0.02 * (entry.high - entry.low)
        ax.set_xlim(entry.low - pad, entry.high + pad)
    ax.set_yticks(range(len(cells)))
    ax.set_yticklabels([labels.get(c, c) for c in reversed(cells)], fontsize=8)
    ax.set_xlabel(f"test {entry.label()} per patient (mean over seeds); red bar: median")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
