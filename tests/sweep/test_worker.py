"""Where a Ray worker trains: the device follows the GPUs Ray assigned, not the GPUs the node has."""

from __future__ import annotations

import pytest


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
