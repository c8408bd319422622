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
