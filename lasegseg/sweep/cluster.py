"""Ray for a sweep: join the cluster named by ``RAY_ADDRESS``, or start a private local one whose workers start warm."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from lasegseg.environ import scoped_environ
from lasegseg.errors import ConfigError
from lasegseg.sweep.worker import PRELOAD_MODULE, PREWARM_ENV, PREWARM_HOOK

LOOPBACK = "127.0.0.1"
# Off, Ray keeps a node on the loopback address it was given (see _loopback_node).
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def local_cpus(res) -> int | None:
    """CPUs for the sweep's own local cluster: what ``max_concurrent`` trials use, at most this machine's.

    Ray starts (and lasegseg warms) one worker per CPU with the cluster; a one-at-a-time sweep on a large machine
    needs one, not a warm process per core. None (every core) when ``max_concurrent`` is 0 (as many as fit).
    """
    if not res.max_concurrent or res.cpus_per_trial <= 0:
        return None
    return max(1, min(os.cpu_count() or 1, math.ceil(res.max_concurrent * res.cpus_per_trial)))


def init_ray(env: dict[str, str], cpus: float | None) -> None:
    """Join the cluster under ``RAY_ADDRESS``, else start a private local one whose workers start warm.

    On an existing cluster the variables travel in the job's ``runtime_env`` and its setup hook warms each trial's
    worker. The local cluster gets them from this process's environment instead, with ``RAY_preload_python_modules``
    so the workers Ray starts with it (one per CPU) import torch, transformers and the trial code while this
    driver is still building caches: Tune then places its first trials on those processes, whereas a job-level
    ``runtime_env`` would make Ray start new, cold ones for them.
    """
    # Per-epoch checkpoints of short trials trip Tune's "snapshotting too often" warning; it is expected here.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    import ray  # deferred: heavy (ray, ~0.6 s): planning a sweep and --dry-run need none

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(runtime_env=_job_env(env), log_to_driver=True)
        return
    with scoped_environ(_local_cluster_env(env, cpus)), _loopback_node():
        # A private local cluster: dashboard off (nothing listens for browsers), token auth as Ray sets it up.
        ray.init(
            address="local",  # a cluster of its own, even when a `ray start` head runs on this machine
            include_dashboard=False, num_cpus=int(cpus) if cpus else None, _node_ip_address=LOOPBACK,
            log_to_driver=True, configure_logging=True, logging_level=logging.WARNING,
        )  # fmt: skip
    _trial_actors_on_started_workers()


@contextlib.contextmanager
def _loopback_node() -> Iterator[None]:
    """Make the node Ray starts in this block a loopback node: its servers listen on 127.0.0.1 only.

    Ray turns a node IP of 127.0.0.1 into the machine's outward address (``resolve_ip_for_localhost``) unless
    multi-machine clusters are off (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which this module's import-time
    constant mirrors); with the outward address its GCS, raylet and workers listen on every interface. With the
    node on 127.0.0.1 they bind loopback alone (checked in the sweep tests). The cluster's processes inherit the
    variable; this process's constant is put back afterwards.
    """
    from ray._private import ray_constants  # deferred: heavy (ray, ~0.6 s)

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        with scoped_environ({LOCAL_ONLY_ENV: "0"}):
            yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def _local_cluster_env(env: dict[str, str], cpus: float | None) -> dict[str, str]:
    """What the local cluster's processes inherit: the sweep's variables, the preload module and this checkout."""
    package_root = str(Path(__file__).resolve().parents[2])
    pythonpath = os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH", "")) if p)
    preload = ",".join(m for m in (os.environ.get("RAY_preload_python_modules", ""), PRELOAD_MODULE) if m)
    # Ray keeps as many idle workers as CPUs are *unreserved*: once Tune's placement group holds a trial's CPUs,
    # the warm worker waiting for that trial would be stopped as surplus and a cold one started. A fixed limit
    # (the cluster's CPUs) keeps it.
    soft_limit = os.environ.get("RAY_num_workers_soft_limit") or str(int(cpus) if cpus else os.cpu_count() or 1)
    return {**env, "RAY_preload_python_modules": preload, "RAY_num_workers_soft_limit": soft_limit,
            "PYTHONPATH": pythonpath}  # fmt: skip


def _trial_actors_on_started_workers() -> None:
    """Let Tune's trial actors take the workers the local cluster started (warm) instead of new processes.

    Ray hands an actor only to a worker started for the same runtime environment, and Tune gives each trainable
    actor ``{"env_vars": DEFAULT_ENV_VARS + a few propagated ones}``, whose one default, ``PL_DISABLE_FORK``, is
    for PyTorch Lightning (not used here). With it dropped the environment is empty like that of the workers Ray
    started with the cluster, and the first trials skip a cold process start (~7 s of imports on 2 cores). If a
    later Ray moves this table, trials simply start cold again; ``worker_prewarmed`` in trial_timings.csv and
    the sweep tests show which happened.
    """
    try:
        from ray.tune.execution import class_cache  # deferred: heavy (ray.tune, ~2 s): imported once Ray is up

        class_cache.DEFAULT_ENV_VARS.pop("PL_DISABLE_FORK", None)
    except (ImportError, AttributeError):  # pragma: no cover - depends on Ray's internals
        pass


def job_runtime_env() -> dict[str, Any]:
    """The runtime environment of the ``ray job submit`` job this driver runs in ({} outside a submitted job)."""
    text = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "")
    if not text:
        return {}
    try:
        return json.loads(text).get("runtime_env") or {}
    except (ValueError, AttributeError):
        return {}


def in_job_working_dir() -> bool:
    """Whether this driver runs in Ray's temporary copy of a submitted job's working dir (gone after ``ray stop``)."""
    return bool(job_runtime_env().get("working_dir")) or "runtime_resources" in Path.cwd().parts


def _job_env(env: dict[str, str]) -> dict[str, Any] | None:
    """The runtime env this driver's workers need beyond what they already get.

    In a submitted job the job's runtime env (its working dir and variables) is every worker's default: this driver
    adds only variables the job lacks. It adds no setup hook there and nothing when nothing is missing, since Ray
    refuses to merge two runtime envs that set the same variable and a driver-level runtime env makes Ray treat
    the job's working-dir copy, this process's working folder, as unused and delete it mid-sweep. A driver
    started by hand on a cluster (no job) gives its workers the variables and the warm-up hook.
    """
    job = job_runtime_env()
    if not os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):
        return {"env_vars": env, "worker_process_setup_hook": PREWARM_HOOK}
    given = job.get("env_vars") or {}
    missing = {k: v for k, v in env.items() if k not in given and k != PREWARM_ENV}
    return {"env_vars": missing} if missing else None


@dataclass(frozen=True)
class NodeInfo:
    """One alive Ray node as the sweep sees it."""

    node_id: str
    ip: str
    cpus: float
    gpus: float
    head: bool


def alive_nodes() -> list[NodeInfo]:
    """The cluster's alive nodes with their CPU and GPU counts."""
    import ray  # deferred: heavy (ray, ~0.6 s)

    out = []
    for node in ray.nodes():
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        head = "node:__internal_head__" in res
        out.append(NodeInfo(node["NodeID"], node["NodeManagerAddress"], res.get("CPU", 0.0), res.get("GPU", 0.0), head))
    return out


