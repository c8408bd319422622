"""Frozen-backbone feature cache: every slice's backbone features computed once, kept as memory-mapped fp16.

In frozen mode the backbone output of a cached slice never changes, so a sweep computes it once per distinct
backbone and every frozen decoder trains and evaluates on it (no backbone pass per epoch). Layout of
``<slice cache dir>/features/<key>/``::

    level_0.npy … level_{L-1}.npy   float16 (N, h, w, C): row i is slice row i of the slice cache, stored
                                    channels-last so a batch becomes a channels-last (B, C, h, w) view for free
    manifest.json                   version, key, backbone source + fingerprint + layer taps, slice-cache key,
                                    rows, shapes, and bytes + sha256 of every level file

``key`` hashes the backbone fingerprint, its layer taps, the slice-cache key (dataset content + preprocessing),
the image size, the compute precision and the storage dtype. A cache is built in a temporary folder and renamed
into place under an exclusive file lock, so concurrent trials never build it twice; a damaged cache (size or hash
mismatch) is discarded and rebuilt, never used. Pure compute: no ray, no mlflow.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lasegseg.config import frozen_backbone
from lasegseg.errors import DataError
from lasegseg.fsio import builder_stamp, discard_dir, sha256_file

logger = logging.getLogger(__name__)

FEATURES_VERSION = 1
FEATURES_DIR = "features"
MANIFEST_FILE = "manifest.json"
STORAGE_DTYPE = "float16"


def features_root(cache: Any) -> Path:
    """``<slice cache dir>/features``: beside the slice caches, so a cache folder's files stay immutable.

    Args:
        cache: an open :class:`~lasegseg.data.cache.SliceCache`.
    """
    return Path(cache.path).parent / FEATURES_DIR


def compute_precision(device: torch.device, amp: str) -> str:
    """``bf16`` when the backbone pass runs under bf16 autocast (GPU, ``amp`` auto/bf16), else ``fp32``."""
    from lasegseg.train.inference import autocast_context

    return "fp32" if isinstance(autocast_context(device, amp), contextlib.nullcontext) else "bf16"


def feature_key(backbone: Any, cache: Any, precision: str) -> str:
    """The folder name of the features of ``backbone`` over ``cache``.

    Args:
        backbone: a :class:`~lasegseg.models.backbones.Backbone`.
        cache: the slice cache.
        precision: ``fp32`` or ``bf16`` (see :func:`compute_precision`).
    """
    from lasegseg.models.backbones import fingerprint

    payload = {
        "version": FEATURES_VERSION,
        "backbone": fingerprint(backbone),
        "layers": list(backbone.layer_indices),
        "slice_cache": cache.key,
        "image_size": int(cache.image_size),
        "precision": precision,
        "dtype": STORAGE_DTYPE,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"{fingerprint(backbone)}-{digest}"


class FeatureCache:
    """Read-only memory-mapped features of one backbone over one slice cache.

    Args:
        path: the feature folder.
        manifest: its parsed ``manifest.json``.

    Attributes:
        levels: one read-only float16 ``(N, h, w, C)`` memmap per tapped block.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.levels = [np.load(self.path / name, mmap_mode="r") for name in manifest["files"]]

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: Literal["full", "size"] = "full") -> FeatureCache:
        """Open and verify a feature folder; raises :class:`DataError` naming the damaged file.

        Args:
            path: ``<features root>/<key>``.
            verify: ``full`` rehashes every level file; ``size`` checks sizes and shapes only (for trials opening a
                cache the sweep driver verified).
        """
        path = Path(path)
        mpath = path / MANIFEST_FILE
        try:
            manifest = json.loads(mpath.read_text())
            files = manifest["files"]
            rows = int(manifest["rows"])
        except OSError as err:
            raise DataError(f"feature manifest '{mpath}' cannot be read: {err.strerror}") from None
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"feature manifest '{mpath}' is damaged ({type(err).__name__}: {err})") from None
        if manifest.get("version") != FEATURES_VERSION or manifest.get("key") != path.name:
            raise DataError(f"feature manifest '{mpath}' is for another version or key")
        for name, record in files.items():
            fpath = path / name
            try:
                size = fpath.stat().st_size
            except OSError:
                raise DataError(f"feature file '{fpath}' is missing") from None
            if size != record["bytes"]:
                raise DataError(f"feature file '{fpath}' is truncated or altered: {size} bytes, manifest says "
                                f"{record['bytes']}")  # fmt: skip
            if verify == "full" and sha256_file(fpath) != record["sha256"]:
                raise DataError(f"feature file '{fpath}' is corrupt: its sha256 does not match the manifest")
        try:
            out = cls(path, manifest)
        except (OSError, ValueError) as err:
            raise DataError(f"feature cache '{path}' cannot be memory-mapped: {err}") from None
        for name, level in zip(files, out.levels, strict=True):
            if level.dtype != np.float16 or level.ndim != 4 or level.shape[0] != rows:
                raise DataError(f"feature file '{path / name}' has shape {level.shape} {level.dtype}, expected "
                                f"({rows}, h, w, C) float16")  # fmt: skip
        return out

    @property
    def key(self) -> str:
        return str(self.manifest["key"])

    def __len__(self) -> int:
        return int(self.manifest["rows"])

    def matches(self, backbone: Any, cache: Any) -> bool:
        """Whether these are the features of ``backbone``'s weights over ``cache``'s slices."""
        from lasegseg.models.backbones import fingerprint

        m = self.manifest
        return (
            m.get("backbone_fingerprint") == fingerprint(backbone)
            and m.get("layer_indices") == list(backbone.layer_indices)
            and m.get("slice_cache") == cache.key
            and int(m.get("rows", -1)) == len(cache)
        )

    def batch(self, rows: np.ndarray, device: torch.device) -> list[torch.Tensor]:
        """Float32 channels-last ``(B, C, h, w)`` maps of ``rows`` on ``device``.

        fp16 crosses to the device (half the bytes, pinned and non-blocking on CUDA) and is widened there.

        Args:
            rows: sorted slice-cache row indices (sorted rows read sequential pages).
            device: where the decoder runs.
        """
        out = []
        for level in self.levels:
            host = torch.from_numpy(np.ascontiguousarray(level[rows]))
            out.append(to_device(host, device).float().permute(0, 3, 1, 2))
        return out

    def __reduce__(self):
        return (_reopen, (str(self.path),))


