"""The sweep's tail, after its last trial: the summary over seeds, the paired comparison, the parent run closed, and
where everything is. Also its warm-up: the same one-time costs paid on a background thread while the trials run.

Imported by the driver once the trials are under way (it pulls in pandas, scipy and matplotlib, ~2 s).
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lasegseg.config import Config
from lasegseg.errors import LasegsegError, first_line
from lasegseg.results.aggregate import aggregate, summarize, write_summary
from lasegseg.results.compare import compare, compare_cells
from lasegseg.results.comparison_tables import format_table as format_comparison
from lasegseg.results.tables import format_table
from lasegseg.results.trials import load_trials
from lasegseg.sweep.plan import SweepPlan
from lasegseg.sweep.state import push_files, save_state
from lasegseg.tracking.client import client, display_uri

log = logging.getLogger("lasegseg.sweep")


def finish(plan: SweepPlan, state: dict[str, Any], failed: list[str], failed_cells: list[str] = ()) -> int:
    """Aggregate over seeds, close the parent run and say where everything is; 0 when every trial finished.

    ``failed_cells`` are the screening cells none of whose trials finished: their grids never ran. They are named,
    one line each, and tagged on the parent run.
    """
    uri, parent = state["tracking_uri"], state["parent_run_id"]
    try:
        trials = load_trials(uri, plan.name, parent)  # once, for the summary and the comparison
        summary = aggregate(uri, plan.name, plan.sweep_dir, parent_run_id=parent, trials=trials)
        print(format_table(summary))
    except LasegsegError as exc:
        print(f"aggregation: {exc}", file=sys.stderr)
        summary = None
    if summary is not None:
        print_comparison(uri, plan.name, plan.sweep_dir, parent, trials)
    if failed_cells:
        client(uri).set_tag(parent, "lasegseg.failed_cells", ", ".join(failed_cells))
    client(uri).set_terminated(parent, "FINISHED" if summary is not None else "FAILED")
    save_state(plan, {**state, "status": "finished"})
    push_files(plan)
    shown = display_uri(uri)
    print(f"results: {plan.root.uri}  (MLflow: {shown}, experiment '{plan.name}', parent run {parent})")
    print(ui_hint(shown, state["experiment_id"]))
    if summary is not None:
        print(f"study report (one HTML page): lasegseg report --experiment {plan.name} --tracking-uri {shown}")
    for cell in failed_cells:
        print(f"failed cell {cell}: every screening trial failed, so its grid did not run", file=sys.stderr)
    if failed:
        print(f"{len(failed)} trial(s) failed: " + ", ".join(failed), file=sys.stderr)
    if failed or failed_cells:
        return 1
    return 0 if summary is not None else 1


def print_comparison(uri: str, experiment: str, out_dir: Path, parent: str, trials=None) -> None:
    """Per-patient Dice of every cell against the best (on validation), into the sweep folder and parent run.

    An extra on top of the summary: any failure is one line on stderr and never fails the sweep or keeps the
    parent run from being closed.
    """
    try:
        comparison, notes = compare(uri, experiment, out_dir, parent_run_id=parent, trials=trials)
        print(format_comparison(comparison, notes))
    except LasegsegError as exc:
        print(f"comparison: {exc}", file=sys.stderr)
    except Exception as exc:  # a bug here must not cost the finished sweep its FINISHED parent run
        log.debug("comparison failed", exc_info=True)
        print(f"comparison: {type(exc).__name__}: {first_line(exc)}", file=sys.stderr)


def ui_hint(tracking_uri: str, experiment_id: str) -> str:
    """How to open this sweep in the MLflow UI, in the model-training view (not the GenAI one)."""
    page = f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow UI: {tracking_uri.rstrip('/')}/{page}"
    return f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri}  then open http://127.0.0.1:5000/{page}"


def warm_up() -> None:
    """The summary's and comparison's one-time costs beyond imports (matplotlib's fonts, pandas' parquet writer) paid
    on two made-up cells, so that the sweep's tail after its last trial is the aggregation itself. Only a head start:
    failures are ignored."""
    try:
        base = Config().to_flat()
        trials = pd.DataFrame([
            {**base, "data.patients": n, "seed": seed, "test_dice_mean": 0.5 + 0.1 * seed, "test_iou_mean": 0.4,
             "test_nsd_mean": 0.5, "val_dice": 0.5 + 0.05 * n, "test_hd95_mean": 5.0}
            for n in (1, 2) for seed in (0, 1)
        ])  # fmt: skip
        summary = summarize(trials)
        with tempfile.TemporaryDirectory(prefix="lasegseg-warm-") as tmp:
            write_summary(summary, trials, tmp)
        matrix = pd.DataFrame(np.linspace(0.4, 0.9, 16).reshape(8, 2), columns=list(summary["cell"]))
        compare_cells(matrix, summary, summary["cell"].iloc[0], metric="dice", resamples=100)
    except Exception:  # noqa: BLE001 - only a head start: the aggregation does it again and reports
        log.debug("warming the summary up failed", exc_info=True)
