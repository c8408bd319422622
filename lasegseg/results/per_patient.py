"""Per-patient test metrics of a sweep's trials: each finished run's ``per_patient.csv`` artifact, read on a small
thread pool, and the patients × cells matrix of one metric with the seeds averaged within each patient.

Once read, a sweep's rows are kept as one table on its parent run (``summary/per_patient.parquet``, one row per run
and patient): the report, a later comparison or another metric then reads one artifact instead of one per run (a
1,400-trial study's per-run downloads are 1,400 requests to the tracking server and the bucket behind it). Runs the
table does not hold (finished after it was written, e.g. by a resumed sweep) are still read one by one.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lasegseg.errors import LasegsegError, first_line
from lasegseg.fsio import atomic_write
from lasegseg.results.trials import search_all, trial_filter

PER_PATIENT_FILE = "per_patient.csv"
PER_PATIENT_TABLE = "per_patient.parquet"  # every run's rows, on the parent run under summary/
_WORKERS = 8
_NON_METRIC_COLUMNS = ("case_id", "split")


def artifact_uris(client: Any, experiment_id: str, parent_run_id: str | None) -> dict[str, str]:
    """``{run_id: artifact root URI}`` of the experiment's FINISHED trial runs (of one parent run when given)."""
    runs = search_all(client, experiment_id, trial_filter(parent_run_id))
    return {r.info.run_id: r.info.artifact_uri for r in runs if r.info.status == "FINISHED"}


def _read_one(tracking_uri: str, run_id: str, artifact_uri: str, tmp: Path) -> pd.DataFrame:
    import mlflow.artifacts  # deferred: heavy (MLflow, ~1 s: the statistics need none of it)

    # The artifact URI comes with the search's answer: downloading by URI saves one get_run round trip per run.
    uri = f"{artifact_uri.rstrip('/')}/{PER_PATIENT_FILE}"
    local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp / run_id), tracking_uri=tracking_uri)
    return pd.read_csv(local, dtype={"case_id": str, "split": str})


def download_per_patient(
    tracking_uri: str, artifact_uris: dict[str, str], workers: int = _WORKERS
) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Fetch every run's ``per_patient.csv`` on a small thread pool.

    Args:
        tracking_uri: the MLflow URI (resolves ``mlflow-artifacts:`` URIs).
        artifact_uris: ``{run_id: artifact root URI}``.
        workers: downloads at once.

    Returns:
        ``({run_id: table}, {run_id: why it was skipped})`` for the runs whose file could not be read.
    """
    from mlflow.exceptions import MlflowException  # deferred: heavy (MLflow, ~1 s)

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    tables: dict[str, pd.DataFrame] = {}
    missing: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="lasegseg-compare-") as tmp:
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(artifact_uris)))) as pool:
            futures = {
                run_id: pool.submit(_read_one, tracking_uri, run_id, uri, Path(tmp))
                for run_id, uri in artifact_uris.items()
            }
            for run_id, future in futures.items():
                try:
                    tables[run_id] = future.result()
                except (MlflowException, OSError, ValueError) as exc:  # absent, unreadable or not a CSV
                    missing[run_id] = first_line(exc)
    return tables, missing


def fetch_tables(
    tracking_uri: str, artifact_uris: dict[str, str], parent_run_id: str | None
) -> tuple[dict[str, pd.DataFrame], dict[str, str], int]:
    """Every run's per-patient table: from the parent run's ``summary/per_patient.parquet`` where it holds the run,
    else the run's own ``per_patient.csv``.

    Returns:
        ``(tables, missing, read one by one)``: as :func:`download_per_patient`, and how many runs were not in the
        parent's table.
    """
    tables = _parent_tables(tracking_uri, parent_run_id, set(artifact_uris)) if parent_run_id else {}
    rest = {r: u for r, u in artifact_uris.items() if r not in tables}
    fetched, missing = download_per_patient(tracking_uri, rest) if rest else ({}, {})
    return {**tables, **fetched}, missing, len(fetched)


def _parent_tables(tracking_uri: str, parent_run_id: str, run_ids: set[str]) -> dict[str, pd.DataFrame]:
    """The parent run's saved rows of ``run_ids`` ({} when it has no table yet or it cannot be read)."""
    # deferred: heavy (MLflow, ~1 s: the statistics need none of it)
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:  # listed first: a missing key behind an S3-proxying server answers 500, which MLflow retries for minutes
        listed = MlflowClient(tracking_uri).list_artifacts(parent_run_id, "summary")
    except (MlflowException, OSError):
        return {}
    if f"summary/{PER_PATIENT_TABLE}" not in {a.path for a in listed}:
        return {}
    with tempfile.TemporaryDirectory(prefix="lasegseg-compare-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=parent_run_id, artifact_path=f"summary/{PER_PATIENT_TABLE}", dst_path=tmp,
                tracking_uri=tracking_uri,
            )  # fmt: skip
            long = pd.read_parquet(local)
        except (MlflowException, OSError, ValueError):
            return {}
    if "run_id" not in long.columns:
        return {}
    long = long[long["run_id"].isin(run_ids)]
    return {
        run_id: rows.drop(columns="run_id").dropna(axis=1, how="all").reset_index(drop=True)
        for run_id, rows in long.groupby("run_id", sort=False)
    }


