"""MLflow glue without Ray, against a real sqlite store: retries, the trial's child run, resume, reachability.

The outage cases (a store that goes down, lost answers, rejected batches) live in ``tests/faults``; here the store
answers, and these tests pin what ends up in it.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2 as codes
from mlflow.tracking import MlflowClient

from lasegseg.config import Config, config_hash
from lasegseg.errors import ConfigError, LasegsegError
from lasegseg.tracking.tracker import (
    EPOCH_METRICS,
    RETRY_ENV,
    MetricBuffer,
    TrialTracker,
    check_reachable,
    default_retry_seconds,
    ensure_experiment,
    is_transient,
    own_http_retries,
    pending_path,
    retry,
    start_parent,
    tracking_env,
)

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite database for the module (creating its tables takes seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture
def sweep(store, tmp_path):
    """A fresh experiment (artifacts under tmp_path) with its sweep parent run."""
    exp = ensure_experiment(store, f"tracking-{tmp_path.name}", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = start_parent(store, exp, "sweep", {"sweep.name": "demo"}, {"lasegseg.sweep": "demo"})
    return SimpleNamespace(uri=store, exp=exp, parent=parent, client=MlflowClient(store))


def _flat(**extra) -> dict:
    return {**Config().replace(**{"model.backbone": "tiny", "optim.lr": 3e-4}).to_flat(), **extra}


def _tracker(sweep, trial_id: str = "t0", *, flat: dict | None = None, buffer: Path | None = None, parent=None):
    return TrialTracker(
        sweep.uri, sweep.exp, parent or sweep.parent, trial_id, f"run-{trial_id}", flat or _flat(),
        buffer_path=buffer, retry_seconds=20,
    )  # fmt: skip


def _epoch(e: int, scale: float = 1.0) -> dict[str, float]:
    return {"train_loss": scale / (e + 1), "val_dice": 0.1 * e, "val_iou": 0.05 * e, "lr": 1e-3, "epoch_seconds": 2.0}


def _history(sweep, run_id: str, key: str) -> dict[int, float]:
    """step → value; fails on a step stored twice."""
    rows = sweep.client.get_metric_history(run_id, key)
    steps = [m.step for m in rows]
    assert len(steps) == len(set(steps)), f"{key}: a step was logged twice: {sorted(steps)}"
    return {m.step: m.value for m in rows}


# ------------------------------------------------------------------------------------------------ transient faults


@pytest.mark.parametrize(
    "exc,transient",
    [
        (MlflowException("API request failed with exception Connection refused"), True),  # INTERNAL_ERROR, 500
        (MlflowException("database is locked", error_code=codes.TEMPORARILY_UNAVAILABLE), True),
        (MlflowException("slow down", error_code=codes.REQUEST_LIMIT_EXCEEDED), True),
        (MlflowException("bad metric", error_code=codes.INVALID_PARAMETER_VALUE), False),
        (MlflowException("no such run", error_code=codes.RESOURCE_DOES_NOT_EXIST), False),
        (MlflowException("who are you", error_code=codes.PERMISSION_DENIED), False),
        (ConnectionRefusedError("refused"), True),
        (TimeoutError("timed out"), True),
        (OSError("network is unreachable"), True),
        (ValueError("a bug"), False),
        (KeyError("a bug"), False),
    ],
)
def test_only_faults_of_an_unavailable_store_are_transient(exc, transient):
    assert is_transient(exc) is transient


class Failing:
    """A call that raises the given exceptions in turn, then returns ``"ok"``."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def test_retry_waits_out_transient_faults_with_growing_waits(caplog):
    fn = Failing(MlflowException("Connection refused\nTraceback: noise"), ConnectionResetError("reset"))
    with caplog.at_level(logging.WARNING, logger="lasegseg.tracking.tracker"):
        assert retry(fn, "create run", seconds=10, first_wait=0.01) == "ok"
    assert fn.calls == 3
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "MLflow create run failed (Connection refused); retrying in 0.0s",
        "MLflow create run failed (reset); retrying in 0.0s",
    ]
    assert [r.args[-1] for r in caplog.records] == [0.01, 0.02]


@pytest.mark.parametrize("error", [MlflowException.invalid_parameter_value("bad"), ValueError("bug")])
def test_retry_raises_a_non_transient_error_at_once(error):
    fn = Failing(error, error)
    t0 = time.perf_counter()
    with pytest.raises(type(error)) as raised:
        retry(fn, "log params", seconds=30, first_wait=1.0)
    assert raised.value is error and fn.calls == 1 and time.perf_counter() - t0 < 0.5


