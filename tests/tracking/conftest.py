"""A real sqlite MLflow store for the tracking tests (its tables take seconds to create: one per module)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from lasegseg.tracking.store import ensure_experiment, seed_sqlite_store, start_parent


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite database for the module, created here (its tables take seconds); each test has its own experiment."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    seed_sqlite_store(uri)
    return uri


@pytest.fixture
def sweep(store, tmp_path):
    """A fresh experiment (artifacts under tmp_path) with its sweep parent run."""
    exp = ensure_experiment(store, f"tracking-{tmp_path.name}", artifact_location=(tmp_path / "artifacts").as_uri())
    parent = start_parent(store, exp, "sweep", {"sweep.name": "demo"}, {"lasegseg.sweep": "demo"})
    return SimpleNamespace(uri=store, exp=exp, parent=parent, client=MlflowClient(store))
