"""One Tune trial's MLflow child run: found again on a retry or resume, per-epoch metrics sent in the background.

Everything goes through ``MlflowClient`` with explicit run ids (no global active run), so concurrent trials in
one process or many never mix their runs. A retried or resumed trial finds **its own** run again (by the Tune
trial id tag, or the run id kept in its checkpoint) and logs only the epochs MLflow does not have yet.

Per-epoch metrics never wait for the store: they go to a :class:`~lasegseg.tracking.buffer.MetricBuffer` that a
background thread sends in order, retrying while the server is down or restarting. Each metric keeps the timestamp
it was taken at; the metrics table's primary key is (run, key, timestamp, step, value), and both SQL stores drop the
rows of a re-sent batch that already exist, so a batch whose first attempt did arrive is not stored twice.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, RunTag

from lasegseg import metric_table
from lasegseg.config import config_hash
from lasegseg.errors import LasegsegError, first_line
from lasegseg.tracking.buffer import MetricBuffer
from lasegseg.tracking.client import (
    MAX_WAIT_S,
    RETRY_ENV,
    client,
    default_retry_seconds,
    is_transient,
    own_http_retries,
    retry,
)
from lasegseg.tracking.store import CELL, CONFIG, ROLE, TRIAL_ID, log_params

log = logging.getLogger(__name__)

COUNTS = ("n_train_slices", "n_train_patients")
"""A trial's sizes, logged with its final metrics."""


def final_metrics(results: dict[str, Any]) -> dict[str, Any]:
    """The final values a trial logs, by MLflow name: its best epoch, the test metrics of the metric table, its
    sizes, and each validation value of the best epoch as ``best_<name>`` (the per-epoch series already use the
    names ``val_dice``/``val_iou``; the final ones get their own so that "latest value" readers, the UI's table
    and the aggregation, see the final result)."""
    names = ["best_epoch", *metric_table.trial_metrics(), *COUNTS]
    return {k: results.get(k) for k in names} | {f"best_{k}": results.get(k) for k in metric_table.selection_metrics()}


BATCH_LIMIT = 1000  # MLflow's log_batch accepts at most 1000 metrics per request
_UNKNOWN = object()


