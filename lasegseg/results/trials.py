"""A sweep's trial runs read back from MLflow, and files logged to its parent run.

The sweep writes one experiment per sweep name, a parent run per invocation (tag ``lasegseg.role=sweep``) and a
child run per trial (tags ``lasegseg.role=trial``, ``mlflow.parentRunId``, ``lasegseg.cell``; params = the flat
config; final metrics such as ``test_dice_mean`` and ``val_dice``, named by :mod:`lasegseg.metric_table`). Only
FINISHED trials are read; the others are counted in a logged note.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pandas as pd

from lasegseg import metric_table
from lasegseg.config import coerce, config_hash, config_keys
from lasegseg.environ import scoped_environ
from lasegseg.errors import ConfigError, LasegsegError, first_line
from lasegseg.tracking.client import check_reachable, client

log = logging.getLogger(__name__)

NOT_HYPERPARAMETERS = ("seed",)
"""Config keys that vary between the trials of one cell. ``data.path``/``data.cache_dir`` are constant within a
sweep, so grouping by them costs nothing and keeps sweeps on different datasets apart."""
EXTRA_CELL_COLUMNS = ("n_train_patients",)
"""Per-trial values (params or metrics) that are properties of the cell, carried into the summary (median)."""

_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_CONNECT_TIMEOUT_S = 5.0
_PAGE_SIZE = 1000


def trial_columns() -> list[str]:
    """The final metrics read from each trial run: for each summarised metric of the table its test mean (and std
    when the summary gives an interval) and undefined count, then each validation value."""
    names = []
    for m in metric_table.summarised():
        names += [m.test_mean] + ([m.test_std] if m.over_seeds == "interval" else [])
        names += [m.n_undefined] if m.count_undefined else []
    return names + metric_table.selection_metrics()


def interval_columns() -> list[str]:
    """The trial columns summarised with mean, std and t-interval over seeds: each ``interval`` metric's test mean,
    then the primary validation value (which ranks the cells)."""
    return [m.test_mean for m in metric_table.summarised() if m.over_seeds == "interval"] + [metric_table.primary().val]


def ranking_column() -> str:
    """The summary column that ranks the cells: the primary validation value's mean over seeds (``val_dice_mean``)."""
    return f"{metric_table.primary().val}_mean"


@contextlib.contextmanager
def tracking(tracking_uri: str) -> Iterator[Any]:
    """An MlflowClient for ``tracking_uri`` that fails fast, with one clear line, when the store is unreachable."""
    from mlflow.exceptions import MlflowException  # deferred: heavy (MLflow, ~1 s: the tables need none of it)

    check_reachable(tracking_uri, timeout=_CONNECT_TIMEOUT_S, must_exist=True)
    is_http = urlparse(tracking_uri).scheme in ("http", "https")
    # MLflow retries an unreachable server for minutes by default; within this call, retry briefly
    # (unless the user chose their own values).
    with scoped_environ(_HTTP_ENV if is_http else {}, override=False):
        try:
            yield client(tracking_uri)
        except MlflowException as exc:
            raise LasegsegError(f"MLflow tracking store {tracking_uri}: {first_line(exc)}") from exc
        except OSError as exc:  # requests' ConnectionError is an OSError; so are artifact-store failures
            raise LasegsegError(f"MLflow tracking store {tracking_uri}: {first_line(exc)}") from exc


def experiment_id(client: Any, tracking_uri: str, experiment: str) -> str:
    """The id of the experiment named ``experiment``; LasegsegError naming the store when there is none."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise LasegsegError(f"experiment '{experiment}' not found at {tracking_uri}")
    return exp.experiment_id


def search_all(client: Any, experiment_id: str, filter_string: str, order_by: list[str] | None = None) -> list:
    """Every run of the experiment that matches ``filter_string``, page by page."""
    runs: list = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=_PAGE_SIZE, order_by=order_by, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def trial_filter(parent_run_id: str | None) -> str:
    """The MLflow filter of a sweep's trial runs (of one parent run when given)."""
    flt = "tags.`lasegseg.role` = 'trial'"
    if parent_run_id:
        flt += f" and tags.`mlflow.parentRunId` = '{parent_run_id}'"
    return flt


def _parse_params(params: dict[str, str], run_id: str) -> dict[str, Any]:
    keys = config_keys()
    out: dict[str, Any] = {}
    for key, text in params.items():
        if key in keys:
            try:
                out[key] = coerce(key, text)
            except ConfigError as exc:
                raise LasegsegError(f"run {run_id}: param {exc}") from None
        elif key in EXTRA_CELL_COLUMNS:
            out[key] = pd.to_numeric(text, errors="coerce")
    return out


def _final_metric(metrics: dict[str, float], name: str) -> float:
    """A trial's final value: ``best_<name>`` where the per-epoch series shares the name (val_dice, val_iou)."""
    return metrics.get(f"best_{name}", metrics.get(name, math.nan))


