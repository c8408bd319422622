"""Computing a backbone's features once: open the cache that serves a reader, else build it under a lock.

A reader asks for its levels and is served by the cache of exactly those or, failing that, by the smallest valid one
that holds them all (see :mod:`lasegseg.train.features` for the key and the files). A cache is built in a temporary
folder and published with :func:`~lasegseg.fsio.publish_dir` under an exclusive file lock, so concurrent trials never
build it twice; a damaged cache (size or hash mismatch) is discarded and rebuilt, never used. A sweep builds each of
its feature slots once, with the union of the levels its frozen decoders read (:func:`build_sweep_features`).
Pure compute: no ray, no mlflow.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lasegseg.config import from_flat
from lasegseg.errors import DataError
from lasegseg.fsio import builder_stamp, discard_dir, publish_dir, sha256_file
from lasegseg.models.decoders import decoder_levels
from lasegseg.models.segmenter import load_backbone
from lasegseg.train.feature_plan import distinct_frozen_backbones, feature_slot, slot_readers
from lasegseg.train.features import (
    MANIFEST_FILE,
    FeatureCache,
    compute_precision,
    feature_identity,
    feature_key,
    features_root,
    level_file,
    stored_levels,
)
from lasegseg.train.inference import autocast_context, to_device

logger = logging.getLogger(__name__)


def get_or_build_features(
    backbone: Any,
    cache: Any,
    *,
    levels: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
    amp: str = "auto",
    batch_size: int = 32,
    verify: Literal["full", "size"] = "full",
    stats: dict[str, Any] | None = None,
) -> FeatureCache:
    """The features of ``backbone``'s ``levels`` over ``cache``, read from a cache that holds them or computed first
    (once across processes).

    Args:
        backbone: a frozen :class:`~lasegseg.models.backbones.Backbone` (put in eval mode here).
        cache: the slice cache.
        levels: indices into ``backbone.layer_indices`` the reader needs, in its order; None for all. The cache of
            exactly these serves them, else the smallest valid one that holds them all, else they are computed.
        device: where the backbone pass runs.
        amp: ``train.amp``; bf16 autocast on GPU is part of the key.
        batch_size: slices per backbone pass.
        verify: how an existing cache is checked (see :meth:`FeatureCache.open`).
        stats: gets ``built`` True when this call computed the features (for a sweep's per-node build counts).

    Returns:
        A :meth:`FeatureCache.reader` whose batches hold exactly ``levels``.
    """
    device = torch.device(device)
    wanted = backbone.check_levels(None if levels is None else list(levels))
    precision = compute_precision(device, amp)
    identity = feature_identity(backbone, cache, precision)
    root = features_root(cache)
    key = feature_key(backbone, cache, precision, wanted)
    opened = _open_serving(root, key, identity, wanted, verify)
    if opened is None:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root / f".{key}.lock"):
            # Another process may have built these levels (or more) while this one waited for the lock.
            opened = _open_serving(root, key, identity, wanted, verify)
            if opened is None:
                build_features(
                    backbone, cache, root / key, levels=wanted, device=device, amp=amp, batch_size=batch_size
                )
                if stats is not None:
                    stats["built"] = True
                opened = FeatureCache.open(root / key, verify="size")
    return opened.reader(wanted)


def _open_serving(
    root: Path, key: str, identity: dict[str, Any], levels: Sequence[int], verify: Literal["full", "size"]
) -> FeatureCache | None:
    """The valid cache ``key`` (exactly ``levels``), else the valid one with the fewest levels that holds them."""
    for path in [root / key, *_supersets(root, key, identity, levels)]:
        opened = _try_open(path, verify)
        if opened is not None:
            return opened
    return None


def _supersets(root: Path, key: str, identity: dict[str, Any], levels: Sequence[int]) -> list[Path]:
    """Other folders under ``root`` whose manifest has ``identity`` and lists every one of ``levels``, fewest first.

    Temporary, trashed and lock entries start with a dot, so the fingerprint prefix leaves them out.
    """
    if not root.is_dir():
        return []
    found = []
    for path in root.glob(f"{identity['backbone_fingerprint']}-*"):
        try:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
            stored = {int(i) for i in manifest["levels"]}
            same = all(manifest.get(k) == v for k, v in identity.items())
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a feature cache of this format; whoever opens it by its own key handles it
        if path.name != key and same and set(levels) <= stored:
            found.append((len(stored), path.name, path))
    return [path for *_, path in sorted(found)]


def _try_open(final: Path, verify: Literal["full", "size"]) -> FeatureCache | None:
    if not final.exists():
        return None
    try:
        return FeatureCache.open(final, verify=verify)
    except DataError as err:
        logger.warning("discarding damaged feature cache: %s", err)
        discard_dir(final)
        return None


def build_features(
    backbone: Any,
    cache: Any,
    final: Path,
    *,
    levels: Sequence[int] | None = None,
    device: torch.device,
    amp: str,
    batch_size: int = 32,
) -> Path:
    """Run the backbone over every slice row of ``cache`` and write ``levels``' files + manifest to ``final``.

    Args:
        backbone: the frozen backbone.
        cache: the slice cache.
        final: destination folder (written through a temporary sibling and renamed).
        levels: indices into ``backbone.layer_indices`` to store; None for all.
        device: where the backbone runs.
        amp: ``train.amp``.
        batch_size: slices per pass.
    """
    levels = stored_levels(backbone, levels)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    was_training = backbone.training
    backbone.eval()
    try:
        names = _write_levels(backbone, cache, tmp, levels, device=device, amp=amp, batch_size=batch_size)
        manifest = {
            **feature_identity(backbone, cache, compute_precision(device, amp)),
            "key": final.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "builder": builder_stamp(),
            "backbone_source": str(getattr(backbone, "source", "")),
            # What a frozen trial needs to decode these without loading the backbone (models.backbones.BackboneStub).
            "family": str(getattr(backbone, "family", "")),
            "embed_dim": int(backbone.embed_dim),
            "patch_size": int(backbone.patch_size),
            "levels": list(levels),
            "blocks": [backbone.layer_indices[i] for i in levels],
            "rows": len(cache),
            "files": {name: _file_record(tmp / name) for name in names},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        if not publish_dir(tmp, final, complete=lambda path: (path / MANIFEST_FILE).exists()):
            logger.info("feature cache %s was built concurrently; keeping that one", final)
    finally:
        backbone.train(was_training)
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_levels(
    backbone: Any, cache: Any, folder: Path, levels: Sequence[int], *, device: torch.device, amp: str, batch_size: int
) -> list[str]:
    """One backbone pass over the slices, asking it only for ``levels``; their maps go to ``folder``'s level files.

    Returns:
        The file names written, in the order of ``levels``.
    """
    n = len(cache)
    maps: list[np.ndarray] = []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            host = torch.from_numpy(np.array(cache.images[start : start + batch_size]))[:, None]
            x = to_device(host, device).float()
            with autocast_context(device, amp):
                feats = backbone(x, levels)
            if not maps:
                maps = [
                    np.lib.format.open_memmap(
                        folder / level_file(i),
                        mode="w+",
                        dtype=np.float16,
                        shape=(n, f.shape[2], f.shape[3], f.shape[1]),
                    )
                    for i, f in zip(levels, feats, strict=True)
                ]
            for out, f in zip(maps, feats, strict=True):
                out[start : start + len(x)] = f.permute(0, 2, 3, 1).to(torch.float16).cpu().numpy()
    for out in maps:
        out.flush()
    del maps
    return [level_file(i) for i in levels]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (released when the process dies, so a crash never wedges it)."""
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _file_record(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def levels_read(decoders: Iterable[str], num_levels: int) -> tuple[int, ...]:
    """The union of the levels ``decoders`` read from a backbone with ``num_levels`` taps, sorted.

    Args:
        decoders: registered decoder names.
        num_levels: the backbone's ``num_features_levels``.
    """
    return tuple(sorted({i for name in decoders for i in decoder_levels(name, num_levels)}))


def build_slot_features(
    flat: dict[str, Any], decoders: Iterable[str], cache: Any, *, device: str, stats: dict[str, Any] | None = None
) -> FeatureCache:
    """Open or build one feature slot's cache: the levels its ``decoders`` read, together, in one backbone pass.

    Args:
        flat: the flat config of a trial of the slot (backbone, registers, amp, batch size).
        decoders: the decoders of the slot's trials (see :func:`~lasegseg.train.feature_plan.slot_readers`).
        cache: the slice cache the trials share.
        device: where the backbone pass runs.
        stats: as for :func:`get_or_build_features`.
    """
    cfg = from_flat(flat)
    backbone = load_backbone(cfg.model.backbone, registers=cfg.model.registers).to(device).requires_grad_(False)
    return get_or_build_features(
        backbone, cache, levels=levels_read(decoders, backbone.num_features_levels), device=device,
        amp=cfg.train.amp, batch_size=max(32, cfg.train.batch_size), stats=stats,
    )  # fmt: skip


def build_sweep_features(trials: Sequence[dict[str, Any]], cache: Any, *, device: str | None = None) -> dict[str, str]:
    """Build (or verify) the feature cache of every distinct frozen backbone of a sweep, once, before any trial.

    Each cache holds the union of the levels its trials' decoders read.

    Args:
        trials: the sweep's flat trial configs.
        cache: the slice cache the trials share.
        device: where the backbone passes run (default CUDA when available).

    Returns:
        ``{feature_slot(flat): folder}`` for the trials to memory-map (see
        :func:`~lasegseg.train.feature_plan.feature_slot`).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    readers = slot_readers(trials)
    out: dict[str, str] = {}
    for flat in distinct_frozen_backbones(trials):
        cfg = from_flat(flat)
        if cfg.data.image_size != cache.image_size:
            continue
        t0 = time.perf_counter()
        feats = build_slot_features(flat, readers[feature_slot(flat)], cache, device=device)
        logger.info(
            "feature cache for backbone %s: %s (levels %s, %d slices, %.1f s)",
            cfg.model.backbone, feats.path, list(feats.stored), len(feats), time.perf_counter() - t0,
        )  # fmt: skip
        out[feature_slot(flat)] = str(feats.path)
    return out
