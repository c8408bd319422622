"""A sweep's caches, built where the trials run: one Ray task per node, with a frozen trial's resources.

The slice cache and the frozen-backbone feature caches live in each node's own cache folder (``$LASEGSEG_CACHE`` on
that node). Before the trials, the driver sends every node that can run a frozen trial one task that asks for that
trial's CPUs and GPU share, so the backbone runs on the accelerator and in the precision the trials read, never on
the driver (a cluster's head has no GPU). The task opens or builds the node's slice caches (one per image size),
then builds each frozen backbone's features under the cache's file lock, storing only the levels that backbone's
frozen trials read (the union over their decoders): a node builds each at most once, and a trial that lands on a
node added later builds its own levels the same way. On a GPU the task's worker exits afterwards, so the backbone's
memory goes back to the trials. On the sweep's own local cluster (one machine) the driver builds them in-process
when no trial loads a backbone, else the first frozen trial of each backbone does (see :func:`build_node_caches`).
Frozen trials that find these features decode them without loading their backbone.

Building on every node beats fetching from shared storage here: a ViT-L/g feature cache of a full dataset is tens
of GB, which takes longer to download than the GPU takes to compute it (minutes), and the slice cache is rebuilt
from the dataset every node already reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from lasegseg.config import from_flat
from lasegseg.data.cache import open_cache
from lasegseg.data.preprocess import Preprocessing
from lasegseg.fsio import atomic_write
from lasegseg.sweep.cluster import alive_nodes
from lasegseg.sweep.worker import placement
from lasegseg.train.feature_plan import distinct_frozen_backbones, feature_slot, slot_readers, uses_feature_cache

log = logging.getLogger("lasegseg.sweep")


def preprocessing_key(flat: dict[str, Any]) -> str:
    """The identity of a trial's slice cache within a sweep: its preprocessing (image size and clipping)."""
    return json.dumps(Preprocessing.from_flat(flat).as_dict(), sort_keys=True)


def open_slice_caches(trials: list[dict[str, Any]], stats: dict[str, Any] | None = None) -> dict[str, Any]:
    """One slice cache per distinct preprocessing of ``trials``, built on first use: ``{preprocessing key: cache}``.

    A sweep may mix image sizes (a grid over ``data.image_size``, or DINOv2 and DINOv3 cells at multiples of their
    own patch sizes); every trial then reads the cache of its own size, each built once.

    Args:
        trials: flat trial configs of one dataset.
        stats: gets ``built`` True when this call built any of them.
    """
    caches: dict[str, Any] = {}
    built_any = False
    for flat in trials:
        key = preprocessing_key(flat)
        if key not in caches:
            built: dict[str, Any] = {}
            caches[key] = open_cache(from_flat(flat), built)
            built_any |= bool(built.get("built"))
    if stats is not None:
        stats["built"] = built_any
    return caches


