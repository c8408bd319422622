"""Reaching the MLflow store: which faults are waited out and for how long, reachability checks, workers' environment.

The outage cases (a store that goes down, lost answers, rejected batches) live in ``tests/faults``.
"""

from __future__ import annotations

import http.server
import logging
import os
import socket
import threading
import time

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos import databricks_pb2 as codes

from lasegseg.errors import ConfigError, LasegsegError
from lasegseg.tracking.client import (
    RETRY_ENV,
    check_reachable,
    default_retry_seconds,
    is_transient,
    own_http_retries,
    retry,
    tracking_env,
)

PROXY_VARS = ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")


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
    with caplog.at_level(logging.WARNING, logger="lasegseg.tracking.client"):
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
