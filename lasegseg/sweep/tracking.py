"""MLflow glue: one experiment per sweep, a parent run per sweep, a child run per trial.

Everything goes through ``MlflowClient`` with explicit run ids (no global active run), so concurrent trials in
one process or many never mix their runs. A retried or resumed trial finds **its own** run again (by the Tune
trial id tag, or the run id kept in its checkpoint) and logs only the epochs MLflow does not have yet.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from lasegseg.errors import LasegsegError

log = logging.getLogger(__name__)
T = TypeVar("T")

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
ROLE = "lasegseg.role"
TRIAL_ID = "lasegseg.trial_id"
CELL = "lasegseg.cell"
EPOCH_METRICS = ("train_loss", "val_dice", "val_iou", "lr")
FINAL_METRICS = (
    "best_epoch", "test_dice_mean", "test_dice_std", "test_iou_mean", "test_iou_std",
    "test_hd95_mean", "test_hd95_std", "test_slice_dice_mean", "test_slice_dice_std", "n_train_slices",
    "n_train_patients",
)  # fmt: skip


def retry(fn: Callable[[], T], what: str, attempts: int = 8, first_wait: float = 0.5) -> T:
    """Call ``fn`` with exponential back-off; a busy sqlite file or a restarting server is transient."""
    wait = first_wait
    for attempt in range(attempts):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types for transient faults
            if attempt == attempts - 1:
                raise
            log.warning("MLflow %s failed (%s); retrying in %.1fs", what, exc, wait)
            time.sleep(wait)
            wait = min(wait * 2, 10.0)
    raise AssertionError("unreachable")


def client(tracking_uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri)


def default_tracking_uri(sweep_dir: Path) -> str:
    """The embedded store: a sqlite database inside the sweep folder (safe for concurrent writers)."""
    return f"sqlite:///{(Path(sweep_dir) / 'mlflow.db').resolve()}"


def check_reachable(tracking_uri: str, timeout: float = 10.0, *, must_exist: bool = False) -> None:
    """Fail fast with one line when an http(s) tracking server does not answer.

    Args:
        tracking_uri: the MLflow URI.
        timeout: seconds to wait for the server's ``/health``.
        must_exist: for readers: a local sqlite file or store folder must already exist (MLflow would otherwise
            create an empty one at a mistyped path).
    """
    from urllib.parse import urlparse

    parsed = urlparse(tracking_uri)
    if parsed.scheme in ("http", "https"):
        import urllib.error
        import urllib.request

        url = tracking_uri.rstrip("/") + "/health"
        try:
            urllib.request.urlopen(url, timeout=timeout).read()  # noqa: S310 - the user's own tracking server
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                return  # reachable; credentials are checked by the first real call
            raise LasegsegError(f"tracking URI {tracking_uri} answered HTTP {exc.code} on /health") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise LasegsegError(f"tracking URI {tracking_uri} is unreachable ({reason})") from None
    elif not must_exist:
        return
    elif parsed.scheme == "sqlite":
        db = tracking_uri.removeprefix("sqlite:///")
        if db and db != ":memory:" and not Path(db).is_file():
            raise LasegsegError(f"no MLflow database at {tracking_uri} (file {db} does not exist)")
    elif parsed.scheme in ("", "file"):
        root = parsed.path if parsed.scheme == "file" else tracking_uri
        if not Path(root).is_dir():
            raise LasegsegError(f"no MLflow tracking folder at {tracking_uri}")


def ensure_experiment(tracking_uri: str, name: str, artifact_location: str | None = None) -> str:
    """The experiment id for ``name``, created (tagged as model development) if needed."""
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
    c = client(tracking_uri)
    run = retry(lambda: c.create_run(experiment_id, run_name=name, tags={ROLE: "sweep", **tags}), "create sweep run")
    run_id = run.info.run_id
    log_params(c, run_id, params)
    return run_id


def log_params(c, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_str(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):
        chunk = items[start : start + 100]
        retry(lambda chunk=chunk: c.log_batch(run_id, params=chunk), "log params")


def _param_str(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


class TrialTracker:
    """The MLflow child run of one Tune trial.

    Args:
        tracking_uri: where to log.
        experiment_id, parent_run_id: the sweep's experiment and parent run.
        trial_id: Tune's trial id, stable across retries of the same trial.
        run_name: readable name derived from the config.
        flat: the trial's flat config (logged as params).
        stage: ``trial`` (the aggregated grid) or ``screen`` (learning-rate screening).
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        trial_id: str,
        run_name: str,
        flat: dict[str, Any],
        stage: str = "trial",
    ) -> None:
        self.tracking_uri = tracking_uri
        self.client = client(tracking_uri)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.trial_id = trial_id
        self.run_name = run_name
        self.flat = flat
        self.stage = stage
        self.run_id: str | None = None
        self.logged_steps: set[int] = set()

    def start(self, known_run_id: str | None = None) -> str:
        """Continue this trial's run if it exists (retry/resume), else create it."""
        from lasegseg.config import config_hash

        c = self.client
        run_id = known_run_id or self._find_existing()
        if run_id is None:
            tags = {
                ROLE: self.stage,
                "mlflow.parentRunId": self.parent_run_id,
                TRIAL_ID: self.trial_id,
                CELL: config_hash(self.flat, exclude=("seed",)),
            }
            run = retry(lambda: c.create_run(self.experiment_id, run_name=self.run_name, tags=tags), "create run")
            run_id = run.info.run_id
            log_params(c, run_id, self.flat)
        else:
            run = retry(lambda: c.get_run(run_id), "get run")
            if run.info.status != "FINISHED":
                retry(lambda: c.update_run(run_id, status="RUNNING"), "reopen run")
            history = retry(lambda: c.get_metric_history(run_id, "train_loss"), "read metric history")
            self.logged_steps = {m.step for m in history}
        self.run_id = run_id
        return run_id

    def finished_results(self) -> dict[str, float] | None:
        """The final metrics of this trial's run if it already finished (a resumed sweep must not redo it)."""
        run = retry(lambda: self.client.get_run(self.run_id), "get run")
        if run.info.status == "FINISHED" and "test_dice_mean" in run.data.metrics:
            return dict(run.data.metrics)
        return None

    def _find_existing(self) -> str | None:
        query = f"tags.`{TRIAL_ID}` = '{self.trial_id}' and tags.`mlflow.parentRunId` = '{self.parent_run_id}'"
        runs = retry(
            lambda: self.client.search_runs([self.experiment_id], filter_string=query, max_results=5), "search runs"
        )
        return runs[0].info.run_id if runs else None

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Per-epoch metrics at step=epoch, each step once even across retries."""
        from mlflow.entities import Metric

        if epoch in self.logged_steps:
            return
        now = int(time.time() * 1000)
        items = [
            Metric(k, float(metrics[k]), now, epoch)
            for k in EPOCH_METRICS
            if k in metrics and math.isfinite(float(metrics[k]))
        ]
        retry(lambda: self.client.log_batch(self.run_id, metrics=items), "log metrics")
        self.logged_steps.add(epoch)

    def log_history(self, history: list[dict[str, Any]]) -> None:
        """Log the epochs a checkpoint knows about that MLflow lacks (e.g. lost in a crash)."""
        for row in history:
            self.log_epoch(int(row["epoch"]), row)

    def finish(self, results: dict[str, Any], artifact_dir: Path | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # The per-epoch series already use the names val_dice/val_iou; the best epoch's values get their own
        # names so that "latest value" readers (the UI's table, aggregation) see the final result.
        final = {**{k: results.get(k) for k in FINAL_METRICS}, "best_val_dice": results.get("val_dice"),
                 "best_val_iou": results.get("val_iou")}  # fmt: skip
        items = [
            Metric(k, float(v), now, 0)
            for k, v in final.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        retry(lambda: self.client.log_batch(self.run_id, metrics=items), "log final metrics")
        if artifact_dir is not None:
            retry(lambda: self.client.log_artifacts(self.run_id, str(artifact_dir)), "log artifacts")
        retry(lambda: self.client.set_terminated(self.run_id, "FINISHED"), "finish run")

    def fail(self, message: str) -> None:
        if self.run_id is None:
            return
        try:
            self.client.set_tag(self.run_id, "lasegseg.error", message[-4000:])
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception as exc:  # noqa: BLE001 - never hide the trial's own error behind a tracking one
            log.warning("could not mark run %s failed: %s", self.run_id, exc)


def tracking_env(tracking_uri: str) -> dict[str, str]:
    """Environment every worker needs to reach the same tracking server (credentials included)."""
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY"):  # fmt: skip
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env