def frozen_feature_trials(trials: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat config per distinct frozen backbone whose trials train on cached features."""
    return [flat for flat in distinct_frozen_backbones(trials) if uses_feature_cache(flat)]


def loads_backbone(flat: dict[str, Any]) -> bool:
    """Whether a trial with this flat config loads its backbone in its worker: it has one and does not train on
    cached features (such a trial decodes the features built here through a weightless stand-in, see
    :class:`~lasegseg.models.backbones.BackboneStub`)."""
    return flat.get("model.backbone", "tiny") != "none" and not uses_feature_cache(flat)


def build_on_node(flats: list[dict[str, Any]], readers: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """Inside a Ray task: this node's slice cache and the feature caches of ``flats`` (built once, under a lock).

    Args:
        flats: one flat config per feature slot (see :func:`frozen_feature_trials`).
        readers: ``{feature slot: decoders of its trials}`` (see :func:`~lasegseg.train.features.slot_readers`);
            each cache stores the union of the levels they read.

    Returns:
        The node, the device used, ``{feature slot: folder}`` and which caches this task built.
    """
    return _build(flats, readers, placement())


def _build(flats: list[dict[str, Any]], readers: dict[str, tuple[str, ...]], where: dict[str, str]) -> dict[str, Any]:
    """:func:`build_on_node`'s work on the device ``where`` names."""
    # deferred: heavy (torch, ~2.5 s): planning a sweep and --dry-run need none
    import torch

    from lasegseg.train.feature_build import build_slot_features

    t0 = time.perf_counter()
    built: dict[str, Any] = {}
    caches = open_slice_caches(flats, built)
    out = {**where, "paths": {}, "built": [], "slice_cache_built": built["built"]}
    for flat in flats:
        slot, built = feature_slot(flat), {}
        cache = caches[preprocessing_key(flat)]
        feats = build_slot_features(flat, readers[slot], cache, device=where["device"], stats=built)
        out["paths"][slot] = str(feats.path)
        if built.get("built"):
            out["built"].append(slot)
    if where["device"] == "cuda":
        torch.cuda.empty_cache()
    out["seconds"] = time.perf_counter() - t0
    return out


def build_node_caches(trials: list[dict[str, Any]], res, *, joined: bool = True) -> dict[str, dict[str, str]]:
    """Run :func:`build_on_node` on every alive node that fits a frozen trial; ``{node id: {slot: folder}}``.

    On the sweep's own local cluster (``joined`` False) no task runs: it would take one of the workers the cluster
    started warm, and Ray never hands a worker that ran a task to a trial actor afterwards (a trial would then wait
    for a cold process). When no trial of the sweep loads its backbone in its worker, this driver builds the
    features itself, on the device a frozen trial gets, while those workers warm up without transformers; else the
    first frozen trial builds them (its worker imports transformers anyway, the driver would only do it again on
    the way to the first trial) and publishes them in the sweep's feature index (:func:`publish_features`).
    Frozen trials that find their features either way decode them without loading their backbone.

    Args:
        trials: the sweep's flat trial configs.
        res: the sweep's :class:`~lasegseg.sweep.spec.Resources`.
        joined: the sweep runs on an existing cluster (``RAY_ADDRESS``), not on its own local one.
    """
    # deferred: heavy (ray, ~0.6 s): the driver starts or joins Ray once it has checked the sweep
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    flats = frozen_feature_trials(trials)
    if not flats:
        return {}
    readers = slot_readers(trials)
    request = res.for_trial(flats[0])
    if not joined:
        return {} if any(loads_backbone(t) for t in trials) else _build_in_driver(flats, readers, request)
    nodes = [n for n in alive_nodes() if n.cpus >= request["cpu"] and n.gpus >= request["gpu"]]
    # On a GPU the worker exits after the task (max_calls=1), so the backbone's memory goes back to the trials.
    task = ray.remote(max_calls=1 if request["gpu"] else 0)(build_on_node)
    refs = [
        task.options(
            num_cpus=request["cpu"], num_gpus=request["gpu"],
            scheduling_strategy=NodeAffinitySchedulingStrategy(n.node_id, soft=False),
        ).remote(flats, readers)
        for n in nodes
    ]  # fmt: skip
    out = {}
    for result in ray.get(refs):
        built = ", ".join(result["built"]) or "none (reused)"
        log.info(
            "caches on node %s (%s): slice cache %s, features built: %s (%.1f s)", result["node_ip"],
            result["node_id"][:8], "built" if result["slice_cache_built"] else "reused", built, result["seconds"],
        )  # fmt: skip
        out[result["node_id"]] = result["paths"]
    return out


def _build_in_driver(flats: list[dict[str, Any]], readers: dict[str, tuple[str, ...]], request: dict[str, float]):
    """:func:`build_on_node` in this process, for the sweep's own local cluster (this machine is its one node); the
    backbone is dropped afterwards (its weights and device memory go back before the trials start)."""
    # deferred: heavy (ray, torch): the driver imports them once it has checked the sweep
    import ray
    import torch

    from lasegseg.models import segmenter

    device = "cuda" if request["gpu"] and torch.cuda.is_available() else "cpu"
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    where = {"node_id": node_id, "node_ip": "127.0.0.1", "device": device}
    try:
        result = _build(flats, readers, where)
    finally:
        segmenter.forget_backbones()
    built = ", ".join(result["built"]) or "none (reused)"
    log.info("caches here: features built: %s (%.1f s)", built, result["seconds"])
    return {where["node_id"]: result["paths"]}


def _index_file(index: str | Path, slot: str) -> Path:
    return Path(index) / f"{hashlib.sha256(slot.encode()).hexdigest()[:16]}.json"


def publish_features(index: str | Path, slot: str, folder: str | Path) -> None:
    """Record in a local sweep's feature index (a folder of its own) that feature slot ``slot`` is ``folder``, so
    the sweep's later frozen trials of that slot open it without loading their backbone to find it.

    Args:
        index: the sweep's feature index folder (:attr:`~lasegseg.sweep.context.TrialContext.feature_index`).
        slot: the feature slot (:func:`~lasegseg.train.feature_plan.feature_slot`) of the trial that built or
            opened the features.
        folder: the feature cache folder.
    """
    path = _index_file(index, slot)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"path": str(folder)}))


def published_features(index: str | Path | None, slot: str) -> str | None:
    """The folder :func:`publish_features` recorded for feature slot ``slot``, None when there is none."""
    if not index:
        return None
    try:
        return str(json.loads(_index_file(index, slot).read_text())["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
