"""A study read back from MLflow: everything the report shows, gathered in one place (``lasegseg report``)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lasegseg import metric_table
from lasegseg.errors import LasegsegError
from lasegseg.results.aggregate import summarize
from lasegseg.results.compare import compare_trials
from lasegseg.results.per_patient import patient_matrix
from lasegseg.results.selection import Selection, select_best
from lasegseg.results.trials import download_artifact, load_trials


def dot_metrics() -> list[str]:
    """The per-patient metrics shown as dot plots (when the trials logged them)."""
    return [m.name for m in metric_table.metrics() if m.dots]


@dataclass
class Study:
    """Everything the page shows, gathered from MLflow (see :func:`gather`).

    Args:
        experiment: the MLflow experiment (sweep name).
        tracking_uri: where it was read, as shown to people.
        parent_run_id: the sweep run whose trials are shown, or None for all of the experiment's.
        trials: :func:`lasegseg.results.aggregate.load_trials`.
        summary: :func:`lasegseg.results.aggregate.summarize`.
        comparison: one row per cell against the reference, or None when it could not be made.
        comparison_text: the comparison's Markdown notes (reference, direction, small-sample warning).
        per_patient: one row per (cell, test patient) with the per-patient metrics averaged over seeds.
        best: the best cell on validation: ``run_id``, ``run_name``, ``cell``, ``overlay`` (PNG bytes, when the run
            has them) and ``card`` (Markdown, added by the report).
        selection: the best cell's :class:`~lasegseg.results.selection.Selection`, or None before it was read.
        notes: things the reader should know that were not shown (missing artifacts, failed parts).
    """

    experiment: str
    tracking_uri: str
    parent_run_id: str | None
    trials: pd.DataFrame
    summary: pd.DataFrame
    comparison: pd.DataFrame | None = None
    comparison_text: str = ""
    per_patient: pd.DataFrame | None = None
    best: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    selection: Selection | None = None


# --------------------------------------------------------------------------------------------------- gathering


def gather(tracking_uri: str, experiment: str, parent_run_id: str | None = None, *, metric: str = "dice") -> Study:
    """Read a study from MLflow: trials, summary, comparison, per-patient values, the best run's artifacts.

    Parts that cannot be built (no per-patient files, no overlay) are left out and named in ``notes``; an
    unreachable store, an unknown experiment or one with no finished trial raises.

    Args:
        tracking_uri: the MLflow tracking URI.
        experiment: the sweep's experiment name.
        parent_run_id: only this sweep run's trials; None for all of the experiment's.
        metric: the per-patient metric of the paired comparison.
    """
    trials = load_trials(tracking_uri, experiment, parent_run_id)
    study = Study(experiment, tracking_uri, parent_run_id, trials, summarize(trials))
    _add_comparison(study, metric)
    _add_best(study)
    return study


def _add_comparison(study: Study, metric: str) -> None:
    try:
        result = compare_trials(
            study.tracking_uri, study.experiment, study.trials, study.summary, study.parent_run_id, metric=metric
        )
    except LasegsegError as exc:
        study.notes.append(f"paired comparison left out: {exc}")
        return
    study.comparison = result.table
    study.comparison_text = "\n".join(f"- {note}" for note in result.notes)
    frames = []
    for name in dot_metrics():
        try:
            matrix, _ = patient_matrix(study.trials, result.tables, name)
        except LasegsegError:
            continue  # runs from before the metric existed: no dots for it
        frames.append(matrix.stack().rename(name).reset_index().set_index(["case_id", "cell"]))
    if frames:
        study.per_patient = pd.concat(frames, axis=1).reset_index()


def _add_best(study: Study) -> None:
    selection = select_best(
        study.tracking_uri, study.experiment, metric_table.primary().val, study.parent_run_id, trials=study.trials
    )
    run = selection.trials.iloc[0]
    best: dict[str, Any] = {"run_id": str(run["run_id"]), "run_name": str(run["run_name"]), "cell": selection.cell}
    with tempfile.TemporaryDirectory(prefix="lasegseg-report-") as tmp:
        try:
            path = download_artifact(study.tracking_uri, best["run_id"], "overlays.png", Path(tmp))
            best["overlay"] = path.read_bytes()
        except LasegsegError as exc:
            study.notes.append(f"overlays of the best run left out: {exc}")
    study.best, study.selection = best, selection
