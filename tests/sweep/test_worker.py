"""A trial's Ray worker: its warm-up, what it says about itself, and where it trains (the device follows the GPUs Ray
assigned, not the GPUs the node has)."""

from __future__ import annotations

import os
import time

import pytest

from lasegseg.sweep import worker


def _placement_with_cuda():
    """In a Ray worker: placement() as on a CUDA machine (the node has GPUs whether or not Ray gave any)."""
    import torch

    from lasegseg.sweep.worker import placement

    torch.cuda.is_available = lambda: True
    return placement()


def test_outside_ray_the_device_is_the_default():
    import torch

    from lasegseg.sweep.worker import placement

    out = placement()
    assert out["node_id"] == "" and out["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert out["gpu_share"] == 1.0


@pytest.fixture(scope="module")
def gpu_node():
    ray = pytest.importorskip("ray")
    from lasegseg.sweep.cluster import _loopback_node

    with _loopback_node():
        ray.init(address="local", num_cpus=2, num_gpus=1, include_dashboard=False, _node_ip_address="127.0.0.1",
                 logging_level="ERROR", log_to_driver=False)  # fmt: skip
    yield ray
    ray.shutdown()


def test_no_gpu_share_means_the_cpu_even_on_a_gpu_node(gpu_node):
    task = gpu_node.remote(_placement_with_cuda)
    without = gpu_node.get(task.options(num_gpus=0).remote())
    shared = gpu_node.get(task.options(num_gpus=0.5).remote())
    assert without["device"] == "cpu" and shared["device"] == "cuda"
    assert without["gpu_share"] == 0.0 and shared["gpu_share"] == 0.5  # a packed trial's part of the card
    assert without["node_id"] == shared["node_id"] == gpu_node.get_runtime_context().get_node_id()
    (node,) = gpu_node.nodes()
    assert without["node_ip"] == node["NodeManagerAddress"]


def test_prewarm_loads_the_backbone_template(monkeypatch):
    from lasegseg.models import segmenter

    monkeypatch.setattr(segmenter, "_BACKBONE_TEMPLATE", {})
    monkeypatch.setenv(worker.PREWARM_ENV, "tiny|False")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    worker.prewarm_worker()
    assert [key[:2] for key in segmenter._BACKBONE_TEMPLATE] == [("tiny", False)]
    monkeypatch.setenv(worker.PREWARM_ENV, "no-such-backbone|False")
    worker.prewarm_worker()  # a bad name only skips the warm-up


def test_worker_info_describes_this_process(monkeypatch):
    monkeypatch.setattr(worker, "_PREWARMED", False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = worker.worker_info()
    assert before["worker_pid"] == os.getpid() and before["worker_prewarmed"] is False
    assert 0 < before["worker_started_at"] < time.time()
    worker.prewarm_worker(full=False)
    assert worker.worker_info()["worker_prewarmed"] is True
