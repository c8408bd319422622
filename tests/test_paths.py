"""Where things live: each location comes from one function."""

from __future__ import annotations

from pathlib import Path

import pytest

from lasegseg import paths
from lasegseg.errors import LasegsegError


def test_cache_root_order(monkeypatch, tmp_path):
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path / "env"))
    assert paths.cache_root() == paths.cache_root("") == tmp_path / "env"
    assert paths.cache_root(tmp_path / "x") == tmp_path / "x"
    assert paths.pending_metrics_dir() == tmp_path / "env" / "mlflow-pending"
    monkeypatch.delenv("LASEGSEG_CACHE")
    assert paths.cache_root() == Path.home() / ".cache" / "lasegseg"


def test_default_tracking_uri_is_a_sqlite_file_in_the_sweep_folder(tmp_path):
    assert paths.default_tracking_uri(tmp_path / "s") == f"sqlite:///{tmp_path / 's' / 'mlflow.db'}"


def test_stable_storage_root_is_under_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.stable_storage_root() == tmp_path / "lasegseg" / "runs"


def test_tracking_uri_is_the_flag_then_the_environment_then_the_default(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert paths.tracking_uri("sqlite:///a.db", "sqlite:///d.db") == "sqlite:///a.db"
    assert paths.tracking_uri(None, "sqlite:///d.db") == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert paths.tracking_uri("", "sqlite:///d.db") == "sqlite:///d.db"
    with pytest.raises(LasegsegError, match="^models:/la@champion: no tracking URI: pass --tracking-uri or set"):
        paths.tracking_uri(None, context="models:/la@champion: ")
