"""A sweep's trials summarised over seeds: one row per cell (every config key but the seed), written as files and
logged to the sweep's parent run (``summary.csv`` …).

How each metric is summarised comes from :mod:`lasegseg.metric_table`: mean, sample std and Student-t 95% interval
over seeds, or the mean only, and the sum of the undefined counts.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from lasegseg import metric_table
from lasegseg.config import config_hash
from lasegseg.fsio import atomic_write
from lasegseg.results.plots import plot_all
from lasegseg.results.tables import format_markdown
from lasegseg.results.trials import (
    EXTRA_CELL_COLUMNS,
    NOT_HYPERPARAMETERS,
    cell_keys,
    interval_columns,
    load_trials,
    log_to_sweep_run,
    ranking_column,
    tracking,
    typed_columns,
)


def _native(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _mean_std_ci(values: pd.Series) -> tuple[float, float, float, float]:
    x = values.dropna().to_numpy(float)
    if x.size == 0:
        return (math.nan,) * 4
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan, math.nan
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.975, x.size - 1)) * std / math.sqrt(x.size)
    return mean, std, mean - half, mean + half


def summarize(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per cell, sorted by mean validation Dice (the primary validation metric; best first).

    Columns: the cell's config columns, ``cell`` (:func:`lasegseg.config.config_hash` without the seed), ``n``
    (trials), ``seeds`` (e.g. ``"0,1,2"``), for each of :func:`interval_columns` ``<m>_mean``, ``<m>_std`` (sample
    std, NaN when n = 1), ``<m>_ci95_low``/``<m>_ci95_high`` (Student t), then the mean of each ``mean``-only metric
    (``test_hd95_mean_mean``), each undefined count summed (``test_hd95_n_undefined_sum``: cases without an HD95
    over all the cell's trials; NaN when no trial logged the count, as runs from before NSD did not) and
    ``n_train_patients`` when the trials have it.
    """
    keys = cell_keys(trials)
    rows = []
    for _, group in trials.groupby(keys, dropna=False, sort=False):
        config = {k: _native(group[k].iloc[0]) for k in keys}
        row: dict[str, Any] = {
            **config,
            "cell": config_hash({k: v for k, v in config.items() if not pd.isna(v)}, exclude=NOT_HYPERPARAMETERS),
            "n": len(group),
            "seeds": ",".join(str(s) for s in sorted(group["seed"].dropna())) if "seed" in group else "",
        }
        for m in interval_columns():
            stats_ = _mean_std_ci(group[m]) if m in group else (math.nan,) * 4
            row.update(zip((f"{m}_mean", f"{m}_std", f"{m}_ci95_low", f"{m}_ci95_high"), stats_, strict=True))
        for m in (m.test_mean for m in metric_table.summarised() if m.over_seeds == "mean"):
            row[f"{m}_mean"] = float(group[m].mean()) if m in group else math.nan
        for m in (m.n_undefined for m in metric_table.summarised() if m.count_undefined):
            row[f"{m}_sum"] = float(group[m].sum(min_count=1)) if m in group else math.nan
        for c in EXTRA_CELL_COLUMNS:
            if c in group:
                row[c] = float(group[c].median())
        rows.append(row)
    summary = pd.DataFrame(rows)
    summary = summary.sort_values(ranking_column(), ascending=False, na_position="last", kind="stable")
    return typed_columns(summary.reset_index(drop=True))


def write_summary(summary: pd.DataFrame, trials: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write ``summary.parquet``, ``summary.csv``, ``summary.md``, ``trials.csv`` and the few-shot plots.

    Each file is written atomically (temp file + ``os.replace``). Returns ``{name: path}`` with names
    ``summary_parquet``, ``summary_csv``, ``summary_md``, ``trials_csv`` and the plot file stems.
    """
    out = Path(out_dir)
    n_trials, n_cells = len(trials), len(summary)
    markdown = (
        f"{n_cells} cell(s) from {n_trials} finished trial(s); test metrics are mean ± sample std over seeds, "
        "best validation Dice first (95% t-intervals in summary.csv).\n\n" + format_markdown(summary) + "\n"
    )
    paths = {
        "summary_parquet": atomic_write(out / "summary.parquet", lambda p: summary.to_parquet(p, engine="pyarrow")),
        "summary_csv": atomic_write(out / "summary.csv", lambda p: summary.to_csv(p, index=False)),
        "summary_md": atomic_write(out / "summary.md", lambda p: p.write_text(markdown, encoding="utf-8")),
        "trials_csv": atomic_write(out / "trials.csv", lambda p: trials.to_csv(p, index=False)),
    }
    paths.update({p.stem: p for p in plot_all(summary, out)})
    return paths


def aggregate(
    tracking_uri: str,
    experiment: str,
    out_dir: str | Path,
    parent_run_id: str | None = None,
    log_to_parent: bool = True,
    trials: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Load, summarise and write a sweep's trials; optionally attach the results to the sweep's parent run.

    With ``log_to_parent``, the files are logged as artifacts under ``summary/`` of the parent run (the one
    given, else the most recent ``lasegseg.role=sweep`` run of the experiment) together with the metrics
    ``best_test_dice_mean`` and ``best_val_dice`` (means over seeds of the best cell by validation Dice) and the
    tag ``lasegseg.best_cell``. Only the given parent's trials are aggregated when ``parent_run_id`` is given;
    otherwise all of the experiment's.

    ``trials``: :func:`load_trials` of the same arguments, when the caller already has them.

    Returns:
        the summary (see :func:`summarize`).
    """
    if trials is None:
        trials = load_trials(tracking_uri, experiment, parent_run_id)
    summary = summarize(trials)
    paths = write_summary(summary, trials, out_dir)
    if log_to_parent:
        parent = log_to_sweep_run(tracking_uri, experiment, parent_run_id, paths.values(), "summary", "results")
        if parent is not None:
            best = summary.iloc[0]
            with tracking(tracking_uri) as client:
                for name in (f"{metric_table.primary().test_mean}_mean", ranking_column()):
                    if not pd.isna(best[name]):
                        client.log_metric(parent, f"best_{name.removesuffix('_mean')}", float(best[name]))
                client.set_tag(parent, "lasegseg.best_cell", best["cell"])
    return summary
