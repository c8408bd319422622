"""MLflow glue: one experiment per sweep, a parent run per sweep, a child run per trial.

Everything goes through ``MlflowClient`` with explicit run ids (no global active run), so concurrent trials in
one process or many never mix their runs. A retried or resumed trial finds **its own** run again (by the Tune
trial id tag, or the run id kept in its checkpoint) and logs only the epochs MLflow does not have yet.

Per-epoch metrics never wait for the store: they go to a buffer (memory + a JSON-lines file) that a background
thread sends in order, retrying while the server is down or restarting. Each metric keeps the timestamp it was
taken at; the metrics table's primary key is (run, key, timestamp, step, value), and both SQL stores drop the
rows of a re-sent batch that already exist, so a batch whose first attempt did arrive is not stored twice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from lasegseg.errors import LasegsegError, first_line
from lasegseg.fsio import atomic_write, plain_file_mode
from lasegseg.retry import call_with_retries, env_seconds

log = logging.getLogger(__name__)
T = TypeVar("T")

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
ROLE = "lasegseg.role"
TRIAL_ID = "lasegseg.trial_id"
CELL = "lasegseg.cell"
CONFIG = "lasegseg.config"  # hash of the whole trial config, seed included: one trial of one sweep
EPOCH_METRICS = ("train_loss", "val_dice", "val_iou", "lr")
FINAL_METRICS = (
    "best_epoch", "test_dice_mean", "test_dice_std", "test_iou_mean", "test_iou_std", "test_nsd_mean",
    "test_nsd_std", "test_hd95_mean", "test_hd95_std", "test_hd95_n_undefined", "test_slice_dice_mean",
    "test_slice_dice_std", "n_train_slices", "n_train_patients",
)  # fmt: skip
RETRY_ENV = "LASEGSEG_MLFLOW_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 300.0
MAX_WAIT_S = 10.0
BATCH_LIMIT = 1000  # MLflow's log_batch accepts at most 1000 metrics per request
_UNKNOWN = object()


def default_retry_seconds() -> float:
    """How long a tracking call keeps retrying a transient fault (``$LASEGSEG_MLFLOW_RETRY_SECONDS``, 300 s)."""
    return env_seconds(RETRY_ENV, DEFAULT_RETRY_SECONDS)


def is_transient(exc: BaseException) -> bool:
    """A fault worth waiting out: the store is down, busy or restarting (not a request it rejected)."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        # Connection failures and timeouts arrive as INTERNAL_ERROR (500), a locked sqlite file as
        # TEMPORARILY_UNAVAILABLE (503); 4xx codes are answers that a retry would only repeat.
        status = exc.get_http_status_code()
        return status >= 500 or status == 429
    return isinstance(exc, (OSError, TimeoutError))


def retry(fn: Callable[[], T], what: str, seconds: float | None = None, first_wait: float = 0.5) -> T:
    """Call ``fn`` until it succeeds, backing off exponentially, for at most ``seconds`` (default
    :func:`default_retry_seconds`); errors that are not transient are raised at once."""
    budget = default_retry_seconds() if seconds is None else seconds
    return call_with_retries(fn, what, transient=is_transient, seconds=budget, first_wait=first_wait,
                             max_wait=MAX_WAIT_S, log=log, service="MLflow")  # fmt: skip


def own_http_retries(tracking_uri: str) -> None:
    """Let :func:`retry` alone decide how long to wait for an http(s) server.

    MLflow's own urllib3 retries would block one call for minutes when the server is down, and re-send POSTs
    such as create-run blindly; both layers together would also multiply the waits. Values the user set win.
    """
    if urlparse(tracking_uri).scheme in ("http", "https"):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def pending_path(experiment_id: str, trial_id: str) -> Path:
    """Where a trial's unsent metrics wait (``$LASEGSEG_CACHE`` or ``~/.cache/lasegseg``, under mlflow-pending).

    A node-local file that outlives the trial's process, and the sweep's, for the trial's next attempt. Not the
    Tune trial folder: Tune copies that to the sweep's storage, where a stale copy would look like lost metrics.
    """
    from lasegseg.paths import pending_metrics_dir

    return pending_metrics_dir() / f"{experiment_id}-{trial_id}.jsonl"


def client(tracking_uri: str, *, registry: bool = False):
    """The one way lasegseg talks to MLflow: a client bound to ``tracking_uri`` (and its model registry).

    Args:
        tracking_uri: the MLflow URI.
        registry: use the same store as the model registry (exports, ``models:/`` URIs).
    """
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri if registry else None)


def display_uri(tracking_uri: str) -> str:
    """``tracking_uri`` fit to print: a password written into it (``https://user:secret@host``) is masked."""
    parsed = urlparse(tracking_uri)
    if parsed.password is None:
        return tracking_uri
    netloc = f"{parsed.username}:***@{parsed.hostname}" + (f":{parsed.port}" if parsed.port else "")
    return parsed._replace(netloc=netloc).geturl()


def check_reachable(tracking_uri: str, timeout: float = 10.0, *, must_exist: bool = False) -> None:
    """Fail fast with one line when an http(s) tracking server does not answer.

    Args:
        tracking_uri: the MLflow URI.
        timeout: seconds to wait for the server's ``/health``.
        must_exist: for readers: a local sqlite file or store folder must already exist (MLflow would otherwise
            create an empty one at a mistyped path).
    """
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
            shown = display_uri(tracking_uri)
            raise LasegsegError(f"tracking URI {shown} answered HTTP {exc.code} on /health") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise LasegsegError(f"tracking URI {display_uri(tracking_uri)} is unreachable ({reason})") from None
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