def test_retry_gives_up_before_its_deadline_with_the_last_error():
    errors = [MlflowException(f"Connection refused #{i}") for i in range(10)]
    fn = Failing(*errors)
    t0 = time.perf_counter()
    with pytest.raises(MlflowException, match="#3"):
        retry(fn, "search runs", seconds=1.0, first_wait=0.1)  # waits 0.1, 0.2, 0.4; the next 0.8 would pass 1 s
    elapsed = time.perf_counter() - t0
    assert fn.calls == 4 and 0.7 <= elapsed < 1.5


def test_retry_without_seconds_follows_the_environment(monkeypatch):
    monkeypatch.setenv(RETRY_ENV, "0")
    fn = Failing(TimeoutError("timed out"))
    with pytest.raises(TimeoutError):
        retry(fn, "get run", first_wait=0.01)
    assert fn.calls == 1


@pytest.mark.parametrize("text,seconds", [(None, 300.0), ("", 300.0), ("12.5", 12.5), (" 0 ", 0.0)])
def test_retry_seconds_default_and_override(monkeypatch, text, seconds):
    if text is None:
        monkeypatch.delenv(RETRY_ENV, raising=False)
    else:
        monkeypatch.setenv(RETRY_ENV, text)
    assert default_retry_seconds() == seconds


@pytest.mark.parametrize("text,needle", [("soon", "must be a number"), ("-1", "must be >= 0"), ("nan", ">= 0")])
def test_a_bad_retry_seconds_value_is_a_config_error(monkeypatch, text, needle):
    monkeypatch.setenv(RETRY_ENV, text)
    with pytest.raises(ConfigError, match=needle) as err:
        default_retry_seconds()
    assert RETRY_ENV in str(err.value) and text in str(err.value)


# ------------------------------------------------------------------------------------------------ experiment


def test_a_new_sqlite_store_is_a_copy_of_a_migrated_template_and_behaves_as_a_fresh_one(tmp_path, monkeypatch):
    import sqlite3

    import mlflow

    from lasegseg.paths import sqlite_store_template
    from lasegseg.tracking.tracker import seed_sqlite_store

    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    fresh = tmp_path / "fresh.db"
    MlflowClient(f"sqlite:///{fresh}").search_experiments()  # as MLflow makes it, for comparison
    template = sqlite_store_template(mlflow.__version__)
    first, second = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db"
    assert seed_sqlite_store(f"sqlite:///{first}") and template.is_file()
    made = template.stat().st_mtime_ns
    assert seed_sqlite_store(f"sqlite:///{second}") and template.stat().st_mtime_ns == made  # migrated once

    def rows(db: Path, sql: str) -> list:
        with sqlite3.connect(db) as conn:
            return conn.execute(sql).fetchall()

    for db in (first, second):
        assert rows(db, "SELECT * FROM alembic_version") == rows(fresh, "SELECT * FROM alembic_version")
        assert rows(db, "SELECT experiment_id, name, artifact_location FROM experiments") == rows(
            fresh, "SELECT experiment_id, name, artifact_location FROM experiments"
        )
    exp = ensure_experiment(f"sqlite:///{first}", "copied", artifact_location=(tmp_path / "art").as_uri())
    run = start_parent(f"sqlite:///{first}", exp, "sweep", {"a": 1}, {})
    assert MlflowClient(f"sqlite:///{first}").get_run(run).data.params == {"a": "1"}
    assert not seed_sqlite_store(f"sqlite:///{first}")  # an existing store is left alone
    assert not seed_sqlite_store("http://127.0.0.1:5000") and not seed_sqlite_store(str(tmp_path / "mlruns"))


def test_experiment_is_created_once_and_tagged_as_model_development(store, tmp_path):
    name = f"kind-{tmp_path.name}"
    exp_id = ensure_experiment(store, name, artifact_location=(tmp_path / "a").as_uri())
    assert ensure_experiment(store, name) == exp_id
    exp = MlflowClient(store).get_experiment(exp_id)
    assert exp.name == name and exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert exp.artifact_location == (tmp_path / "a").as_uri()


