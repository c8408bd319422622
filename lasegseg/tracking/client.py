"""Reaching the MLflow store: the client, how long a call waits out an unavailable store, and what workers need.

mlflow itself is imported only by the functions that call it: the sweep driver checks the store and hands its
workers their environment before it needs MLflow's client, whose imports (~2 s) it pays on a thread while Ray starts.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlparse

from lasegseg.errors import LasegsegError
from lasegseg.retry import call_with_retries, env_seconds

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ENV = "LASEGSEG_MLFLOW_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 300.0
MAX_WAIT_S = 10.0


def default_retry_seconds() -> float:
    """How long a tracking call keeps retrying a transient fault (``$LASEGSEG_MLFLOW_RETRY_SECONDS``, 300 s)."""
    return env_seconds(RETRY_ENV, DEFAULT_RETRY_SECONDS)


def is_transient(exc: BaseException) -> bool:
    """A fault worth waiting out: the store is down, busy or restarting (not a request it rejected)."""
    from mlflow.exceptions import MlflowException  # deferred: heavy (mlflow, ~2 s)

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


def client(tracking_uri: str, *, registry: bool = False):
    """The one way lasegseg talks to MLflow: a client bound to ``tracking_uri`` (and its model registry).

    Args:
        tracking_uri: the MLflow URI.
        registry: use the same store as the model registry (exports, ``models:/`` URIs).
    """
    from mlflow.tracking import MlflowClient  # deferred: heavy (mlflow, ~2 s)

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


def tracking_env(tracking_uri: str) -> dict[str, str]:
    """Environment every worker needs to reach the same tracking server (credentials included)."""
    env = {"MLFLOW_TRACKING_URI": tracking_uri}
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                "MLFLOW_TRACKING_INSECURE_TLS", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY", RETRY_ENV):  # fmt: skip
        if os.environ.get(key):
            env[key] = os.environ[key]
    return env
