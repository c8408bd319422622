"""What the driver checks about the cluster before any trial, and what it asks Ray for, without starting one."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from lasegseg.errors import ConfigError
from lasegseg.sweep import cluster, worker
from lasegseg.sweep.cluster import NodeInfo, check_fits, check_tracking

HEAD = NodeInfo("h", "10.0.0.1", 0.0, 0.0, True)
GPU1 = NodeInfo("w1", "10.0.0.2", 8.0, 1.0, False)


@pytest.mark.parametrize("cpu,gpu", [(1, 1), (8, 1), (1, 0.5), (1, 0)])
def test_requests_a_node_can_meet_pass(cpu, gpu):
    check_fits([{"cpu": cpu, "gpu": gpu}], [HEAD, GPU1], [])


@pytest.mark.parametrize("cpu,gpu,words", [(1, 2, "2 GPU but no node"), (16, 0, "16 CPU")])
def test_requests_no_node_can_meet_are_refused_in_one_line(cpu, gpu, words):
    with pytest.raises(ConfigError, match=words) as err:
        check_fits([{"cpu": cpu, "gpu": gpu}], [HEAD, GPU1], [])
    assert "\n" not in str(err.value) and "1 GPU" in str(err.value)


def test_node_types_the_cluster_can_scale_to_count():
    check_fits([{"cpu": 4, "gpu": 8}], [HEAD], [{"CPU": 96, "GPU": 8}])


@pytest.mark.parametrize("uri", ["sqlite:////runs/x/mlflow.db", "/runs/mlruns", "file:///runs/mlruns"])
def test_a_file_store_is_refused_across_nodes_and_kept_on_one(uri):
    check_tracking(uri, [GPU1], [])  # one machine: the embedded store is fine
    with pytest.raises(ConfigError, match="mlflow_server/start.sh"):
        check_tracking(uri, [HEAD, GPU1], [])
    with pytest.raises(ConfigError, match="mlflow_server/start.sh"):
        check_tracking(uri, [HEAD], [{"GPU": 1}])  # an autoscaling cluster will have more nodes
    check_tracking("http://mlflow.internal:5000", [HEAD, GPU1], [])


def _job(monkeypatch, runtime_env: dict) -> None:
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": runtime_env, "metadata": {}}))


def test_a_submitted_job_adds_only_what_its_runtime_env_lacks(monkeypatch):
    """Ray refuses to merge runtime envs that set the same variable (set or empty in the submit line)."""
    _job(monkeypatch, {"working_dir": "gcs://_ray_pkg_x.zip", "env_vars": {"MLFLOW_TRACKING_URI": ""}})
    env = {"MLFLOW_TRACKING_URI": "sqlite:////x.db", "MLFLOW_TRACKING_PASSWORD": "p", "LASEGSEG_PREWARM_BACKBONE": "t"}
    assert cluster._job_env(env) == {"env_vars": {"MLFLOW_TRACKING_PASSWORD": "p"}}
    assert cluster._job_env({"MLFLOW_TRACKING_URI": "http://x"}) is None
    assert cluster.in_job_working_dir()


def test_a_driver_started_by_hand_gives_its_workers_the_env_and_warm_up(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    out = cluster._job_env({"MLFLOW_TRACKING_URI": "http://x"})
    assert out == {"env_vars": {"MLFLOW_TRACKING_URI": "http://x"}, "worker_process_setup_hook": cluster.PREWARM_HOOK}


def test_the_sweeps_own_local_cluster_listens_on_loopback_only(monkeypatch):
    """Ray would turn a node IP of 127.0.0.1 into the machine's outward address and listen on every interface."""
    import ray

    from tests.helpers import ray_listeners_off_loopback

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    from ray._private import ray_constants

    constant = ray_constants.ENABLE_RAY_CLUSTER
    cluster.init_ray({}, 1)
    try:
        assert [n["NodeManagerAddress"] for n in ray.nodes()] == ["127.0.0.1"]
        assert ray.get(ray.remote(lambda: ray.util.get_node_ip_address()).remote()) == "127.0.0.1"
        assert ray_listeners_off_loopback() == []
    finally:
        ray.shutdown()
    assert ray_constants.ENABLE_RAY_CLUSTER == constant and cluster.LOCAL_ONLY_ENV not in os.environ


def test_local_cluster_inherits_the_sweep_env_and_preloads_workers(fake_ray):
    from ray.tune.execution import class_cache

    from lasegseg.sweep import cluster

    before = dict(os.environ)
    cluster.init_ray({"MLFLOW_TRACKING_URI": "sqlite:////s/mlflow.db", "LASEGSEG_CACHE": "/c"}, 2)
    ((kwargs, env),) = fake_ray.calls
    assert "runtime_env" not in kwargs  # a runtime_env would keep trial actors off the workers started warm
    assert kwargs["num_cpus"] == 2 and kwargs["include_dashboard"] is False
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:////s/mlflow.db" and env["LASEGSEG_CACHE"] == "/c"
    assert env["RAY_preload_python_modules"] == worker.PRELOAD_MODULE
    assert env["RAY_num_workers_soft_limit"] == "2"  # warm idle workers outlive Tune's CPU reservations
    root = str(Path(cluster.__file__).resolve().parents[2])
    assert env["PYTHONPATH"].split(os.pathsep) == [root, "/elsewhere"]
    assert dict(os.environ) == before  # this process's environment is as it was
    assert "PL_DISABLE_FORK" not in class_cache.DEFAULT_ENV_VARS  # Tune's actors get an empty runtime env


def test_existing_cluster_gets_the_env_in_the_job_runtime_env(fake_ray, monkeypatch):
    from lasegseg.sweep import cluster

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    before = dict(os.environ)
    cluster.init_ray({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, None)
    ((kwargs, env),) = fake_ray.calls
    assert kwargs["runtime_env"] == {
        "env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
        "worker_process_setup_hook": "lasegseg.sweep.worker.prewarm_worker",
    }
    assert "RAY_preload_python_modules" not in env and dict(os.environ) == before


@pytest.mark.parametrize(
    "max_concurrent,cpus_per_trial,expected",
    [(1, 1.0, 1), (4, 0.5, 2), (3, 0.5, 2), (0, 1.0, None), (2, 0.0, None), (10**6, 1.0, os.cpu_count())],
)
def test_local_cluster_cpus_follow_max_concurrent(max_concurrent, cpus_per_trial, expected):
    from lasegseg.sweep import cluster

    res = SimpleNamespace(max_concurrent=max_concurrent, cpus_per_trial=cpus_per_trial)
    assert cluster.local_cpus(res) == expected
