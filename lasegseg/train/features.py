"""Frozen-backbone feature cache: every slice's backbone features computed once, kept as memory-mapped fp16.

In frozen mode the backbone output of a cached slice never changes, so a sweep computes it once per distinct
backbone and every frozen decoder trains and evaluates on it (no backbone pass per epoch). A cache stores only the
levels its readers need (a decoder declares them in its registry entry; see
:func:`~lasegseg.models.decoders.decoder_levels`): a sweep builds the union over the frozen trials that share the
backbone, so a linear-only sweep stores one level of four. Layout of ``<slice cache dir>/features/<key>/``::

    level_<i>.npy    one per stored level i (an index into the backbone's layer taps, 0 = shallowest): float16
                     (N, h, w, C), row r is slice row r of the slice cache, stored channels-last so a batch becomes
                     a channels-last (B, C, h, w) view for free
    manifest.json    version, key, backbone source + fingerprint + layer taps, the stored levels and their blocks,
                     slice-cache key, rows, and bytes + sha256 of every level file

``key`` hashes the backbone fingerprint, its layer taps, the stored levels, the slice-cache key (dataset content +
preprocessing), the image size, the compute precision and the storage dtype. A reader asks for its levels and is
served by the cache of exactly those or, failing that, by the smallest one that holds them all. A cache is built in a
temporary folder and renamed into place under an exclusive file lock, so concurrent trials never build it twice; a
damaged cache (size or hash mismatch) is discarded and rebuilt, never used. A trial trains through
:meth:`FeatureCache.for_training`: its training rows held on its device when they fit (a batch is then an
``index_select`` there), else gathered and copied ahead of it on a thread. Pure compute: no ray, no mlflow.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import queue
import shutil
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lasegseg.config import frozen_backbone
from lasegseg.errors import DataError
from lasegseg.fsio import builder_stamp, discard_dir, sha256_file

logger = logging.getLogger(__name__)

# 2: a cache stores only the requested levels (``levels`` in the manifest and the key).
FEATURES_VERSION = 2
FEATURES_DIR = "features"
MANIFEST_FILE = "manifest.json"
STORAGE_DTYPE = "float16"
# A trial holds its training rows' features on its GPU when they take at most this share of its part of the card:
# the memory free when it starts, capped at its Ray GPU share of the whole (``resources.frozen_gpus_per_trial``), so
# that trials packed on one card hold at most this fraction of it together whatever order they start in. The rest
# stays for the decoders' activations and optimizer state.
RESIDENT_DEVICE_FRACTION = 0.25
# On the CPU a trial reads the memory map: its pages sit in the page cache once for every trial of the node, while a
# resident copy would add those rows to each trial's own memory. Measured with the map cached, a batch costs the same
# either way (≈ 10 ms for 16 ViT-S-sized rows of four levels: widening to fp32 dominates), so the CPU budget is 0.
RESIDENT_HOST_BYTES = 0
# Batches a prefetching reader sends ahead of the training thread (each a batch's fp16 maps on the device).
PREFETCH_DEPTH = 2
_LOAD_CHUNK_BYTES = 64 * 2**20  # rows copied to the device per pinned transfer while a resident reader loads


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


def level_file(level: int) -> str:
    """The file name of a stored level (an index into the backbone's layer taps)."""
    return f"level_{level}.npy"


def feature_identity(backbone: Any, cache: Any, precision: str) -> dict[str, Any]:
    """Everything a feature cache's values depend on: recorded in its manifest, hashed (with its levels) into its key.

    Args:
        backbone: a :class:`~lasegseg.models.backbones.Backbone`.
        cache: the slice cache.
        precision: ``fp32`` or ``bf16`` (see :func:`compute_precision`).
    """
    from lasegseg.models.backbones import fingerprint

    return {
        "version": FEATURES_VERSION,
        "backbone_fingerprint": fingerprint(backbone),
        "layer_indices": list(backbone.layer_indices),
        "slice_cache": cache.key,
        "image_size": int(cache.image_size),
        "precision": precision,
        "dtype": STORAGE_DTYPE,
    }


def stored_levels(backbone: Any, levels: Iterable[int] | None) -> tuple[int, ...]:
    """``levels`` as a cache stores them: valid for ``backbone``, distinct, sorted; None means every tapped level."""
    return tuple(sorted(backbone.check_levels(None if levels is None else list(levels))))


def feature_key(backbone: Any, cache: Any, precision: str, levels: Iterable[int] | None = None) -> str:
    """The folder name of the features of ``backbone``'s ``levels`` over ``cache``.

    Args:
        backbone: a :class:`~lasegseg.models.backbones.Backbone`.
        cache: the slice cache.
        precision: ``fp32`` or ``bf16`` (see :func:`compute_precision`).
        levels: indices into ``backbone.layer_indices``; None for all.
    """
    identity = feature_identity(backbone, cache, precision)
    payload = {**identity, "levels": list(stored_levels(backbone, levels))}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    return f"{identity['backbone_fingerprint']}-{digest}"


class FeatureCache:
    """Read-only memory-mapped features of one backbone over one slice cache, read as some of the levels it stores.

    Args:
        path: the feature folder.
        manifest: its parsed ``manifest.json``.
        levels: the levels :meth:`batch` returns, in this order (use :meth:`reader`); None for every stored one.

    Attributes:
        stored: the levels the folder holds (indices into the backbone's layer taps), sorted.
        maps: ``{level: read-only float16 (N, h, w, C) memmap}`` for every stored level.
        levels: the levels :meth:`batch` returns.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], levels: Sequence[int] | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.stored = tuple(int(i) for i in manifest["levels"])
        self.maps = {i: np.load(self.path / level_file(i), mmap_mode="r") for i in self.stored}
        self.levels = self.stored if levels is None else tuple(levels)

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
            names = {level_file(int(i)) for i in manifest["levels"]}
        except OSError as err:
            raise DataError(f"feature manifest '{mpath}' cannot be read: {err.strerror}") from None
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"feature manifest '{mpath}' is damaged ({type(err).__name__}: {err})") from None
        if manifest.get("version") != FEATURES_VERSION or manifest.get("key") != path.name:
            raise DataError(f"feature manifest '{mpath}' is for another version or key")
        if set(files) != names or not names:
            raise DataError(f"feature manifest '{mpath}' lists files {sorted(files)} for levels {manifest['levels']}")
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
        for i, level in out.maps.items():
            if level.dtype != np.float16 or level.ndim != 4 or level.shape[0] != rows:
                raise DataError(f"feature file '{path / level_file(i)}' has shape {level.shape} {level.dtype}, "
                                f"expected ({rows}, h, w, C) float16")  # fmt: skip
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

    def holds(self, levels: Iterable[int]) -> bool:
        """Whether this folder stores every one of ``levels``."""
        return set(levels) <= set(self.stored)

    def reader(self, levels: Sequence[int]) -> FeatureCache:
        """This cache read as ``levels`` (a decoder's, in its order): :meth:`batch` returns exactly their maps.

        Args:
            levels: indices into the backbone's layer taps; each must be stored (DataError names the missing ones).
        """
        levels = tuple(int(i) for i in levels)
        missing = sorted(set(levels) - set(self.stored))
        if missing:
            raise DataError(f"feature cache '{self.path}' stores levels {list(self.stored)}, not {missing}")
        return FeatureCache(self.path, self.manifest, levels)

    def batch(self, rows: np.ndarray, device: torch.device) -> list[torch.Tensor]:
        """Float32 channels-last ``(B, C, h, w)`` maps of ``rows`` on ``device``, one per level in :attr:`levels`.

        fp16 crosses to the device (half the bytes, pinned and non-blocking on CUDA) and is widened there.

        Args:
            rows: sorted slice-cache row indices (sorted rows read sequential pages).
            device: where the decoder runs.
        """
        return [widen(half) for half in self.send(rows, device)]

    def send(self, rows: np.ndarray, device: torch.device) -> list[torch.Tensor]:
        """The fp16 ``(B, h, w, C)`` maps of ``rows`` on ``device`` as stored, one per level (:meth:`batch` before
        :func:`widen`)."""
        return [to_device(torch.from_numpy(np.ascontiguousarray(self.maps[i][rows])), device) for i in self.levels]

    def batches(self, batches: Iterable[np.ndarray], device: torch.device) -> Iterator[list[torch.Tensor]]:
        """:meth:`batch` of every row batch of ``batches``, in order (an epoch's reads; see :meth:`for_training`).

        Args:
            batches: sorted slice-cache row indices, one array per batch.
            device: where the decoder runs.
        """
        for rows in batches:
            yield self.batch(rows, device)

    def row_bytes(self) -> int:
        """Bytes of one slice row's maps over :attr:`levels` as stored (fp16)."""
        return sum(int(np.prod(self.maps[i].shape[1:])) * self.maps[i].itemsize for i in self.levels)

    def for_training(
        self, rows: np.ndarray, device: torch.device | str, *, budget_bytes: int | None = None, share: float = 1.0
    ) -> FeatureCache:
        """This reader as a trial trains from it: ``rows`` held on ``device`` when they fit, else prefetched.

        Held rows (:class:`ResidentFeatures`) make a batch an ``index_select`` on the device. Rows that do not fit
        on a GPU are gathered, pinned and copied by a background thread (:class:`PrefetchFeatures`); on the CPU they
        are read from the memory map as by :meth:`batch`. Every path returns :meth:`batch`'s values exactly, and the
        reader still serves any other row (validation, test) from the map.

        Args:
            rows: the slice rows the trial trains on.
            device: where the decoder runs.
            budget_bytes: the most bytes to hold; default :func:`resident_budget` of ``device`` and ``share``.
            share: this trial's share of the device (its Ray GPU fraction; 1 when it has the device to itself).
        """
        device = _concrete(torch.device(device))
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        need = len(rows) * self.row_bytes()
        budget = resident_budget(device, share) if budget_bytes is None else budget_bytes
        if need <= budget:
            try:
                held = ResidentFeatures(self, rows, device)
            except torch.OutOfMemoryError:
                logger.warning("training features (%.2f GiB) did not fit on %s after all", need / 2**30, device)
            else:
                logger.info("training features held on %s: %d rows, %.2f GiB", device, len(rows), need / 2**30)
                return held
        if device.type == "cuda":
            logger.info("training features prefetched to %s: %.2f GiB (budget %.2f GiB)", device, need / 2**30,
                        budget / 2**30)  # fmt: skip
            return PrefetchFeatures(self)
        return self

    def __reduce__(self):
        return (_reopen, (str(self.path), self.levels))


def resident_budget(device: torch.device, share: float = 1.0) -> int:
    """Bytes of training features a trial may hold on ``device``: :data:`RESIDENT_DEVICE_FRACTION` of the GPU memory
    free now, but at most of ``share`` × the card's memory (a packed trial's part), or :data:`RESIDENT_HOST_BYTES`
    on the CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(min(free, total * max(0.0, share)) * RESIDENT_DEVICE_FRACTION)
    if device.type == "cpu":
        return RESIDENT_HOST_BYTES
    return 0


def _concrete(device: torch.device) -> torch.device:
    """``device`` with its index: ``cuda`` is the current GPU (a background thread's current GPU may differ)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class ResidentFeatures(FeatureCache):
    """A reader that holds some rows' maps on a device as one fp16 ``(n, h, w, C)`` tensor per level.

    A batch of held rows is an ``index_select`` on the device, widened and permuted there as :meth:`batch` does, so
    its values are those of the memory-mapped path exactly; a batch with any other row (or for another device) is
    read from the map. Pickling gives the plain memory-mapped reader.

    Args:
        base: the reader whose levels are held.
        rows: the slice rows to hold.
        device: where to hold them.

    Attributes:
        rows: the held rows, sorted.
        store: one fp16 tensor per level of :attr:`levels`; row ``k`` is slice row ``rows[k]``.
    """

    def __init__(self, base: FeatureCache, rows: np.ndarray, device: torch.device | str) -> None:
        super().__init__(base.path, base.manifest, base.levels)
        self.device = _concrete(torch.device(device))
        self.rows = np.unique(np.asarray(rows, dtype=np.int64))
        self.store = [self._load(self.maps[i]) for i in self.levels]

    def _load(self, level: np.ndarray) -> torch.Tensor:
        if self.device.type == "cpu":
            return torch.from_numpy(np.ascontiguousarray(level[self.rows]))
        out = torch.empty((len(self.rows), *level.shape[1:]), dtype=torch.float16, device=self.device)
        step = max(1, _LOAD_CHUNK_BYTES // max(1, level[:1].nbytes))
        for start in range(0, len(self.rows), step):
            host = torch.from_numpy(np.ascontiguousarray(level[self.rows[start : start + step]]))
            out[start : start + len(host)].copy_(host.pin_memory(), non_blocking=True)
        return out

    def positions(self, rows: np.ndarray) -> np.ndarray | None:
        """Where ``rows`` are in :attr:`store`, or None when any of them is not held."""
        rows = np.asarray(rows, dtype=np.int64)
        pos = np.searchsorted(self.rows, rows)
        if not len(rows) or (pos >= len(self.rows)).any() or (self.rows[pos] != rows).any():
            return None
        return pos

    def batch(self, rows: np.ndarray, device: torch.device) -> list[torch.Tensor]:
        """As :meth:`FeatureCache.batch`; held rows come from the device copy."""
        pos = self.positions(rows)
        if pos is None or _concrete(torch.device(device)) != self.device:
            return super().batch(rows, device)
        index = to_device(torch.from_numpy(pos), self.device)
        return [widen(held.index_select(0, index)) for held in self.store]


class PrefetchFeatures(FeatureCache):
    """A reader whose :meth:`batches` are sent to the device by a background thread, up to :data:`PREFETCH_DEPTH`
    ahead of the training thread.

    The thread does :meth:`send` (gather from the map, pin, copy without blocking) on a CUDA stream of its own, so the
    copies overlap the training kernels; the training thread's stream waits for a batch's copy, then widens it as
    :meth:`batch` does (queued batches stay fp16: half the device memory). Batches come in order; an error in the
    thread is raised by the iterator; the thread ends after the last batch, or when the iterator is closed or dropped.

    Args:
        base: the reader to prefetch from (its levels).
    """

    def __init__(self, base: FeatureCache) -> None:
        super().__init__(base.path, base.manifest, base.levels)

    def batches(self, batches: Iterable[np.ndarray], device: torch.device) -> Iterator[list[torch.Tensor]]:
        """:meth:`batch` of every row batch of ``batches``, in order, prepared ahead on a thread.

        Args:
            batches: sorted slice-cache row indices, one array per batch (read by the thread, lazily).
            device: where the decoder runs.
        """
        device = _concrete(torch.device(device))
        ahead: queue.Queue = queue.Queue(maxsize=PREFETCH_DEPTH)
        stop = threading.Event()
        worker = threading.Thread(
            target=self._produce, args=(iter(batches), device, ahead, stop), name="feature-prefetch", daemon=True
        )
        worker.start()
        try:
            while True:
                kind, item = ahead.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise item
                halves, ready = item
                if ready is not None:
                    stream = torch.cuda.current_stream(device)
                    stream.wait_event(ready)
                    for half in halves:  # allocated on the copy stream, read on this one
                        half.record_stream(stream)
                yield [widen(half) for half in halves]
        finally:
            stop.set()
            worker.join()

    def _produce(self, batches: Iterator[np.ndarray], device: torch.device, ahead: queue.Queue, stop) -> None:
        """The thread: each batch's fp16 maps and the event its copy records, then ``end``; or the error that
        stopped it."""
        try:
            stream = torch.cuda.Stream(device) if device.type == "cuda" else None
            for rows in batches:
                if stop.is_set():
                    return
                ready = None
                with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                    halves = self.send(rows, device)
                    if stream is not None:
                        ready = torch.cuda.Event()
                        ready.record(stream)
                if not _offer(ahead, ("batch", (halves, ready)), stop):
                    return
            _offer(ahead, ("end", None), stop)
        except BaseException as err:  # noqa: BLE001 - handed to the training thread, which raises it
            _offer(ahead, ("error", err), stop)


def _offer(ahead: queue.Queue, item: tuple, stop: threading.Event) -> bool:
    """Put ``item`` once there is room; False (not put) when ``stop`` is set first."""
    while not stop.is_set():
        try:
            ahead.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def widen(half: torch.Tensor) -> torch.Tensor:
    """A stored fp16 ``(B, h, w, C)`` map as the decoder reads it: float32, a channels-last ``(B, C, h, w)`` view."""
    return half.float().permute(0, 3, 1, 2)


def _reopen(path: str, levels: tuple[int, ...]) -> FeatureCache:
    return FeatureCache.open(path, verify="size").reader(levels)


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host → device copy; on CUDA through pinned memory without blocking (torch's host allocator reuses it)."""
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host


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


def _write_levels(
    backbone: Any, cache: Any, folder: Path, levels: Sequence[int], *, device: torch.device, amp: str, batch_size: int
) -> list[str]:
    """One backbone pass over the slices, asking it only for ``levels``; their maps go to ``folder``'s level files.

    Returns:
        The file names written, in the order of ``levels``.
    """
    from lasegseg.train.inference import autocast_context

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


def slot_readers(trials: Sequence[dict[str, Any]]) -> dict[str, tuple[str, ...]]:
    """The decoders that read each feature cache of a sweep: ``{feature_slot: sorted distinct model.decoder}``.

    Args:
        trials: flat trial configs of a sweep.
    """
    readers: dict[str, set[str]] = {}
    for flat in trials:
        if uses_feature_cache(flat):
            readers.setdefault(feature_slot(flat), set()).add(flat["model.decoder"])
    return {slot: tuple(sorted(names)) for slot, names in readers.items()}


def levels_read(decoders: Iterable[str], num_levels: int) -> tuple[int, ...]:
    """The union of the levels ``decoders`` read from a backbone with ``num_levels`` taps, sorted.

    Args:
        decoders: registered decoder names.
        num_levels: the backbone's ``num_features_levels``.
    """
    from lasegseg.models.decoders import decoder_levels

    return tuple(sorted({i for name in decoders for i in decoder_levels(name, num_levels)}))


def feature_slot(flat: dict[str, Any]) -> str:
    """Which feature cache of a sweep a trial reads: backbone, registers, precision setting and the preprocessing
    of the slices it encodes (a sweep may mix image sizes)."""
    keys = ("data.image_size", "data.clip_low", "data.clip_high")
    prep = "|".join(str(flat[k]) for k in keys if k in flat)
    return f"{flat['model.backbone']}|{flat.get('model.registers', False)}|{flat.get('train.amp', 'auto')}|{prep}"


def uses_feature_cache(flat: dict[str, Any]) -> bool:
    """Whether a trial with this flat config trains on cached features (frozen, no augmentation, cache on)."""
    return (
        frozen_backbone(flat)
        and flat.get("train.augment", "none") == "none"
        and bool(flat.get("train.feature_cache", True))
    )


def build_slot_features(
    flat: dict[str, Any], decoders: Iterable[str], cache: Any, *, device: str, stats: dict[str, Any] | None = None
) -> FeatureCache:
    """Open or build one feature slot's cache: the levels its ``decoders`` read, together, in one backbone pass.

    Args:
        flat: the flat config of a trial of the slot (backbone, registers, amp, batch size).
        decoders: the decoders of the slot's trials (see :func:`slot_readers`).
        cache: the slice cache the trials share.
        device: where the backbone pass runs.
        stats: as for :func:`get_or_build_features`.
    """
    from lasegseg.config import from_flat
    from lasegseg.models.segmenter import load_backbone

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
        ``{feature_slot(flat): folder}`` for the trials to memory-map.
    """
    import time

    from lasegseg.config import from_flat

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
