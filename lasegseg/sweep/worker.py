"""The Ray worker process a trial runs in: its one-time warm-up and the facts the driver records about it.

Imported by the trainable (``worker_info``), by :mod:`lasegseg.sweep.preload` and by the driver (the names of the
warm-up hook, module and variable); it imports neither of them, so the sweep modules import without a cycle.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

from lasegseg.tracking.client import client

try:
    import psutil
except ImportError:  # pragma: no cover - psutil comes with Ray; without it trial_timings.csv only loses a column
    psutil = None

log = logging.getLogger(__name__)

PREWARM_ENV = "LASEGSEG_PREWARM_BACKBONE"
# "0" when no trial of the sweep loads a backbone in its worker (every one is frozen on cached features, or has no
# backbone): the workers then skip transformers (≈ 2.4 s of imports and ≈ 160 MiB per process).
WARM_BACKBONE_CODE_ENV = "LASEGSEG_WARM_BACKBONE_CODE"
PRELOAD_MODULE = "lasegseg.sweep.preload"
PREWARM_HOOK = "lasegseg.sweep.worker.prewarm_worker"
# What a trial imports, by name: this module is imported by the trainable, so it names the trainable rather than
# importing it (no import cycle).
# torch._dynamo: torch's optimizers import it when the first one is built (≈ 1 s), as does the deterministic flag.
WARM_MODULES = ("torch", "torch._dynamo", "mlflow.tracking", "lasegseg.train.trial", "lasegseg.sweep.trainable")
# What a trial that loads its backbone imports besides.
BACKBONE_MODULES = (
    "transformers.models.dinov2.modeling_dinov2",
    "transformers.models.dinov2_with_registers.modeling_dinov2_with_registers",
    "transformers.models.dinov3_vit.modeling_dinov3_vit",
)
_PREWARMED = False


def prewarm_worker(*, full: bool = True) -> None:
    """Pay a fresh Ray worker's one-time costs when the process starts, before Tune hands it a trial.

    torch, the trial modules, the MLflow client and (unless ``$LASEGSEG_WARM_BACKBONE_CODE`` is ``0``)
    transformers' DINOv2 and DINOv3 are imported. With ``full`` the
    worker also opens the tracking store and loads the sweep's first backbone (``$LASEGSEG_PREWARM_BACKBONE``). Two
    callers: the ``worker_process_setup_hook`` of a sweep on an existing cluster (one worker per trial actor,
    ``full``), and :mod:`lasegseg.sweep.preload` on the sweep's own local cluster, where Ray starts one worker per
    CPU before the driver has created the store (imports only: a giant backbone per idle worker would cost
    gigabytes, and a sqlite store must be created by one process). A failure here only loses the head start:
    the trial loads them itself.

    Args:
        full: also connect to the tracking store and load the backbone.
    """
    global _PREWARMED
    try:
        backbone_code = os.environ.get(WARM_BACKBONE_CODE_ENV, "1") != "0"
        # A sqlite tracking store is opened through SQLAlchemy, whose MLflow store module alone takes ≈ 2 s.
        store = ("mlflow.store.tracking.sqlalchemy_store",) if _sqlite_tracking() else ()
        for module in WARM_MODULES + store + (BACKBONE_MODULES if backbone_code else ()):
            importlib.import_module(module)
        if full:
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if uri:
                client(uri).search_experiments(max_results=1)
            name = os.environ.get(PREWARM_ENV, "")
            if name:
                from lasegseg.models.segmenter import load_backbone  # deferred: start-up (torch, after the warm-up)

                name, _, registers = name.partition("|")
                load_backbone(name, registers=registers == "True")
        _PREWARMED = True
    except Exception as exc:  # noqa: BLE001 - a warm-up must never stop a worker from starting
        log.warning("worker warm-up skipped: %s", exc)


def _sqlite_tracking() -> bool:
    return os.environ.get("MLFLOW_TRACKING_URI", "").startswith("sqlite:")


def worker_info() -> dict[str, Any]:
    """This worker process as the driver's trial_timings.csv records it: pid, when the process started (wall
    clock; 0 if unknown) and whether :func:`prewarm_worker` had finished in it."""
    try:
        started = psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - the row only loses a column
        started = 0.0
    return {"worker_pid": os.getpid(), "worker_started_at": started, "worker_prewarmed": _PREWARMED}


def placement() -> dict[str, Any]:
    """Where this Ray worker runs: its node (id and IP), the torch device of the GPUs Ray gave it and its GPU share
    (``gpu_share``: Ray's GPU count for it, fractional when trials are packed on a card; 1 outside Ray).

    No GPU share means the CPU even on a GPU node: Ray no longer hides a node's GPUs from work that asked for none,
    so ``torch.cuda.is_available()`` alone would put it on physical GPU 0, where the scheduler cannot see it. With
    a share, Ray sets ``CUDA_VISIBLE_DEVICES`` to the assigned GPUs, so ``cuda`` is the first of them; a logical
    GPU on a machine without CUDA (a simulated cluster) trains on the CPU.
    """
    # deferred: start-up (ray, torch): lasegseg.sweep.preload imports this module before the warm-up imports them
    import ray
    import torch

    if not ray.is_initialized():  # called outside Ray (a trainable run by hand): no node, the default device
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return {"node_id": "", "node_ip": "", "device": device, "gpu_share": 1.0}
    gpus = ray.get_gpu_ids()
    share = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    device = "cuda" if gpus and torch.cuda.is_available() else "cpu"
    node_id = ray.get_runtime_context().get_node_id()
    # The address the node registered with (--node-ip-address), as the cluster lists it; a worker process on its
    # own would guess the machine's outward address instead.
    ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), "")
    return {"node_id": node_id, "node_ip": ip or ray.util.get_node_ip_address(), "device": device, "gpu_share": share}
