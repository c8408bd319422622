"""The sweep's side of the store against real sqlite databases: a new store from its template, the experiment."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from lasegseg.errors import LasegsegError
from lasegseg.paths import sqlite_store_template
from lasegseg.tracking.store import ensure_experiment, seed_sqlite_store, start_parent

# ------------------------------------------------------------------------------------------------ experiment


def test_a_new_sqlite_store_is_a_copy_of_a_migrated_template_and_behaves_as_a_fresh_one(tmp_path, monkeypatch):
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