def autoscaler_node_types() -> list[dict[str, float]]:
    """Resources of the node types the cluster can scale to (from the head's cluster-launcher config, if any)."""
    path = Path.home() / "ray_bootstrap_config.yaml"
    if not path.is_file():
        return []
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
        return [dict(t.get("resources") or {}) for t in (cfg.get("available_node_types") or {}).values()]
    except (OSError, yaml.YAMLError, AttributeError):
        return []


def check_fits(requests: list[dict[str, float]], nodes: list[NodeInfo], node_types: list[dict[str, float]]) -> None:
    """Refuse, before any trial, a sweep whose trials ask for more CPUs or GPUs than any node has or can have
    (Tune would otherwise wait forever and warn every minute)."""
    shapes = [(n.cpus, n.gpus) for n in nodes] + [(t.get("CPU", 0.0), t.get("GPU", 0.0)) for t in node_types]
    for req in sorted(requests, key=lambda r: (-r["gpu"], -r["cpu"])):
        if any(cpus >= req["cpu"] and gpus >= req["gpu"] for cpus, gpus in shapes):
            continue
        have = ", ".join(f"{c:g} CPU/{g:g} GPU" for c, g in shapes) or "no nodes"
        raise ConfigError(
            f"a trial asks for {req['cpu']:g} CPU and {req['gpu']:g} GPU but no node has that much (nodes: {have}); "
            "lower resources.gpus_per_trial / cpus_per_trial or add such nodes"
        )


def check_tracking(tracking_uri: str, nodes: list[NodeInfo], node_types: list[dict[str, float]]) -> None:
    """A sweep across nodes needs a tracking server: a sqlite file or a store folder lives on one machine only."""
    multi = len(nodes) > 1 or bool(node_types)
    scheme = urlparse(tracking_uri).scheme
    if multi and scheme in ("", "file", "sqlite"):
        raise ConfigError(
            f"tracking store {tracking_uri} is a file on one machine, but this sweep runs on {len(nodes)} nodes: "
            "start a tracking server (mlflow_server/start.sh local|production) and pass --tracking-uri or set "
            "MLFLOW_TRACKING_URI"
        )
