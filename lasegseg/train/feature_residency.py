"""Where a trial's training features live: held on its device when they fit, else prefetched on a thread.

:func:`for_training` turns a :class:`~lasegseg.train.features.FeatureCache` reader into the one a trial trains
from: its training rows held on the device as one fp16 tensor per level when they fit the trial's budget
(:class:`ResidentFeatures`: a batch is then an ``index_select`` there), else gathered, pinned and copied ahead of the
training thread on a CUDA stream of their own (:class:`PrefetchFeatures`), or on the CPU read from the shared memory
map. Every path returns the memory-mapped reader's values exactly. Pure compute: no ray, no mlflow.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from lasegseg.train.features import FeatureCache, widen
from lasegseg.train.inference import to_device

logger = logging.getLogger(__name__)

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


def for_training(
    reader: FeatureCache,
    rows: np.ndarray,
    device: torch.device | str,
    *,
    budget_bytes: int | None = None,
    share: float = 1.0,
) -> FeatureCache:
    """``reader`` as a trial trains from it: ``rows`` held on ``device`` when they fit, else prefetched.

    Held rows (:class:`ResidentFeatures`) make a batch an ``index_select`` on the device. Rows that do not fit on a
    GPU are gathered, pinned and copied by a background thread (:class:`PrefetchFeatures`); on the CPU they are read
    from the memory map as by :meth:`~lasegseg.train.features.FeatureCache.batch`. Every path returns ``batch``'s
    values exactly, and the reader still serves any other row (validation, test) from the map.

    Args:
        reader: the features, read as the trial's decoder reads them.
        rows: the slice rows the trial trains on.
        device: where the decoder runs.
        budget_bytes: the most bytes to hold; default :func:`resident_budget` of ``device`` and ``share``.
        share: this trial's share of the device (its Ray GPU fraction; 1 when it has the device to itself).
    """
    device = _concrete(torch.device(device))
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    need = len(rows) * reader.row_bytes()
    budget = resident_budget(device, share) if budget_bytes is None else budget_bytes
    if need <= budget:
        try:
            held = ResidentFeatures(reader, rows, device)
        except torch.OutOfMemoryError:
            logger.warning("training features (%.2f GiB) did not fit on %s after all", need / 2**30, device)
        else:
            logger.info("training features held on %s: %d rows, %.2f GiB", device, len(rows), need / 2**30)
            return held
    if device.type == "cuda":
        logger.info("training features prefetched to %s: %.2f GiB (budget %.2f GiB)", device, need / 2**30,
                    budget / 2**30)  # fmt: skip
        return PrefetchFeatures(reader)
    return reader


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
