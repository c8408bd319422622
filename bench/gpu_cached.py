"""The cached-feature frozen rows: the path a sweep's frozen trials run. Each size's decoder levels are computed once
for a few batches of slices and stored as a sweep stores them (fp16 memory maps, lasegseg's writer), then the same
decoder steps read their batches through each feed (:data:`~bench.gpu_shapes.FEEDS`) and are compared with the
backbone-every-step frozen row."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.gpu_model import build_segmenter, make_step
from bench.gpu_shapes import VitShape, shapes_for
from bench.gpu_timing import free_memory, is_oom, time_steps
from lasegseg.train.feature_build import _write_levels
from lasegseg.train.feature_residency import PrefetchFeatures, ResidentFeatures
from lasegseg.train.features import FeatureCache


class _Slices:
    """``n`` random fp16 slices in [0, 1] standing in for a slice cache (what the feature writer reads)."""

    def __init__(self, n: int, image_size: int) -> None:
        self.images = np.random.default_rng(1).random((n, image_size, image_size), np.float32).astype(np.float16)

    def __len__(self) -> int:
        return len(self.images)


def cached_features(seg, n: int, batch: int, image_size: int, device, folder: Path):
    """The decoder's levels of ``n`` random slices, computed once and stored as a sweep stores them: lasegseg's
    feature writer (bf16 autocast on CUDA) fills fp16 ``(N, h, w, C)`` memory maps in ``folder``, opened with its
    reader."""
    _write_levels(seg.backbone, _Slices(n, image_size), folder, seg.levels, device=device, amp="auto",
                  batch_size=batch)  # fmt: skip
    return FeatureCache(folder, {"levels": list(seg.levels), "rows": n, "key": folder.name})


def row_stream(n: int, batch: int, seed: int = 0):
    """Endless sorted batches of rows ``0..n-1``, epoch after epoch of shuffled order, as a trial reads them."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            yield np.sort(order[start : start + batch])


def feed_reader(feats, feed: str, device):
    """The reader of one feed: ``host`` (per-step gather + pinned copy on the training thread, lasegseg's reader
    before training features were held or prefetched), ``resident`` (every row held on the device) or ``prefetch``
    (gather and copy on a background thread)."""
    if feed == "resident":
        return ResidentFeatures(feats, np.arange(len(feats)), device)
    if feed == "prefetch":
        return PrefetchFeatures(feats)
    return feats


def measure_feed(seg, feats, feed: str, shape: VitShape, args, device, frozen_img_s: float | None) -> dict:
    """Decoder training steps (as the frozen row's, without the backbone) on batches read through ``feed``."""
    batch, n = shape.batch_frozen, len(feats)
    row = {"model": shape.name, "feed": feed, "batch": batch, "slices": n}
    stream = None
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        reader = feed_reader(feats, feed, device)
        held_s = time.perf_counter() - t0
        stream = reader.batches(row_stream(n, batch), device)
        step = make_step(seg, lambda x: seg.decode(next(stream), x), batch, args.image_size, device)
        per_step, steps, _ = time_steps(step, device, warmup=args.warmup, seconds=args.seconds)
        img_s = batch / per_step
        row.update(img_s=img_s, step_ms=per_step * 1e3, steps=steps, status="ok")
        row["copy_mb"] = 0.0 if feed == "resident" else batch * feats.row_bytes() / 1e6
        row["vs_frozen"] = img_s / frozen_img_s if frozen_img_s else None
        if device.type == "cuda":
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if feed == "resident":
            row["status"] = f"ok (held in {held_s:.1f} s)"
    except Exception as exc:  # noqa: BLE001 - one failing row must not end the benchmark
        row["status"] = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).strip()[:80]}"
    finally:
        if stream is not None:
            stream.close()  # ends a prefetch thread
        stream = reader = step = None
        free_memory(device)
    return row


def measure_cached(shape: VitShape, feeds: list[str], args, device, frozen_img_s, over_budget) -> list[dict]:
    """The cached-feature frozen rows of one shape: features of ``--cached-slices`` slices computed once, then one
    row per feed."""
    batch = shape.batch_frozen
    n = args.cached_slices or 4 * batch
    rows, seg = [], None
    with tempfile.TemporaryDirectory(prefix="lasegseg-gpu-features-") as tmp:
        try:
            seg = build_segmenter(shape, mode="frozen", decoder=args.decoder, image_size=args.image_size, device=device)
            feats = cached_features(seg, n, batch, args.image_size, device, Path(tmp))
            for feed in feeds:
                if over_budget():
                    rows.append({"model": shape.name, "feed": feed, "batch": batch, "status": "skipped (time budget)"})
                    continue
                t0 = time.monotonic()
                rows.append(measure_feed(seg, feats, feed, shape, args, device, frozen_img_s))
                print(f"  {shape.name} cached/{feed}: {rows[-1]['status']} ({time.monotonic() - t0:.1f} s)", flush=True)
        except Exception as exc:  # noqa: BLE001 - computing the features failed: every feed of the shape says why
            status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).strip()[:80]}"
            done = {r["feed"] for r in rows}
            rows += [{"model": shape.name, "feed": f, "batch": batch, "status": status} for f in feeds if f not in done]
        finally:
            seg = feats = None
            free_memory(device)
    return rows


def cached_rows(sizes: list[str], feeds: list[str], args, device, rows: list[dict], over_budget) -> list[dict]:
    """The cached-feature frozen rows of every size, each feed compared with the size's frozen row."""
    out = []
    for size in sizes if feeds else []:
        shape = shapes_for(args)[size]
        frozen = [r["img_s"] for r in rows if r["model"] == shape.name and r["mode"] == "frozen" and r.get("img_s")]
        if over_budget():
            out += [{"model": shape.name, "feed": f, "batch": 0, "status": "skipped (time budget)"} for f in feeds]
            continue
        out += measure_cached(shape, feeds, args, device, frozen[0] if frozen else None, over_budget)
    return out
