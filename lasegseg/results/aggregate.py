"""Aggregate a sweep's MLflow trials over seeds: one row per cell (every config key but the seed).

The sweep writes one experiment per sweep name, a parent run per invocation (tag ``lasegseg.role=sweep``) and a
child run per trial (tags ``lasegseg.role=trial``, ``mlflow.parentRunId``, ``lasegseg.cell``; params = the flat
config; final metrics such as ``test_dice_mean`` and ``val_dice``). Only FINISHED trials are aggregated; the
others are counted in a logged note.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import pandas as pd

from lasegseg.config import coerce, config_hash, config_keys
from lasegseg.environ import scoped_environ
from lasegseg.errors import ConfigError, LasegsegError, first_line
from lasegseg.fsio import atomic_write
from lasegseg.tracking.tracker import check_reachable, client

log = logging.getLogger(__name__)

TRIAL_METRICS = (
    "test_dice_mean",
    "test_dice_std",
    "test_iou_mean",
    "test_iou_std",
    "test_nsd_mean",
    "test_nsd_std",
    "test_hd95_mean",
    "test_hd95_n_undefined",
    "val_dice",
    "val_iou",
)
CELL_METRICS = ("test_dice_mean", "test_iou_mean", "test_nsd_mean", "val_dice")
"""Metrics summarised per cell with mean, sample std and a 95% t-interval over seeds."""
MEAN_ONLY_METRICS = ("test_hd95_mean",)
SUM_METRICS = ("test_hd95_n_undefined",)
"""Per-trial counts summed over a cell's trials: the test cases whose HD95 the per-trial mean skipped."""
NOT_HYPERPARAMETERS = ("seed",)
"""Config keys that vary between the trials of one cell. ``data.path``/``data.cache_dir`` are constant within a
sweep, so grouping by them costs nothing and keeps sweeps on different datasets apart."""
EXTRA_CELL_COLUMNS = ("n_train_patients",)
"""Per-trial values (params or metrics) that are properties of the cell, carried into the summary (median)."""

_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
_CONNECT_TIMEOUT_S = 5.0
_PAGE_SIZE = 1000


# --------------------------------------------------------------------------------------------------- reading


@contextlib.contextmanager
def tracking(tracking_uri: str) -> Iterator[Any]:
    """An MlflowClient for ``tracking_uri`` that fails fast, with one clear line, when the store is unreachable."""
    from mlflow.exceptions import MlflowException

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
    a key a run did not log is missing, never filled with today's default), :data:`TRIAL_METRICS` (the run's
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
                **{m: _final_metric(run.data.metrics, m) for m in TRIAL_METRICS},
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
    ordered += list(TRIAL_METRICS) + [c for c in EXTRA_CELL_COLUMNS if c in df.columns]
    df = _typed(df[ordered])
    df.attrs["skipped"] = skipped
    return df


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Config columns with missing values keep their type via pandas' nullable dtypes (``Int64``, ``boolean``)."""
    nullable = {int: "Int64", bool: "boolean"}
    for key, typ in config_keys().items():
        if key in df.columns and typ in nullable and df[key].isna().any():
            df[key] = df[key].astype(nullable[typ])
    return df


# --------------------------------------------------------------------------------------------------- summarising


def cell_keys(df: pd.DataFrame) -> list[str]:
    """The config columns that define a cell: every config key present except :data:`NOT_HYPERPARAMETERS`."""
    return [k for k in config_keys() if k in df.columns and k not in NOT_HYPERPARAMETERS]


def _native(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _mean_std_ci(values: pd.Series) -> tuple[float, float, float, float]:
    from scipy import stats

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
    """One row per cell, sorted by mean validation Dice (best first).

    Columns: the cell's config columns, ``cell`` (:func:`lasegseg.config.config_hash` without the seed), ``n``
    (trials), ``seeds`` (e.g. ``"0,1,2"``), for each of :data:`CELL_METRICS` ``<m>_mean``, ``<m>_std`` (sample
    std, NaN when n = 1), ``<m>_ci95_low``/``<m>_ci95_high`` (Student t), then ``test_hd95_mean_mean``,
    ``test_hd95_n_undefined_sum`` (cases without an HD95 over all the cell's trials; NaN when no trial logged the
    count, as runs from before NSD did not) and ``n_train_patients`` when the trials have it.
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
        for m in CELL_METRICS:
            stats_ = _mean_std_ci(group[m]) if m in group else (math.nan,) * 4
            row.update(zip((f"{m}_mean", f"{m}_std", f"{m}_ci95_low", f"{m}_ci95_high"), stats_, strict=True))
        for m in MEAN_ONLY_METRICS:
            row[f"{m}_mean"] = float(group[m].mean()) if m in group else math.nan
        for m in SUM_METRICS:
            row[f"{m}_sum"] = float(group[m].sum(min_count=1)) if m in group else math.nan
        for c in EXTRA_CELL_COLUMNS:
            if c in group:
                row[c] = float(group[c].median())
        rows.append(row)
    summary = pd.DataFrame(rows)
    summary = summary.sort_values("val_dice_mean", ascending=False, na_position="last", kind="stable")
    return _typed(summary.reset_index(drop=True))


# --------------------------------------------------------------------------------------------------- tables

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


def _pm(mean: Any, std: Any) -> str:
    return _fmt(mean) if pd.isna(std) else f"{_fmt(mean)} ± {_fmt(std)}"


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
    out["Dice mean ± std"] = [
        _pm(m, s) for m, s in zip(summary["test_dice_mean_mean"], summary["test_dice_mean_std"], strict=True)
    ]
    out["IoU mean ± std"] = [
        _pm(m, s) for m, s in zip(summary["test_iou_mean_mean"], summary["test_iou_mean_std"], strict=True)
    ]
    out["NSD mean ± std"] = [
        _pm(m, s) for m, s in zip(summary["test_nsd_mean_mean"], summary["test_nsd_mean_std"], strict=True)
    ]
    out["val Dice"] = summary["val_dice_mean"].map(_fmt)
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


# --------------------------------------------------------------------------------------------------- writing


def write_summary(summary: pd.DataFrame, trials: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Write ``summary.parquet``, ``summary.csv``, ``summary.md``, ``trials.csv`` and the few-shot plots.

    Each file is written atomically (temp file + ``os.replace``). Returns ``{name: path}`` with names
    ``summary_parquet``, ``summary_csv``, ``summary_md``, ``trials_csv`` and the plot file stems.
    """
    from lasegseg.results.plots import plot_all

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


def latest_sweep_run(client: Any, experiment_id: str) -> str | None:
    """The most recently started sweep (parent) run of the experiment, or None."""
    page = client.search_runs(
        [experiment_id],
        filter_string="tags.`lasegseg.role` = 'sweep'",
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    return page[0].info.run_id if page else None


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
                for name in ("test_dice_mean_mean", "val_dice_mean"):
                    if not pd.isna(best[name]):
                        client.log_metric(parent, f"best_{name.removesuffix('_mean')}", float(best[name]))
                client.set_tag(parent, "lasegseg.best_cell", best["cell"])
    return summary


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
