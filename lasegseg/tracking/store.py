"""The sweep's side of the MLflow store: a new local sqlite store, the experiment, the sweep's parent run and the tags
that find a trial's run again.

mlflow is imported by the functions that call it (see :mod:`lasegseg.tracking.client`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lasegseg.errors import LasegsegError
from lasegseg.fsio import atomic_write, plain_file_mode
from lasegseg.paths import sqlite_store_template
from lasegseg.tracking.client import client, retry

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
ROLE = "lasegseg.role"
TRIAL_ID = "lasegseg.trial_id"
CELL = "lasegseg.cell"
CONFIG = "lasegseg.config"  # hash of the whole trial config, seed included: one trial of one sweep
PARAM_BATCH = 100
PARAM_CHARS = 6000  # MLflow's longest parameter value


def seed_sqlite_store(tracking_uri: str) -> bool:
    """Create a new local sqlite store as a copy of an empty, migrated one (≈ 0.05 s instead of ≈ 2 s).

    MLflow builds a new store by running its whole schema migration chain. The first sweep on a node does that
    once, in the cache folder (:func:`lasegseg.paths.sqlite_store_template`, one per MLflow version); every later
    store is a copy whose ``Default`` experiment points where a freshly made one would. Returns whether it copied;
    other URIs and existing files are left alone (MLflow then opens or creates them itself).
    """
    import mlflow  # deferred: heavy (mlflow, ~2 s)

    if urlparse(tracking_uri).scheme != "sqlite" or not tracking_uri.startswith("sqlite:///"):
        return False
    target = Path(tracking_uri.removeprefix("sqlite:///"))
    if not target.name or target.exists():
        return False
    template = sqlite_store_template(mlflow.__version__)
    if not template.is_file():
        template.parent.mkdir(parents=True, exist_ok=True)
        staging = template.with_name(f".{template.name}.{os.getpid()}.tmp")
        staging.unlink(missing_ok=True)
        client(f"sqlite:///{staging}").search_experiments(max_results=1)  # runs the migrations
        os.replace(staging, template)

    def copy(tmp: Path) -> None:
        shutil.copyfile(template, tmp)
        with contextlib.closing(sqlite3.connect(tmp)) as db, db:
            db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                       (str(Path.cwd() / "mlruns" / "0"),))  # fmt: skip

    atomic_write(target, copy, mode=plain_file_mode(), exclusive=True)  # a concurrent creator's store stays
    return True


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """The experiment id for ``name``, created (tagged as model development) if needed."""
    seed_sqlite_store(tracking_uri)
    c = client(tracking_uri)
    exp = retry(lambda: c.get_experiment_by_name(name), "get experiment")
    if exp is None:
        try:
            exp_id = c.create_experiment(name, artifact_location=artifact_location)
        except Exception:  # a concurrent driver may have created it meanwhile
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    else:
        if exp.lifecycle_stage == "deleted":
            raise LasegsegError(f"experiment '{name}' is deleted in {tracking_uri}; restore it or pick another name")
        exp_id = exp.experiment_id
    retry(lambda: c.set_experiment_tag(exp_id, *EXPERIMENT_KIND), "tag experiment")
    return exp_id


def start_parent(tracking_uri: str, experiment_id: str, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
    """Create the sweep's parent run (role ``sweep``) with its params; returns its run id."""
    c = client(tracking_uri)
    run = retry(lambda: c.create_run(experiment_id, run_name=name, tags={ROLE: "sweep", **tags}), "create sweep run")
    run_id = run.info.run_id
    log_params(c, run_id, params)
    return run_id


def log_params(c, run_id: str, params: dict[str, Any], seconds: float | None = None) -> None:
    """Log a flat dict as the run's params, 100 per request; values longer than MLflow allows are cut short."""
    from mlflow.entities import Param  # deferred: heavy (mlflow, ~2 s)

    items = [Param(k, _param_str(v)) for k, v in params.items()]
    for start in range(0, len(items), PARAM_BATCH):
        chunk = items[start : start + PARAM_BATCH]
        retry(lambda chunk=chunk: c.log_batch(run_id, params=chunk), "log params", seconds)


def _param_str(value: Any) -> str:
    text = str(value)
    return text if len(text) <= PARAM_CHARS else text[: PARAM_CHARS - 3] + "..."