def test_an_experiment_created_elsewhere_gets_the_tag(store, tmp_path):
    client = MlflowClient(store)
    exp_id = client.create_experiment(f"foreign-{tmp_path.name}", artifact_location=(tmp_path / "a").as_uri())
    assert "mlflow.experimentKind" not in client.get_experiment(exp_id).tags
    assert ensure_experiment(store, f"foreign-{tmp_path.name}") == exp_id
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_deleted_experiment_is_refused_by_name(store, tmp_path):
    name = f"gone-{tmp_path.name}"
    client = MlflowClient(store)
    client.delete_experiment(client.create_experiment(name, artifact_location=(tmp_path / "a").as_uri()))
    with pytest.raises(LasegsegError, match=f"experiment '{name}' is deleted in {store}"):
        ensure_experiment(store, name)


# ------------------------------------------------------------------------------------------------ trial runs


def test_a_trial_logs_one_child_run_with_params_epochs_and_final_metrics_once(sweep, tmp_path):
    flat = _flat(**{"note": "x" * 7000})  # longer than MLflow's 6000-character parameter limit
    buffer = tmp_path / "pending.jsonl"
    tracker = _tracker(sweep, flat=flat, buffer=buffer)
    run_id = tracker.start()
    for e in range(3):
        metrics = _epoch(e)
        if e == 1:
            metrics["val_iou"] = float("nan")  # a non-finite value is skipped, not stored
        tracker.log_epoch(e, metrics)
    tracker.log_epoch(1, _epoch(1, scale=9.0))  # the same epoch again: ignored
    artifacts = tmp_path / "out"
    artifacts.mkdir()
    (artifacts / "metrics.json").write_text("{}")
    results = {"val_dice": 0.8, "val_iou": 0.7, "test_dice_mean": 0.75, "best_epoch": 2, "test_hd95_mean": float("nan")}
    tracker.finish(results, artifact_dir=artifacts)

    run = sweep.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-t0"
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == sweep.parent and tags["lasegseg.trial_id"] == "t0"
    assert tags["lasegseg.role"] == "trial" and tags["lasegseg.cell"] == config_hash(flat, exclude=("seed",))
    params = run.data.params
    assert set(params) == set(flat) and params["optim.lr"] == "0.0003" and params["model.backbone"] == "tiny"
    assert len(params["note"]) == 6000 and params["note"].endswith("...")
    assert _history(sweep, run_id, "train_loss") == {0: 1.0, 1: 0.5, 2: pytest.approx(1 / 3)}
    for key in ("val_dice", "lr"):
        assert sorted(_history(sweep, run_id, key)) == [0, 1, 2]
    assert sorted(_history(sweep, run_id, "val_iou")) == [0, 2]
    final = {k: v for k, v in run.data.metrics.items() if k not in EPOCH_METRICS}
    assert final == {"best_val_dice": 0.8, "best_val_iou": 0.7, "test_dice_mean": 0.75, "best_epoch": 2.0}
    assert tracker.stats["metrics"] == 11 + 4  # every metric sent exactly once
    assert [a.path for a in sweep.client.list_artifacts(run_id)] == ["metrics.json"]
    assert not buffer.exists()  # nothing left waiting
    (other,) = [r for r in sweep.client.search_runs([sweep.exp]) if r.info.run_id != run_id]
    assert other.info.run_id == sweep.parent and other.data.params == {"sweep.name": "demo"}


def test_a_retried_trial_continues_its_own_run_without_relogging_epochs(sweep, tmp_path):
    first = _tracker(sweep, buffer=tmp_path / "a.jsonl")
    run_id = first.start()
    first.log_history([{"epoch": e, **_epoch(e)} for e in range(2)])
    first.flush(seconds=20)
    first.fail("RuntimeError: worker died")
    run = sweep.client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["lasegseg.error"] == "RuntimeError: worker died"

    second = _tracker(sweep, buffer=tmp_path / "b.jsonl")  # a new attempt: same trial id, no run id to go on
    assert second.start() == run_id
    assert sweep.client.get_run(run_id).info.status == "RUNNING"
    assert second.logged_steps == {0, 1} and second.finished_results() is None
    second.log_history([{"epoch": e, **_epoch(e, scale=5.0)} for e in range(4)])  # its checkpoint knows 0..3
    second.finish({"val_dice": 0.3, "test_dice_mean": 0.25})
    assert _history(sweep, run_id, "train_loss") == {0: 1.0, 1: 0.5, 2: 5.0 / 3, 3: 1.25}  # 0, 1 from attempt 1
    assert second.stats["metrics"] == 2 * 4 + 2

    third = _tracker(sweep)  # a resumed sweep meets the finished run: it is not reopened
    assert third.start() == run_id
    finished = third.finished_results()
    assert finished == sweep.client.get_run(run_id).data.metrics and finished["test_dice_mean"] == 0.25
    assert sweep.client.get_run(run_id).info.status == "FINISHED"
    third.close()
    trials = sweep.client.search_runs([sweep.exp], filter_string="tags.`lasegseg.role` = 'trial'")
    assert [r.info.run_id for r in trials] == [run_id]


