"""What the driver checks about the cluster before any trial, and what it asks Ray for, without starting one."""

from __future__ import annotations

import json
import os

import pytest

from lasegseg.errors import ConfigError
from lasegseg.sweep import cluster
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


def test_results_of_a_submitted_job_land_outside_its_temporary_working_dir(monkeypatch, tmp_path):
    from lasegseg.sweep.runner import _storage_root

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("LASEGSEG_STORAGE", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    assert _storage_root(None).path == str(tmp_path / "runs")  # by hand: ./runs
    _job(monkeypatch, {"working_dir": "gcs://_ray_pkg_x.zip"})
    assert _storage_root(None).path == str(tmp_path / "lasegseg" / "runs")
    assert _storage_root("out").path == str(tmp_path / "lasegseg" / "out")
    assert _storage_root(str(tmp_path / "abs")).path == str(tmp_path / "abs")
    assert _storage_root("s3://bucket/runs").uri == "s3://bucket/runs"


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
