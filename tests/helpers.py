"""Helpers shared by the tests that run whole sweeps in subprocesses."""

from __future__ import annotations

import os


def sweep_env() -> dict[str, str]:
    """The test process's environment for a sweep subprocess: its own local Ray and MLflow, one thread per op."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def sweep_runs(uri: str, experiment: str):
    """(client, experiment, sweep parent runs, trial child runs) of an experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("lasegseg.role") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("lasegseg.role") == "trial"]
    return client, exp, parents, trials


def postgres_test_uri() -> str:
    """``$LASEGSEG_TEST_PG_URI`` (a database named for tests, as `.ci/postgres` makes it), else skip the test."""
    import re

    import pytest

    uri = os.environ.get("LASEGSEG_TEST_PG_URI")
    if not uri:
        pytest.skip('no PostgreSQL for the tests: run `eval "$(.ci/postgres)"` (CI does) to set LASEGSEG_TEST_PG_URI')
    if not re.search(r"/\w*(ci|test)\w*$", uri):
        pytest.skip(f"{uri}: tests write to and wipe this database, so its name must contain 'ci' or 'test'")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (psycopg) is not installed")
    return uri