def test_other_trials_and_other_sweeps_get_runs_of_their_own(sweep):
    a = _tracker(sweep, "t0").start()
    b = _tracker(sweep, "t1", flat=_flat(seed=1)).start()
    other_parent = start_parent(sweep.uri, sweep.exp, "sweep-2", {}, {})
    c = _tracker(sweep, "t0", parent=other_parent).start()
    assert len({a, b, c}) == 3
    assert sweep.client.get_run(c).data.tags["mlflow.parentRunId"] == other_parent
    assert _tracker(sweep, "t1", flat=_flat(seed=1)).start() == b


def test_a_trial_restarted_under_a_new_trial_id_continues_its_run(sweep, tmp_path):
    """Tune restarts a trial whose checkpoint it lost with a fresh trial id: its config finds its run."""
    first = _tracker(sweep, "old_00000")
    run_id = first.start()
    first.log_history([{"epoch": e, **_epoch(e)} for e in range(2)])
    first.close()
    restarted = _tracker(sweep, "new_00000")
    assert restarted.start() == run_id and restarted.logged_steps == {0, 1}  # epochs 0, 1 are not logged again
    assert sweep.client.get_run(run_id).data.tags["lasegseg.trial_id"] == "new_00000"
    assert _tracker(sweep, "new_00000").start() == run_id  # later attempts find it by the new id
    restarted.close()
    assert _tracker(sweep, "new_00001", flat=_flat(seed=1)).start() != run_id  # another config: another trial
    screen = TrialTracker(sweep.uri, sweep.exp, sweep.parent, "new_00002", "screen", _flat(), stage="screen",
                          retry_seconds=20)  # fmt: skip
    assert screen.start() != run_id  # another stage's trial with the same config is another run
    screen.close()
    trials = sweep.client.search_runs([sweep.exp], filter_string="tags.`lasegseg.role` = 'trial'")
    assert len(trials) == 2


def test_a_new_trials_run_takes_four_requests_with_its_attempt_tags_and_params(sweep):
    """Its bookkeeping before the first epoch: search by trial id and by config, create with every tag, log params."""
    tracker = _tracker(sweep, "fresh")
    calls: list[str] = []
    real = tracker.client

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    tracker.client = Counting()
    run_id = tracker.start(attempt_tags={"lasegseg.node_ip": "127.0.0.1", "lasegseg.device": "cpu"})
    assert tracker.finished_results() is None  # created just now: nothing to ask
    assert calls == ["search_runs", "search_runs", "create_run", "log_batch"]
    run = sweep.client.get_run(run_id)
    assert run.data.tags["lasegseg.node_ip"] == "127.0.0.1" and run.data.tags["lasegseg.trial_id"] == "fresh"
    assert run.data.params["model.backbone"] == "tiny" and len(run.data.params) == len(_flat())
    calls.clear()
    again = _tracker(sweep, "fresh")  # a retry on another node: same run, its own attempt tags
    again.client = Counting()
    assert again.start(attempt_tags={"lasegseg.node_ip": "10.0.0.7"}) == run_id
    assert again.finished_results() is None and "get_run" in calls and calls.count("get_run") == 1
    assert sweep.client.get_run(run_id).data.tags["lasegseg.node_ip"] == "10.0.0.7"
    tracker.close()
    again.close()


def test_a_known_run_id_is_used_without_searching(sweep):
    run_id = _tracker(sweep, "t0").start()
    tracker = _tracker(sweep, "renamed-by-tune")
    assert tracker.start(known_run_id=run_id) == run_id
    assert len(sweep.client.search_runs([sweep.exp], filter_string="tags.`lasegseg.role` = 'trial'")) == 1