def seed_sqlite_store(tracking_uri: str) -> bool:
    """Create a new local sqlite store as a copy of an empty, migrated one (≈ 0.05 s instead of ≈ 2 s).

    MLflow builds a new store by running its whole schema migration chain. The first sweep on a node does that
    once, in the cache folder (:func:`lasegseg.paths.sqlite_store_template`, one per MLflow version); every later
    store is a copy whose ``Default`` experiment points where a freshly made one would. Returns whether it copied;
    other URIs and existing files are left alone (MLflow then opens or creates them itself).
    """
    import sqlite3

    import mlflow

    from lasegseg.paths import sqlite_store_template

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
    c = client(tracking_uri)
    run = retry(lambda: c.create_run(experiment_id, run_name=name, tags={ROLE: "sweep", **tags}), "create sweep run")
    run_id = run.info.run_id
    log_params(c, run_id, params)
    return run_id


def log_params(c, run_id: str, params: dict[str, Any], seconds: float | None = None) -> None:
    from mlflow.entities import Param

    items = [Param(k, _param_str(v)) for k, v in params.items()]
    for start in range(0, len(items), 100):
        chunk = items[start : start + 100]
        retry(lambda chunk=chunk: c.log_batch(run_id, params=chunk), "log params", seconds)


def _param_str(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


class MetricBuffer:
    """Metrics waiting for the tracking store, in logging order, mirrored to a JSON-lines file.

    One line per logging call (one epoch, or the final results), so a line cut short by a killed process loses
    that whole call, never part of it. The next attempt of the trial reads the file back and re-sends the lines
    with their original timestamps.

    Args:
        path: the file; ``None`` keeps the buffer in memory only.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._items: list[tuple[str, Any]] = []  # (kind, Metric)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def load(self, run_id: str, kinds: tuple[str, ...] = ("epoch",)) -> list[Any]:
        """Read back the file's metrics of ``run_id`` and of the given kinds; other lines are dropped."""
        from mlflow.entities import Metric

        if self.path is None or not self.path.is_file():
            return []
        restored = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
                if row["run_id"] == run_id and row["kind"] in kinds:
                    kind = row["kind"]
                    restored += [(kind, Metric(k, float(v), int(ts), int(st))) for k, v, ts, st in row["metrics"]]
            except (ValueError, KeyError, TypeError):
                continue  # the last line of a killed process
        with self._lock:
            self._items = restored
            self._rewrite(run_id)
            return [m for _, m in self._items]

    def extend(self, run_id: str, metrics: list[Any], kind: str = "epoch") -> None:
        """Queue ``metrics`` (one logging call) behind everything already waiting."""
        if not metrics:
            return
        with self._lock:
            self._items.extend((kind, m) for m in metrics)
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as fh:
                    fh.write(_buffer_line(run_id, metrics, kind) + "\n")

    def head(self, n: int) -> list[Any]:
        with self._lock:
            return [m for _, m in self._items[:n]]

    def drop(self, run_id: str, n: int) -> None:
        """Forget the first ``n`` metrics: the store has them."""
        with self._lock:
            del self._items[:n]
            self._rewrite(run_id)

    def _rewrite(self, run_id: str) -> None:
        if self.path is None:
            return
        if not self._items:
            self.path.unlink(missing_ok=True)
            return
        lines, start = [], 0
        for i in range(1, len(self._items) + 1):  # one line per run of equal kinds, in order
            if i == len(self._items) or self._items[i][0] != self._items[start][0]:
                lines.append(_buffer_line(run_id, [m for _, m in self._items[start:i]], self._items[start][0]))
                start = i
        atomic_write(self.path, "".join(line + "\n" for line in lines))


def _buffer_line(run_id: str, metrics: list[Any], kind: str) -> str:
    rows = [[m.key, m.value, m.timestamp, m.step] for m in metrics]
    return json.dumps({"run_id": run_id, "kind": kind, "metrics": rows})


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
            done = run.info.status == "FINISHED" and "test_dice_mean" in run.data.metrics
            self._finished = dict(run.data.metrics) if done else None
            if run.info.status != "FINISHED":
                retry(lambda: c.update_run(run_id, status="RUNNING"), "reopen run", self.retry_seconds)
            for key in EPOCH_METRICS:
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
        from mlflow.entities import RunTag

        batch = [RunTag(k, str(v)) for k, v in tags.items()]
        retry(lambda: self.client.log_batch(self.run_id, tags=batch), "set tags", self.retry_seconds)

    def finished_results(self) -> dict[str, float] | None:
        """The final metrics of this trial's run if it had already finished when :meth:`start` found it (a resumed
        sweep must not redo it); None for a run it created."""
        if self._finished is _UNKNOWN:
            run = retry(lambda: self.client.get_run(self.run_id), "get run", self.retry_seconds)
            done = run.info.status == "FINISHED" and "test_dice_mean" in run.data.metrics
            self._finished = dict(run.data.metrics) if done else None
        return self._finished

    def _search_existing(self) -> str | None:
        """This trial's run: by Tune's trial id, else by its config within the sweep's stage.

        Tune restarts a trial whose last checkpoint it had deleted (a driver killed between two experiment
        snapshots) under a *new* trial id; the same config in the same sweep and stage is the same trial, so the
        restarted one continues its run (which then carries the new id) instead of leaving a second one.
        """
        from lasegseg.config import config_hash

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
        from lasegseg.config import config_hash

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
        from mlflow.entities import Metric

        if epoch in self.logged_steps:
            return
        now = int(time.time() * 1000)
        items = [
            Metric(k, float(metrics[k]), now, epoch)
            for k in EPOCH_METRICS
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


def tracking_env(tracking_uri: str) -> dict[str, str]:
    """Environment every worker needs to reach the same tracking server (credentials included)."""
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", RETRY_ENV):  # fmt: skip
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env
