"""Where things live: the cache root, the sweep folders and the tracking store.

Each location is worked out here and nowhere else; every other module asks this one.
"""

from __future__ import annotations

import os
from pathlib import Path

from lasegseg.errors import LasegsegError

TRACKING_ENV = "MLFLOW_TRACKING_URI"
CACHE_ENV = "LASEGSEG_CACHE"
STORAGE_ENV = "LASEGSEG_STORAGE"
DEFAULT_STORAGE = "runs"
TRACKING_DB = "mlflow.db"


def stable_storage_root() -> Path:
    """Where sweeps land by default when the working folder is temporary (Ray's copy of a submitted job's)."""
    return Path.home() / "lasegseg" / DEFAULT_STORAGE


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The node-local cache folder: ``cache_dir`` if given (non-empty), else ``$LASEGSEG_CACHE``, else
    ``~/.cache/lasegseg``.

    Args:
        cache_dir: an explicit folder; ``None`` or ``""`` (the config default) falls through.
    """
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lasegseg"


def pending_metrics_dir() -> Path:
    """Where trials' unsent MLflow metrics wait between attempts (node-local, outlives a trial's process)."""
    return cache_root() / "mlflow-pending"


def sqlite_store_template(mlflow_version: str) -> Path:
    """An empty, fully migrated MLflow sqlite store of this MLflow version, copied into each new sweep folder."""
    return cache_root() / "mlflow-store" / f"empty-{mlflow_version}.db"


def default_tracking_uri(sweep_dir: str | os.PathLike) -> str:
    """The embedded store: a sqlite database inside the sweep folder (safe for concurrent writers on one machine)."""
    return f"sqlite:///{(Path(sweep_dir) / TRACKING_DB).resolve()}"


def tracking_uri(flag: str | None, default: str | None = None, *, context: str = "") -> str:
    """The MLflow store a command uses: the ``--tracking-uri`` flag, else ``$MLFLOW_TRACKING_URI``, else ``default``.

    Args:
        flag: the command line's value (None or empty when not given).
        default: the fallback (a sweep's own sqlite store); None makes a missing URI an error.
        context: what needs the store, for the error (``"models:/la@champion: "``).
    """
    uri = flag or os.environ.get(TRACKING_ENV) or default
    if not uri:
        raise LasegsegError(f"{context}no tracking URI: pass --tracking-uri or set {TRACKING_ENV}")
    return uri