def load_trials(tracking_uri: str, experiment: str, parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per FINISHED trial run of ``experiment`` (optionally only the children of ``parent_run_id``).

    Columns: ``run_id``, ``run_name``, ``status``, ``parent_run_id``, ``cell``, every flat config key (typed;
    a key a run did not log is missing, never filled with today's default), :func:`trial_columns` (the run's
    latest value; NaN when not logged) and ``n_train_patients`` when the runs logged it. Trials that did not
    finish are counted in ``df.attrs["skipped"]`` (``{status: count}``) and in a logged warning.

    Raises:
        LasegsegError: the store is unreachable, the experiment does not exist, or it has no finished trial.
    """
    with tracking(tracking_uri) as client:
        exp_id = experiment_id(client, tracking_uri, experiment)
        runs = search_all(client, exp_id, trial_filter(parent_run_id))

    skipped: dict[str, int] = {}
    rows = []
    for run in runs:
        status = run.info.status
        if status != "FINISHED":
            skipped[status] = skipped.get(status, 0) + 1
            continue
        config = _parse_params(run.data.params, run.info.run_id)
        flat = {k: v for k, v in config.items() if k in config_keys()}
        rows.append(
            {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "status": status,
                "parent_run_id": run.data.tags.get("mlflow.parentRunId"),
                "cell": config_hash(flat, exclude=NOT_HYPERPARAMETERS),
                **config,
                **{m: _final_metric(run.data.metrics, m) for m in trial_columns()},
                **{c: run.data.metrics[c] for c in EXTRA_CELL_COLUMNS if c in run.data.metrics},
            }
        )
    if skipped:
        note = ", ".join(f"{n} {status}" for status, n in sorted(skipped.items()))
        log.warning("experiment '%s': skipped %s trial run(s); aggregating %d finished", experiment, note, len(rows))
    where = f"experiment '{experiment}'" + (f" (parent run {parent_run_id})" if parent_run_id else "")
    if not rows:
        extra = f" ({sum(skipped.values())} trial runs did not finish)" if skipped else ""
        raise LasegsegError(f"{where} at {tracking_uri} has no finished trial runs{extra}")

    df = pd.DataFrame(rows)
    ordered = ["run_id", "run_name", "status", "parent_run_id", "cell"]
    ordered += [k for k in config_keys() if k in df.columns]
    ordered += trial_columns() + [c for c in EXTRA_CELL_COLUMNS if c in df.columns]
    df = typed_columns(df[ordered])
    df.attrs["skipped"] = skipped
    return df


def cell_keys(df: pd.DataFrame) -> list[str]:
    """The config columns that define a cell: every config key present except :data:`NOT_HYPERPARAMETERS`."""
    return [k for k in config_keys() if k in df.columns and k not in NOT_HYPERPARAMETERS]


def typed_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Config columns with missing values keep their type via pandas' nullable dtypes (``Int64``, ``boolean``)."""
    nullable = {int: "Int64", bool: "boolean"}
    for key, typ in config_keys().items():
        if key in df.columns and typ in nullable and df[key].isna().any():
            df[key] = df[key].astype(nullable[typ])
    return df


def latest_sweep_run(client: Any, experiment_id: str) -> str | None:
    """The most recently started sweep (parent) run of the experiment, or None."""
    page = client.search_runs(
        [experiment_id],
        filter_string="tags.`lasegseg.role` = 'sweep'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return page[0].info.run_id if page else None


def log_to_sweep_run(
    tracking_uri: str, experiment: str, parent_run_id: str | None, paths: Iterable[Path], artifact_path: str, what: str
) -> str | None:
    """Log files as artifacts of a sweep's parent run; returns its id, or None (with a warning) when there is none.

    Args:
        tracking_uri: the MLflow URI.
        experiment: the sweep's experiment.
        parent_run_id: the parent run; None for the experiment's most recent sweep run.
        paths: the files.
        artifact_path: the folder they go to in the run's artifacts.
        what: the files in the warning (``results``, ``the report``).
    """
    with tracking(tracking_uri) as client:
        parent = parent_run_id or latest_sweep_run(client, experiment_id(client, tracking_uri, experiment))
        if parent is None:
            log.warning("experiment '%s' has no sweep parent run; %s not logged to MLflow", experiment, what)
            return None
        for path in paths:
            client.log_artifact(parent, str(path), artifact_path=artifact_path)
    return parent


def download_artifact(tracking_uri: str, run_id: str, artifact_path: str, dst: Path) -> Path:
    """Download one artifact (file or folder) of a run into ``dst``; LasegsegError naming the run when it cannot."""
    from mlflow.artifacts import download_artifacts  # deferred: heavy (MLflow, ~1 s)

    try:
        return Path(
            download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=tracking_uri)
        )
    except Exception as exc:  # noqa: BLE001 - MLflow raises many types for a missing artifact
        raise LasegsegError(f"run {run_id}: cannot download artifact '{artifact_path}' ({first_line(exc)})") from None