class TrialTracker:
    """The MLflow child run of one Tune trial.

    Args:
        tracking_uri: where to log.
        experiment_id, parent_run_id: the sweep's experiment and parent run.
        trial_id: Tune's trial id, stable across retries of the same trial.
        run_name: readable name derived from the config.
        flat: the trial's flat config (logged as params).
        stage: ``trial`` (the aggregated grid) or ``screen`` (learning-rate screening).
        buffer_path: JSON-lines file for metrics not yet in the store (kept across attempts of the trial);
            ``None`` buffers in memory only.
        retry_seconds: how long run creation and :meth:`finish` wait for an unreachable store (default
            ``$LASEGSEG_MLFLOW_RETRY_SECONDS``, else 300).
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
        buffer_path: Path | None = None,
        retry_seconds: float | None = None,
    ) -> None:
        own_http_retries(tracking_uri)
        self.tracking_uri = tracking_uri
        self.client = client(tracking_uri)
        self.experiment_id = experiment_id
        self.parent_run_id = parent_run_id
        self.trial_id = trial_id
        self.run_name = run_name
        self.flat = flat
        self.stage = stage
        self.retry_seconds = default_retry_seconds() if retry_seconds is None else float(retry_seconds)
        self.run_id: str | None = None
        self._finished: Any = _UNKNOWN  # the run's final metrics if it had finished when start() found it
        self.logged_steps: set[int] = set()  # in the store or queued for it
        self.buffer = MetricBuffer(buffer_path)
        self.stats = {"batches": 0, "metrics": 0, "failed_attempts": 0}
        self.error: BaseException | None = None  # a rejection by the store: the buffer cannot be sent
        self.last_failure = ""  # the latest transient fault, for reports
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None

    def start(self, known_run_id: str | None = None, attempt_tags: dict[str, Any] | None = None) -> str:
        """Continue this trial's run if it exists (retry/resume), else create it; waits for the store.

        Args:
            known_run_id: the run a checkpoint of this trial names.
            attempt_tags: tags of this attempt (where it runs); a retry on another node overwrites them with its own.
                A new run is created with them, and with its params in one more request.
        """
        c = self.client
        tags = {k: str(v) for k, v in (attempt_tags or {}).items()}
        run_id = known_run_id or retry(self._search_existing, "search runs", self.retry_seconds)
        created = run_id is None
        if created:
            run_id = retry(self._creator(tags), "create run", self.retry_seconds)
            self._finished = None
            log_params(c, run_id, self.flat, self.retry_seconds)
        else:
            run = retry(lambda: c.get_run(run_id), "get run", self.retry_seconds)
            done = run.info.status == "FINISHED" and metric_table.primary().test_mean in run.data.metrics
            self._finished = dict(run.data.metrics) if done else None
            if run.info.status != "FINISHED":
                retry(lambda: c.update_run(run_id, status="RUNNING"), "reopen run", self.retry_seconds)
            for key in metric_table.epoch_metrics():
                history = retry(lambda k=key: c.get_metric_history(run_id, k), "read history", self.retry_seconds)
                self.logged_steps.update(m.step for m in history)
        self.run_id = run_id
        if tags and not created:  # a new run was created with them
            self.tag_attempt(tags)
        # Epochs an earlier attempt queued but could not send: re-sent as they were (same timestamps).
        self.logged_steps.update(m.step for m in self.buffer.load(run_id))
        if len(self.buffer):
            self._kick()
        return run_id

    def tag_attempt(self, tags: dict[str, str]) -> None:
        """Tags of this attempt (where it ran); a retry on another node overwrites them with its own."""
        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        retry(lambda: self.client.log_batch(self.run_id, tags=batch), "set tags", self.retry_seconds)

    def finished_results(self) -> dict[str, float] | None:
        """The final metrics of this trial's run if it had already finished when :meth:`start` found it (a resumed
        sweep must not redo it); None for a run it created."""
        if self._finished is _UNKNOWN:
            run = retry(lambda: self.client.get_run(self.run_id), "get run", self.retry_seconds)
            done = run.info.status == "FINISHED" and metric_table.primary().test_mean in run.data.metrics
            self._finished = dict(run.data.metrics) if done else None
        return self._finished

    def _search_existing(self) -> str | None:
        """This trial's run: by Tune's trial id, else by its config within the sweep's stage.

        Tune restarts a trial whose last checkpoint it had deleted (a driver killed between two experiment
        snapshots) under a *new* trial id; the same config in the same sweep and stage is the same trial, so the
        restarted one continues its run (which then carries the new id) instead of leaving a second one.
        """
        parent = f"tags.`mlflow.parentRunId` = '{self.parent_run_id}'"
        query = f"tags.`{TRIAL_ID}` = '{self.trial_id}' and {parent}"
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=5)
        if runs:
            return runs[0].info.run_id
        query = f"tags.`{CONFIG}` = '{config_hash(self.flat)}' and tags.`{ROLE}` = '{self.stage}' and {parent}"
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=5)
        if not runs:
            return None
        self.client.set_tag(runs[0].info.run_id, TRIAL_ID, self.trial_id)
        return runs[0].info.run_id

    def _creator(self, attempt_tags: dict[str, str]) -> Callable[[], str]:
        """Attempts at creating this trial's run, for :func:`retry`, made right after a search that found none.

        Every attempt after the first searches again, so that a create whose answer was lost (the server died after
        it) is not repeated.
        """
        tags = {
            **attempt_tags,
            ROLE: self.stage,
            "mlflow.parentRunId": self.parent_run_id,
            TRIAL_ID: self.trial_id,
            CELL: config_hash(self.flat, exclude=("seed",)),
            CONFIG: config_hash(self.flat),
        }
        tried: list[bool] = []

        def create() -> str:
            if tried:
                found = self._search_existing()
                if found is not None:
                    return found
            tried.append(True)
            return self.client.create_run(self.experiment_id, run_name=self.run_name, tags=tags).info.run_id

        return create

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        """Queue the per-epoch metrics at step=epoch (each step once, even across retries); never waits."""
        if epoch in self.logged_steps:
            return
        now = int(time.time() * 1000)
        items = [
            Metric(k, float(metrics[k]), now, epoch)
            for k in metric_table.epoch_metrics()
            if k in metrics and math.isfinite(float(metrics[k]))
        ]
        self.buffer.extend(self.run_id, items)
        self.logged_steps.add(epoch)
        self._kick()

    def log_history(self, history: list[dict[str, Any]]) -> None:
        """Log the epochs a checkpoint knows about that MLflow lacks (e.g. lost in a crash)."""
        for row in history:
            self.log_epoch(int(row["epoch"]), row)

    def flush(self, seconds: float | None = None) -> None:
        """Wait until every queued metric is in the store.

        Raises:
            LasegsegError: the store stayed unreachable for ``seconds`` (default ``retry_seconds``), or it
                rejected a batch.
        """
        seconds = self.retry_seconds if seconds is None else seconds
        deadline = time.monotonic() + seconds
        self._kick()
        with self._wake:
            while len(self.buffer) and self.error is None and time.monotonic() < deadline:
                self._wake.wait(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
        if self.error is not None:
            raise LasegsegError(f"MLflow store {self.tracking_uri} rejected metrics: {first_line(self.error)}")
        if len(self.buffer):
            raise LasegsegError(
                f"MLflow store {self.tracking_uri} did not take the buffered metrics within {seconds:.0f} s "
                f"(unreachable or too slow); {len(self.buffer)} metrics of run {self.run_id} wait in "
                f"{self.buffer.path or 'memory'} (set {RETRY_ENV} to wait longer)"
            )

    def _kick(self) -> None:
        """Wake the sender thread, starting it on first use."""
        with self._wake:
            self._closing = False
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._send_loop, name=f"mlflow-{self.trial_id}", daemon=True)
                self._thread.start()
            self._wake.notify_all()

    def _send_loop(self) -> None:
        """Send the buffer's head in order; on a transient fault keep it and back off (training goes on)."""
        wait = 0.5
        while True:
            with self._wake:
                while not len(self.buffer) and not self._closing:
                    self._wake.wait()
                if self._closing and not len(self.buffer):
                    return
            batch = self.buffer.head(BATCH_LIMIT)
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:
                self.stats["failed_attempts"] += 1
                if not is_transient(exc):
                    log.error("MLflow rejected metrics of run %s: %s", self.run_id, first_line(exc))
                    with self._wake:
                        self.error = exc
                        self._wake.notify_all()
                    return
                self.last_failure = first_line(exc)
                log.warning("MLflow log metrics failed (%s); %d metrics buffered", self.last_failure, len(self.buffer))
                with self._wake:
                    if self._closing:
                        return
                    self._wake.wait(timeout=wait)
                wait = min(wait * 2, MAX_WAIT_S)
                continue
            self.buffer.drop(self.run_id, len(batch))
            self.stats["batches"] += 1
            self.stats["metrics"] += len(batch)
            wait = 0.5
            with self._wake:
                self._wake.notify_all()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the sender thread; what it could not send stays in the buffer file for the next attempt."""
        with self._wake:
            self._closing = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def finish(self, results: dict[str, Any], artifact_dir: Path | None = None) -> None:
        """Log the final metrics and artifacts and mark the run FINISHED, waiting (bounded) for the store."""
        now = int(time.time() * 1000)
        final = final_metrics(results)
        items = [
            Metric(k, float(v), now, 0)
            for k, v in final.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        deadline = time.monotonic() + self.retry_seconds
        self.buffer.extend(self.run_id, items, kind="final")
        self.flush()

        def left() -> float:
            return max(0.0, deadline - time.monotonic())

        if artifact_dir is not None:
            retry(lambda: self.client.log_artifacts(self.run_id, str(artifact_dir)), "log artifacts", left())
        retry(lambda: self.client.set_terminated(self.run_id, "FINISHED"), "finish run", left())
        self.close()

    def fail(self, message: str) -> None:
        self.close(timeout=1.0)
        if self.run_id is None:
            return
        try:
            self.client.set_tag(self.run_id, "lasegseg.error", message[-4000:])
            self.client.set_terminated(self.run_id, "FAILED")
        except Exception as exc:  # noqa: BLE001 - never hide the trial's own error behind a tracking one
            log.warning("could not mark run %s failed: %s", self.run_id, exc)