def _reopen(path: str) -> FeatureCache:
    return FeatureCache.open(path, verify="size")


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device copy; on CUDA through pinned memory without blocking (torch's host allocator reuses it)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


def get_or_build_features(
    backbone: Any,
    cache: Any,
    *,
    device: torch.device | str = "cpu",
    amp: str = "auto",
    batch_size: int = 32,
    verify: Literal["full", "size"] = "full",
    stats: dict[str, Any] | None = None,
) -> FeatureCache:
    """Open the features of ``backbone`` over ``cache``, computing them first if needed (once across processes).

    Args:
        backbone: a frozen :class:`~lasegseg.models.backbones.Backbone` (put in eval mode here).
        cache: the slice cache.
        device: where the backbone pass runs.
        amp: ``train.amp``; bf16 autocast on GPU is part of the key.
        batch_size: slices per backbone pass.
        verify: how an existing cache is checked (see :meth:`FeatureCache.open`).
        stats: gets ``built`` True when this call computed the features (for a sweep's per-node build counts).
    """
    device = torch.device(device)
    precision = compute_precision(device, amp)
    root = features_root(cache)
    key = feature_key(backbone, cache, precision)
    final = root / key
    opened = _try_open(final, verify)
    if opened is not None:
        return opened
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{key}.lock"):
        # Another process may have finished the build while this one waited for the lock.
        opened = _try_open(final, verify)
        if opened is not None:
            return opened
        build_features(backbone, cache, final, device=device, amp=amp, batch_size=batch_size)
        if stats is not None:
            stats["built"] = True
    return FeatureCache.open(final, verify="size")


def _try_open(final: Path, verify: Literal["full", "size"]) -> FeatureCache | None:
    if not final.exists():
        return None
    try:
        return FeatureCache.open(final, verify=verify)
    except DataError as err:
        logger.warning("rebuilding feature cache: %s", err)
        discard_dir(final)
        return None


def build_features(
    backbone: Any, cache: Any, final: Path, *, device: torch.device, amp: str, batch_size: int = 32
) -> Path:
    """Run the backbone over every slice row of ``cache`` and write the level files + manifest to ``final``.

    Args:
        backbone: the frozen backbone.
        cache: the slice cache.
        final: destination folder (written through a temporary sibling and renamed).
        device: where the backbone runs.
        amp: ``train.amp``.
        batch_size: slices per pass.
    """
    from lasegseg.models.backbones import fingerprint
    from lasegseg.train.inference import autocast_context

    n = len(cache)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    was_training = backbone.training
    backbone.eval()
    try:
        maps: list[np.ndarray] = []
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                host = torch.from_numpy(np.array(cache.images[start : start + batch_size]))[:, None]
                x = to_device(host, device).float()
                with autocast_context(device, amp):
                    feats = backbone(x)
                if not maps:
                    maps = [
                        np.lib.format.open_memmap(
                            tmp / f"level_{i}.npy",
                            mode="w+",
                            dtype=np.float16,
                            shape=(n, f.shape[2], f.shape[3], f.shape[1]),
                        )  # fmt: skip
                        for i, f in enumerate(feats)
                    ]
                for out, f in zip(maps, feats, strict=True):
                    out[start : start + len(x)] = f.permute(0, 2, 3, 1).to(torch.float16).cpu().numpy()
        names = []
        for out in maps:
            out.flush()
            names.append(Path(out.filename).name)
        del maps
        manifest = {
            "version": FEATURES_VERSION,
            "key": final.name,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "builder": builder_stamp(),
            "backbone_source": str(getattr(backbone, "source", "")),
            "backbone_fingerprint": fingerprint(backbone),
            "layer_indices": list(backbone.layer_indices),
            "slice_cache": cache.key,
            "image_size": int(cache.image_size),
            "precision": compute_precision(device, amp),
            "dtype": STORAGE_DTYPE,
            "rows": n,
            "files": {name: _file_record(tmp / name) for name in names},
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST_FILE).exists():
                raise
            logger.info("feature cache %s was built concurrently; keeping that one", final)
    finally:
        backbone.train(was_training)
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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


def distinct_frozen_backbones(trials: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The flat configs of the first trial of each distinct frozen backbone that would use the feature cache.

    Args:
        trials: flat trial configs of a sweep.
    """
    seen: dict[str, dict[str, Any]] = {}
    for flat in trials:
        if uses_feature_cache(flat):
            seen.setdefault(feature_slot(flat), flat)
    return list(seen.values())


def feature_slot(flat: dict[str, Any]) -> str:
    """Which feature cache of a sweep a trial reads: backbone, registers and precision setting (the sweep's trials
    share one slice cache)."""
    return f"{flat['model.backbone']}|{flat.get('model.registers', False)}|{flat.get('train.amp', 'auto')}"


def uses_feature_cache(flat: dict[str, Any]) -> bool:
    """Whether a trial with this flat config trains on cached features (frozen, no augmentation, cache on)."""
    return (
        frozen_backbone(flat)
        and flat.get("train.augment", "none") == "none"
        and bool(flat.get("train.feature_cache", True))
    )


def build_sweep_features(trials: Sequence[dict[str, Any]], cache: Any, *, device: str | None = None) -> dict[str, str]:
    """Build (or verify) the feature cache of every distinct frozen backbone of a sweep, once, before any trial.

    Args:
        trials: the sweep's flat trial configs.
        cache: the slice cache the trials share.
        device: where the backbone passes run (default CUDA when available).

    Returns:
        ``{feature_slot(flat): folder}`` for the trials to memory-map.
    """
    import time

    from lasegseg.config import from_flat
    from lasegseg.models.segmenter import load_backbone

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict[str, str] = {}
    for flat in distinct_frozen_backbones(trials):
        cfg = from_flat(flat)
        if cfg.data.image_size != cache.image_size:
            continue
        t0 = time.perf_counter()
        backbone = load_backbone(cfg.model.backbone, registers=cfg.model.registers).to(device).requires_grad_(False)
        feats = get_or_build_features(
            backbone, cache, device=device, amp=cfg.train.amp, batch_size=max(32, cfg.train.batch_size)
        )
        logger.info(
            "feature cache for backbone %s: %s (%d slices, %.1f s)",
            cfg.model.backbone, feats.path, len(feats), time.perf_counter() - t0,
        )  # fmt: skip
        out[feature_slot(flat)] = str(feats.path)
    return out