def write_table(tables: dict[str, pd.DataFrame], out_dir: str | Path) -> Path:
    """Every run's per-patient rows as one table (``per_patient.parquet``: ``run_id`` then the CSV's columns)."""
    frames = [t.assign(run_id=run_id) for run_id, t in tables.items()]
    long = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame({"run_id": []})
    long = long[["run_id", *[c for c in long.columns if c != "run_id"]]]
    return atomic_write(Path(out_dir) / PER_PATIENT_TABLE, lambda p: long.to_parquet(p, index=False))


def patient_matrix(
    trials: pd.DataFrame, tables: dict[str, pd.DataFrame], metric: str, split: str = "test"
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Patients × cells of ``metric`` on ``split``, each value the mean over the cell's seeds for that patient.

    Non-finite values (an HD95 of an empty prediction) are left out of the mean; a patient with none in a cell is
    NaN there. Runs whose table lacks ``metric`` are skipped (counted in the second return value).

    Args:
        trials: :func:`lasegseg.results.aggregate.load_trials` rows (``run_id``, ``cell``).
        tables: ``{run_id: per_patient table}``.
        metric: a column of the tables.
        split: the rows kept (the tables hold only the test split today).

    Returns:
        ``(matrix, counts)`` with counts ``without_metric`` (runs) and ``non_finite`` (values dropped).

    Raises:
        LasegsegError: no table has the metric column (runs from before it existed), or none has a row of ``split``.
    """
    with_metric = {r: t for r, t in tables.items() if metric in t.columns}
    if not with_metric:
        columns = sorted({c for t in tables.values() for c in t.columns if c not in _NON_METRIC_COLUMNS})
        raise LasegsegError(
            f"{PER_PATIENT_FILE} of the {len(tables)} trial run(s) has no '{metric}' column (runs from before "
            f"{metric} was recorded?); metrics available: {', '.join(columns) or 'none'}"
        )
    cells = trials.set_index("run_id")["cell"]
    frames = []
    for run_id, table in with_metric.items():
        rows = table[table["split"] == split] if "split" in table.columns else table
        frames.append(pd.DataFrame({"cell": cells.get(run_id), "case_id": rows["case_id"], "value": rows[metric]}))
    long = pd.concat(frames, ignore_index=True).dropna(subset=["cell"])
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    finite = np.isfinite(long["value"].to_numpy(float))
    counts = {"without_metric": len(tables) - len(with_metric), "non_finite": int((~finite).sum())}
    long = long[finite]
    if long.empty:
        raise LasegsegError(f"no finite '{metric}' value on the {split} split in {len(with_metric)} trial run(s)")
    matrix = long.groupby(["case_id", "cell"])["value"].mean().unstack("cell")
    return matrix, counts


# --------------------------------------------------------------------------------------------------- reference