def test_the_metric_buffer_file_keeps_one_line_per_call_of_its_own_run(tmp_path):
    path = tmp_path / "deep" / "pending.jsonl"
    buf = MetricBuffer(path)
    buf.extend("r1", [Metric("train_loss", 0.5, 1000, 0), Metric("lr", 0.1, 1000, 0)])
    buf.extend("r1", [Metric("train_loss", 0.4, 2000, 1)])
    buf.extend("r1", [Metric("test_dice_mean", 0.7, 3000, 0)], kind="final")
    buf.extend("r1", [])  # nothing to log: no line
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["run_id"], r["kind"], len(r["metrics"])) for r in rows] == [("r1", "epoch", 2), ("r1", "epoch", 1),
                                                                          ("r1", "final", 1)]  # fmt: skip
    assert rows[0]["metrics"][0] == ["train_loss", 0.5, 1000, 0]

    again = MetricBuffer(path)
    assert again.load("r2") == [] and not path.exists()  # another run's leftovers are dropped
    buf2 = MetricBuffer(path)
    for r in rows:
        buf2.extend(r["run_id"], [Metric(*m) for m in r["metrics"]], kind=r["kind"])
    restored = MetricBuffer(path).load("r1")  # epochs only, by default
    assert [(m.key, m.value, m.timestamp, m.step) for m in restored] == [
        ("train_loss", 0.5, 1000, 0), ("lr", 0.1, 1000, 0), ("train_loss", 0.4, 2000, 1)]  # fmt: skip
    assert [json.loads(line)["kind"] for line in path.read_text().splitlines()] == ["epoch"]


def test_pending_metrics_wait_in_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    assert pending_path("7", "abc_00001") == tmp_path / "mlflow-pending" / "7-abc_00001.jsonl"


# ------------------------------------------------------------------------------------------------ reachability


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(self.server.status)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.fixture
def health_server(monkeypatch):
    """A loopback HTTP server whose /health answers ``server.status``."""
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    server.status = 200
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status", [200, 401, 403])
def test_an_answering_server_is_reachable(health_server, status):
    health_server.status = status
    check_reachable(f"http://127.0.0.1:{health_server.server_port}/", timeout=5)


def test_a_server_failing_its_health_check_is_reported(health_server):
    health_server.status = 503
    uri = f"http://127.0.0.1:{health_server.server_port}"
    with pytest.raises(LasegsegError) as err:
        check_reachable(uri, timeout=5)
    assert str(err.value) == f"tracking URI {uri} answered HTTP 503 on /health"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_server_fails_fast_with_one_line(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    uri = f"http://127.0.0.1:{_closed_port()}"
    t0 = time.perf_counter()
    with pytest.raises(LasegsegError) as err:
        check_reachable(uri, timeout=10)
    message = str(err.value)
    assert time.perf_counter() - t0 < 3
    assert message.startswith(f"tracking URI {uri} is unreachable (") and "\n" not in message


def test_a_silent_server_fails_after_the_timeout(monkeypatch):
    for var in PROXY_VARS:
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as listener:  # accepts connections (kernel backlog) but never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        t0 = time.perf_counter()
        with pytest.raises(LasegsegError, match="is unreachable"):
            check_reachable(uri, timeout=0.5)
        assert 0.4 < time.perf_counter() - t0 < 3


def test_readers_need_an_existing_local_store(store, tmp_path):
    missing = f"sqlite:///{tmp_path / 'typo.db'}"
    check_reachable(missing)  # a writer may create it
    with pytest.raises(LasegsegError, match=f"no MLflow database at {missing}"):
        check_reachable(missing, must_exist=True)
    assert not (tmp_path / "typo.db").exists()
    check_reachable(store, must_exist=True)
    for uri in (str(tmp_path / "mlruns"), (tmp_path / "mlruns").as_uri()):
        with pytest.raises(LasegsegError, match="no MLflow tracking folder"):
            check_reachable(uri, must_exist=True)
    (tmp_path / "mlruns").mkdir()
    check_reachable((tmp_path / "mlruns").as_uri(), must_exist=True)


# ------------------------------------------------------------------------------------------------ environment


def test_http_stores_leave_retrying_to_lasegseg_unless_the_user_chose(monkeypatch):
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.delenv(var, raising=False)
    own_http_retries("sqlite:///x.db")
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    own_http_retries("https://mlflow.example.org")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0" and os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "120"


def test_workers_get_the_uri_and_the_credentials_that_are_set(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "")
    monkeypatch.setenv(RETRY_ENV, "60")
    for var in ("MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("UNRELATED_SECRET", "no")
    assert tracking_env("http://mlflow:5000") == {
        "MLFLOW_TRACKING_URI": "http://mlflow:5000",
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "s3cret",
        RETRY_ENV: "60",
    }
