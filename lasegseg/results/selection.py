"""Choosing a sweep's best cell on validation, never on test: the cell with the best mean over seeds of a validation
metric, and its seed runs best first (``lasegseg export`` and the report's best model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from lasegseg import metric_table
from lasegseg.errors import LasegsegError
from lasegseg.results.aggregate import summarize
from lasegseg.results.trials import load_trials


def card_metrics() -> list[str]:
    """The trial values a model card and a registered version show: each summarised metric's test mean, then each
    validation value."""
    return [m.test_mean for m in metric_table.summarised()] + metric_table.selection_metrics()


@dataclass
class Selection:
    """The chosen cell and its runs.

    Args:
        metric: the validation metric the cells were ranked by.
        cell: the cell's summary row (config columns, ``cell``, ``n``, ``seeds``, ``<metric>_mean`` …).
        trials: the cell's finished trial rows, best ``metric`` first.
        stats: ``{metric: {"mean": …, "std": …}}`` over the cell's seeds for test and validation metrics.
    """

    metric: str
    cell: dict[str, Any]
    trials: pd.DataFrame
    stats: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def best_run_id(self) -> str:
        return str(self.trials["run_id"].iloc[0])

    @property
    def run_ids(self) -> list[str]:
        return [str(r) for r in self.trials["run_id"]]


def check_metric(metric: str) -> None:
    """Refuse test metrics (choosing on test leaks it into the result) and unknown names."""
    if metric.startswith("test"):
        raise LasegsegError(
            f"metric '{metric}' is a test metric: a model is chosen on validation only "
            f"(use one of {', '.join(metric_table.selection_metrics())})"
        )
    if metric not in metric_table.selection_metrics():
        raise LasegsegError(
            f"unknown selection metric '{metric}' (use one of {', '.join(metric_table.selection_metrics())})"
        )


def nan_to_none(value: Any) -> Any:
    """A plain Python value, None for a missing one (NaN, NA): for JSON and cards."""
    if value is None:
        return None
    try:
        return None if pd.isna(value) else (value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        return value


def select_best(
    tracking_uri: str,
    experiment: str,
    metric: str = "val_dice",
    parent_run_id: str | None = None,
    trials: pd.DataFrame | None = None,
) -> Selection:
    """The best cell of ``experiment`` by the mean over seeds of ``metric``, and its runs best first.

    ``trials``: :func:`~lasegseg.results.trials.load_trials` of the experiment (and parent run) when the caller has
    them already (the report), so that every run is not read from the store twice.

    Raises:
        LasegsegError: test or unknown metric, unreachable store, unknown experiment, no finished trial, or a metric
            no finished trial logged.
    """
    check_metric(metric)
    if trials is None:
        trials = load_trials(tracking_uri, experiment, parent_run_id)
    if trials[metric].isna().all():
        raise LasegsegError(f"metric '{metric}' was not logged by any finished trial of experiment '{experiment}'")
    summary = summarize(trials)
    # summarize() ranks by the primary validation metric; others are ranked by their own mean over the same cells.
    summary[f"{metric}_rank"] = summary["cell"].map(trials.groupby("cell")[metric].mean())
    summary = summary.sort_values(f"{metric}_rank", ascending=False, na_position="last", kind="stable")
    best = summary.iloc[0]
    runs = trials[trials["cell"] == best["cell"]].sort_values(
        [metric, "seed"], ascending=[False, True], na_position="last", kind="stable"
    )
    if runs.empty:  # the two hashes disagree only if a run logged a partial config
        raise LasegsegError(f"experiment '{experiment}': no trial run matches the best cell {best['cell']}")
    stats = {}
    for m in card_metrics():
        values = runs[m].dropna().astype(float)
        stats[m] = {
            "mean": float(values.mean()) if len(values) else math.nan,
            "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
        }
    cell = {k: nan_to_none(v) for k, v in best.drop(labels=[f"{metric}_rank"]).items()}
    return Selection(metric=metric, cell=cell, trials=runs.reset_index(drop=True), stats=stats)
