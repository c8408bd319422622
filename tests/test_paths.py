"""Where things live: each location comes from one function."""

from __future__ import annotations

from pathlib import Path

from lasegseg import paths


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
