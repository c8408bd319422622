"""GPU fast-path benchmark: img/s, MFU and peak memory of DINOv2 ViT-S/B/L/g segmenters at 448 px, and packing.

    python bench/gpu.py                          # all rows + packed sweep, ≤ 8 minutes on an H100
    python bench/gpu.py --quick --write-results  # shorter measurements; append the tables to bench/RESULTS.md
    python bench/gpu.py --compile --sizes S,B    # add torch.compile rows (last; compiling L/g takes minutes)
    python bench/gpu.py --device cpu --smoke     # the same code paths with tiny shapes, seconds (used by the tests)
    python bench/gpu.py --sizes g --modes frozen --pack ''   # ViT-g frozen: backbone every step vs cached features

Rows: each backbone size in two modes — ``frozen`` (backbone under no_grad, decoder forward + backward + AdamW) and
``e2e`` (everything trains; gradient checkpointing for large/giant) — with bf16 autocast on CUDA, SDPA attention and
a channels-last decoder, as lasegseg trains. Backbones are randomly initialised from the official DINOv2 shapes
(no download). FLOPs per image are counted analytically from the ViT shapes (matmuls 2·params per token, attention
4·N²·D per layer, ×3 for forward + backward) and cross-checked with ``torch.utils.flop_counter.FlopCounterMode`` on
one image; the decoder's FLOPs come from the counter. MFU = achieved model FLOP/s (recompute not counted) / the
card's dense bf16 peak. Cached-feature rows are the frozen path a sweep runs: each size's decoder levels are computed
once for a few batches of slices and stored as a sweep stores them (fp16 memory maps, lasegseg's writer), then the
same decoder steps read their batches three ways — ``host`` (gather + pinned copy on the training thread, per step),
``resident`` (every row held on the device; a batch is an index_select there) and ``prefetch`` (gather + copy on a
background thread) — and are compared with the backbone-every-step frozen row. The packed sweep runs K small frozen
trainings as K processes on one GPU at once (what ``resources.frozen_gpus_per_trial`` does in a sweep) and compares
their summed throughput to one running alone. Every measurement is time-boxed; rows that would start after
``--budget`` seconds (default 450) are reported as skipped, and a backbone row that runs out of memory is retried once
at half the batch, then reported as OOM (a cached-feature row is reported as OOM at once).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import math
import multiprocessing as mp
import platform
import queue as queue_lib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "bench" / "RESULTS.md"
PATCH = 14


@dataclasses.dataclass(frozen=True)
class VitShape:
    """A DINOv2 ViT/14 architecture and the batch sizes benchmarked at 448 px on an 80 GB card."""

    name: str
    hidden: int
    layers: int
    heads: int
    swiglu: bool
    batch_frozen: int
    batch_e2e: int

    @property
    def checkpointing(self) -> bool:
        """Gradient checkpointing in e2e mode, as lasegseg turns it on (24+ blocks: large, giant)."""
        return self.name in ("ViT-L/14", "ViT-g/14")

    @property
    def ffn_hidden(self) -> int:
        """MLP width: 4·D, or for SwiGLU two thirds of it rounded up to a multiple of 8 (giant: 4096)."""
        hidden = 4 * self.hidden
        return (int(hidden * 2 / 3) + 7) // 8 * 8 if self.swiglu else hidden


# Official DINOv2 sizes (facebook/dinov2-{small,base,large,giant} config.json).
SHAPES = {
    "S": VitShape("ViT-S/14", 384, 12, 6, False, 64, 32),
    "B": VitShape("ViT-B/14", 768, 12, 12, False, 64, 32),
    "L": VitShape("ViT-L/14", 1024, 24, 16, False, 32, 32),
    "g": VitShape("ViT-g/14", 1536, 40, 24, True, 32, 16),
}
# --smoke: the same four code paths (SwiGLU and checkpointing included) at sizes a CPU runs in seconds.
SMOKE_SHAPES = {
    "S": VitShape("ViT-S/14", 48, 2, 6, False, 2, 2),
    "B": VitShape("ViT-B/14", 96, 2, 12, False, 2, 2),
    "L": VitShape("ViT-L/14", 64, 3, 16, False, 2, 2),
    "g": VitShape("ViT-g/14", 96, 3, 24, True, 2, 2),
}

# Dense (no sparsity) bf16 tensor-core peak in TFLOP/s, by a case-insensitive substring of the device name; first
# match wins, so a variant comes before the plain name it contains: the PCIe H100 before the SXM one ("NVIDIA H100
# 80GB HBM3"), the H200 NVL (PCIe, lower clocks) before the SXM H200. GH200 matches H200: same peak as the SXM card.
PEAK_BF16_TFLOPS: tuple[tuple[str, float | None], ...] = (
    ("H100 NVL", None),  # its clocks differ from both the PCIe and the SXM card: pass --peak-tflops
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10G", 125.0),
    ("RTX 4090", 165.0),
)


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """The card's dense bf16 peak: ``--peak-tflops`` if given, else the table, else None (unknown)."""
    if override:
        return override
    for needle, value in PEAK_BF16_TFLOPS:
        if needle.lower() in device_name.lower():
            return value
    return None


def vit_flops(shape: VitShape, image_size: int, *, backward: bool = False) -> float:
    """FLOPs of one image through the ViT: patch embedding, QKV/output projections, MLP and attention.

    Every matmul costs 2·in·out per token forward and twice that backward (input and weight gradients), except the
    patch embedding, whose input (the image) needs no gradient. Norms, activations, softmax and residual adds are
    left out, as FlopCounterMode leaves them out.

    Args:
        shape: the architecture.
        image_size: square input side in pixels (padded up to a multiple of the patch size, as lasegseg does).
        backward: forward + backward instead of forward only.
    """
    patches = math.ceil(image_size / PATCH) ** 2
    n, d = patches + 1, shape.hidden
    ffn_mats = 3 if shape.swiglu else 2  # SwiGLU: gate, up, down; GELU MLP: fc1, fc2
    per_layer = 2 * n * (4 * d * d + ffn_mats * d * shape.ffn_hidden) + 4 * n * n * d
    embed = 2 * patches * 3 * PATCH * PATCH * d
    if backward:
        return 2 * embed + 3 * shape.layers * per_layer
    return embed + shape.layers * per_layer


# ----------------------------------------------------------------------------------------------- model and steps


def build_segmenter(shape: VitShape, *, mode: str, decoder: str, image_size: int, device):
    """A lasegseg Segmenter over a random DINOv2 of ``shape``, set up as ``build_segmenter`` sets up a trial."""
    import torch
    from transformers import Dinov2Config, Dinov2Model

    from lasegseg.models.backbones import Backbone, _even_indices
    from lasegseg.models.decoders import create_decoder
    from lasegseg.models.segmenter import NUM_CLASSES, Segmenter

    config = Dinov2Config(
        hidden_size=shape.hidden, num_hidden_layers=shape.layers, num_attention_heads=shape.heads, mlp_ratio=4,
        use_swiglu_ffn=shape.swiglu, patch_size=PATCH, image_size=image_size, attn_implementation="sdpa",
    )  # fmt: skip
    with torch.device(device):  # initialise on the device: a giant on the CPU first would take minutes
        model = Dinov2Model(config)
    backbone = Backbone(model, _even_indices(shape.layers), source=f"random {shape.name}")
    head = create_decoder(
        decoder, embed_dim=shape.hidden, num_levels=backbone.num_features_levels, patch_size=PATCH,
        num_classes=NUM_CLASSES,
    ).to(device=device, memory_format=torch.channels_last)  # fmt: skip
    if mode == "frozen":
        backbone.requires_grad_(False)
    elif shape.checkpointing:
        backbone.set_gradient_checkpointing(True)
    return Segmenter(backbone, head, mode="frozen" if mode == "frozen" else "finetune").to(device).train()


def make_step(seg, forward, batch: int, image_size: int, device):
    """One training step (bf16 autocast on CUDA, cross-entropy, AdamW) on a fixed random batch; returns ``step()``."""
    import torch
    import torch.nn.functional as F

    from lasegseg.models.segmenter import param_groups
    from lasegseg.train.inference import autocast_context

    generator = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(batch, 1, image_size, image_size, generator=generator).to(device)
    y = (torch.rand(batch, image_size, image_size, generator=generator) > 0.9).long().to(device)
    optimizer = torch.optim.AdamW(param_groups(seg, 1e-4, 1.0, 1e-4), lr=1e-4)

    def step() -> None:
        with autocast_context(device, "auto"):
            loss = F.cross_entropy(forward(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def count_flops(seg, device, image_size: int, *, checkpointing: bool) -> tuple[float, float]:
    """FlopCounterMode on one image: (backbone FLOPs, whole training step FLOPs), recompute not included.

    The backbone is counted alone (forward, plus backward unless frozen) to check the analytic ViT formula; the
    step minus the backbone gives the decoder's share. Checkpointing is off while counting so that the count is
    model FLOPs, the numerator of MFU.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from lasegseg.train.inference import autocast_context

    def attention():
        # The CPU's fused attention kernel has no FLOP formula; the math backend is counted (as bmm).
        return sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()

    if checkpointing:
        seg.backbone.set_gradient_checkpointing(False)
    try:
        x = torch.rand(1, 1, image_size, image_size, device=device)
        with attention(), FlopCounterMode(display=False) as backbone_counter:
            with autocast_context(device, "auto"):
                feats = seg.features(x)
            if not seg.frozen:
                sum(f.float().sum() for f in feats).backward()
        seg.zero_grad(set_to_none=True)
        with attention(), FlopCounterMode(display=False) as step_counter:
            make_step(seg, seg, 1, image_size, device)()
        seg.zero_grad(set_to_none=True)
    finally:
        if checkpointing:
            seg.backbone.set_gradient_checkpointing(True)
    return float(backbone_counter.get_total_flops()), float(step_counter.get_total_flops())


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, *, warmup: int, seconds: float, min_steps: int = 3) -> tuple[float, int, float]:
    """Warm up, then run ``step`` for about ``seconds`` (at least ``min_steps``); (s per step, steps, warm-up s).

    On CUDA the span is measured with events around the whole loop, so host-side queueing is not counted twice.
    """
    import torch

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    warm = time.perf_counter() - t0
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
    t0 = time.perf_counter()
    steps = 0
    while steps < min_steps or time.perf_counter() - t0 < seconds:
        step()
        steps += 1
    if device.type == "cuda":
        end.record()
        end.synchronize()
        elapsed = start.elapsed_time(end) / 1000.0
    else:
        elapsed = time.perf_counter() - t0
    return elapsed / steps, steps, warm


def _is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------- the rows


def measure_row(shape: VitShape, mode: str, args, device, peak: float | None, *, compiled: bool = False) -> dict:
    """One table row; on OOM the batch is halved once, and a second OOM is reported in the row."""
    import torch

    batch = shape.batch_frozen if mode == "frozen" else shape.batch_e2e
    row = {"model": shape.name, "mode": mode + ("+compile" if compiled else ""), "batch": batch}
    for attempt in range(2):
        seg = step = None
        try:
            seg = build_segmenter(shape, mode=mode, decoder=args.decoder, image_size=args.image_size, device=device)
            ckpt = mode == "e2e" and shape.checkpointing
            vit_counted, step_counted = count_flops(seg, device, args.image_size, checkpointing=ckpt)
            forward = torch.compile(seg) if compiled else seg
            if device.type == "cuda":  # the peak of training at this batch, weights included, not of the count
                torch.cuda.reset_peak_memory_stats(device)
            step = make_step(seg, forward, batch, args.image_size, device)
            per_step, steps, warm = time_steps(step, device, warmup=args.warmup, seconds=args.seconds)
            row.update(_row_numbers(shape, mode, args.image_size, batch, per_step, vit_counted, step_counted, peak))
            row.update(steps=steps, warmup_s=round(warm, 2), status="ok")
            if device.type == "cuda":
                row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            notes = ["grad ckpt"] * ckpt + [f"compile + warm-up {warm:.0f} s"] * compiled
            row["status"] = f"ok ({', '.join(notes)})" if notes else "ok"
            return row
        except Exception as exc:  # noqa: BLE001 - one failing row must not end the benchmark
            if not _is_oom(exc):
                row["status"] = f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:80]}"
                return row
            row["status"] = f"OOM at batch {batch}"
            if attempt == 1 or batch == 1:
                return row
            batch //= 2
            row["batch"] = batch
        finally:
            del seg, step
            _free(device)
    return row


def _row_numbers(shape, mode, image_size, batch, per_step, vit_counted, step_counted, peak) -> dict:
    vit_analytic = vit_flops(shape, image_size, backward=mode != "frozen")
    decoder = max(0.0, step_counted - vit_counted)
    model_flops = vit_analytic + decoder  # per image
    img_s = batch / per_step
    tflops = model_flops * img_s / 1e12
    return {
        "img_s": img_s,
        "step_ms": per_step * 1e3,
        "vit_gflop_analytic": vit_analytic / 1e9,
        "vit_gflop_counted": vit_counted / 1e9,
        "flop_ratio": vit_counted / vit_analytic if vit_analytic else float("nan"),
        "step_gflop": model_flops / 1e9,
        "tflops": tflops,
        "mfu": tflops / peak if peak else None,
    }


# ------------------------------------------------------------------------------------------ cached-feature frozen

FEEDS = ("host", "resident", "prefetch")


class _Slices:
    """``n`` random fp16 slices in [0, 1] standing in for a slice cache (what the feature writer reads)."""

    def __init__(self, n: int, image_size: int) -> None:
        import numpy as np

        self.images = np.random.default_rng(1).random((n, image_size, image_size), np.float32).astype(np.float16)

    def __len__(self) -> int:
        return len(self.images)


def cached_features(seg, n: int, batch: int, image_size: int, device, folder: Path):
    """The decoder's levels of ``n`` random slices, computed once and stored as a sweep stores them: lasegseg's
    feature writer (bf16 autocast on CUDA) fills fp16 ``(N, h, w, C)`` memory maps in ``folder``, opened with its
    reader."""
    from lasegseg.train.features import FeatureCache, _write_levels

    _write_levels(seg.backbone, _Slices(n, image_size), folder, seg.levels, device=device, amp="auto",
                  batch_size=batch)  # fmt: skip
    return FeatureCache(folder, {"levels": list(seg.levels), "rows": n, "key": folder.name})


def row_stream(n: int, batch: int, seed: int = 0):
    """Endless sorted batches of rows ``0..n-1``, epoch after epoch of shuffled order, as a trial reads them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            yield np.sort(order[start : start + batch])


def feed_reader(feats, feed: str, device):
    """The reader of one feed: ``host`` (per-step gather + pinned copy on the training thread, lasegseg's reader
    before training features were held or prefetched), ``resident`` (every row held on the device) or ``prefetch``
    (gather and copy on a background thread)."""
    import numpy as np

    from lasegseg.train.features import PrefetchFeatures, ResidentFeatures

    if feed == "resident":
        return ResidentFeatures(feats, np.arange(len(feats)), device)
    if feed == "prefetch":
        return PrefetchFeatures(feats)
    return feats


def measure_feed(seg, feats, feed: str, shape: VitShape, args, device, frozen_img_s: float | None) -> dict:
    """Decoder training steps (as the frozen row's, without the backbone) on batches read through ``feed``."""
    import torch

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
        row["status"] = "OOM" if _is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).strip()[:80]}"
    finally:
        if stream is not None:
            stream.close()  # ends a prefetch thread
        stream = reader = step = None
        _free(device)
    return row


def measure_cached(shape: VitShape, feeds: list[str], args, device, frozen_img_s, over_budget) -> list[dict]:
    """The cached-feature frozen rows of one shape: features of ``--cached-slices`` slices computed once, then one
    row per feed."""
    import tempfile

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
            status = "OOM" if _is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).strip()[:80]}"
            done = {r["feed"] for r in rows}
            rows += [{"model": shape.name, "feed": f, "batch": batch, "status": status} for f in feeds if f not in done]
        finally:
            seg = feats = None
            _free(device)
    return rows


# -------------------------------------------------------------------------------------------------- packed sweep


def _pack_worker(rank: int, cfg: dict, barrier, queue) -> None:
    """One small frozen training: build, warm up, wait for the others, train for ``cfg['seconds']``, report."""
    import torch

    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    try:
        shape = VitShape(**cfg["shape"])
        seg = build_segmenter(shape, mode="frozen", decoder=cfg["decoder"], image_size=cfg["image_size"],
                              device=device)  # fmt: skip
        step = make_step(seg, seg, cfg["batch"], cfg["image_size"], device)
        for _ in range(cfg["warmup"]):
            step()
        _sync(device)
        barrier.wait(timeout=cfg["barrier_timeout"])
        t0, steps = time.perf_counter(), 0
        while steps < 2 or time.perf_counter() - t0 < cfg["seconds"]:
            step()
            steps += 1
        _sync(device)
        queue.put((rank, steps * cfg["batch"], time.perf_counter() - t0, ""))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as the row's status
        barrier.abort()
        kind = "OOM" if _is_oom(exc) else f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:80]}"
        queue.put((rank, 0, 0.0, kind))


def measure_packing(k: int, args, device) -> dict:
    """Aggregate img/s of ``k`` concurrent frozen trainings (separate processes, one device)."""
    # CUDA cannot be forked once initialised; on the CPU fork skips re-importing torch in every worker.
    ctx = mp.get_context("spawn" if device.type == "cuda" else "fork")
    shape = shapes_for(args)["S"]
    cfg = {
        "shape": dataclasses.asdict(shape), "decoder": args.decoder, "image_size": args.image_size,
        "batch": args.pack_batch, "device": str(device), "warmup": args.warmup, "seconds": args.pack_seconds,
        "threads": 1, "barrier_timeout": 300.0,
    }  # fmt: skip
    barrier, queue = ctx.Barrier(k), ctx.Queue()
    procs = [ctx.Process(target=_pack_worker, args=(r, cfg, barrier, queue), daemon=True) for r in range(k)]
    for p in procs:
        p.start()
    results, errors, reported = [], [], set()
    deadline = time.monotonic() + cfg["barrier_timeout"] + args.pack_seconds + 60
    while len(reported) < k and time.monotonic() < deadline:
        try:
            rank, images, elapsed, error = queue.get(timeout=1.0)
        except queue_lib.Empty:
            dead = [r for r, p in enumerate(procs) if r not in reported and not p.is_alive()]
            if dead:  # died without reporting (killed, crashed at import): release the others from the barrier
                barrier.abort()
                errors.append(f"worker exited with code {procs[dead[0]].exitcode}")
                reported.update(dead)
            continue
        reported.add(rank)
        (errors if error else results).append(error or images / elapsed)
    for p in procs:
        p.join(timeout=10)
        if p.is_alive():
            p.terminate()
    row = {"k": k, "batch": args.pack_batch, "img_s": sum(results) if len(results) == k else None}
    row["status"] = "ok" if len(results) == k else f"failed: {errors[0] if errors else 'worker died'}"
    return row


def shapes_for(args) -> dict[str, VitShape]:
    """The full DINOv2 shapes, or their tiny stand-ins under --smoke."""
    return SMOKE_SHAPES if args.smoke else SHAPES


# ---------------------------------------------------------------------------------------------------- reporting


def _fmt(value, spec: str) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def rows_table(rows: list[dict], peak: float | None) -> str:
    head = (
        "| model | mode | batch | img/s | step ms | ViT GFLOP/img analytic | ViT GFLOP/img counted | counted/analytic "
        "| step GFLOP/img | TFLOP/s | MFU | peak GiB | status |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ("—" if peak else "unknown peak")
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['batch']} | {_fmt(r.get('img_s'), '.1f')} | "
            f"{_fmt(r.get('step_ms'), '.1f')} | {_fmt(r.get('vit_gflop_analytic'), '.4g')} | "
            f"{_fmt(r.get('vit_gflop_counted'), '.4g')} | {_fmt(r.get('flop_ratio'), '.3f')} | "
            f"{_fmt(r.get('step_gflop'), '.4g')} | {_fmt(r.get('tflops'), '.3g')} | {mfu} | "
            f"{_fmt(r.get('peak_gib'), '.2f')} | {r['status']} |"
        )
    return "\n".join(lines)


def cached_table(rows: list[dict]) -> str:
    head = (
        "| model | feed | batch | img/s | step ms | fp16 MB copied/step | vs backbone every step (frozen row) "
        "| peak GiB | status |"
    )
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        ratio = f"{r['vs_frozen']:.2f}×" if r.get("vs_frozen") else "—"
        lines.append(
            f"| {r['model']} | {r['feed']} | {r['batch']} | {_fmt(r.get('img_s'), '.1f')} | "
            f"{_fmt(r.get('step_ms'), '.2f')} | {_fmt(r.get('copy_mb'), '.3g')} | {ratio} | "
            f"{_fmt(r.get('peak_gib'), '.2f')} | {r['status']} |"
        )
    return "\n".join(lines)


def packing_table(rows: list[dict]) -> str:
    alone = next((r["img_s"] for r in rows if r["k"] == 1 and r["img_s"]), None)
    lines = ["| trials on one device | batch | total img/s | vs one at a time | status |", "|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['img_s'] / alone:.2f}×" if alone and r["img_s"] else "—"
        lines.append(f"| {r['k']} | {r['batch']} | {_fmt(r['img_s'], '.1f')} | {ratio} | {r['status']} |")
    return "\n".join(lines)


def environment(device) -> dict:
    import torch
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or 'cpu'})"
    return {
        "device": name, "torch": torch.__version__, "cuda": torch.version.cuda or "none",
        "transformers": transformers.__version__, "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }  # fmt: skip


def write_results(path: Path, env: dict, command: str, tables: list[str]) -> None:
    """Append one dated section with the card's name and the versions to the results file."""
    if not path.exists():
        path.write_text("# GPU benchmark results\n\nAppended by `python bench/gpu.py --write-results`.\n")
    section = (
        f"\n## {env['device']} · {env['date']}\n\n"
        f"torch {env['torch']}, CUDA {env['cuda']}, transformers {env['transformers']} · `{command}`\n\n"
        + "\n\n".join(tables)
        + "\n"
    )
    with path.open("a") as fh:
        fh.write(section)


# --------------------------------------------------------------------------------------------------------- main


def _timed_row(shape: VitShape, mode: str, args, device, peak, compiled: bool, skip: bool) -> dict:
    if skip:
        suffix = "+compile" if compiled else ""
        return {"model": shape.name, "mode": mode + suffix, "batch": 0, "status": "skipped (time budget)"}
    t0 = time.monotonic()
    row = measure_row(shape, mode, args, device, peak, compiled=compiled)
    print(f"  {shape.name} {row['mode']}: {row['status']} ({time.monotonic() - t0:.1f} s)", flush=True)
    return row


def _cached_rows(sizes: list[str], feeds: list[str], args, device, rows: list[dict], over_budget) -> list[dict]:
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/gpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu (only with --smoke)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, a few steps: checks the code paths in seconds")
    p.add_argument("--quick", action="store_true", help="shorter measurements (about half the time)")
    p.add_argument("--compile", action="store_true", help="also measure each row under torch.compile")
    p.add_argument("--sizes", default="S,B,L,g", help="comma list of S, B, L, g (default all)")
    p.add_argument("--modes", default="frozen,e2e", help="comma list of frozen, e2e")
    p.add_argument("--decoder", default="multiscale", help="lasegseg decoder (default multiscale)")
    p.add_argument("--image-size", type=int, default=None, help="default 448 (smoke: 56)")
    p.add_argument(
        "--cached",
        default=",".join(FEEDS),
        help="feeds of the cached-feature frozen rows: comma list of host, resident, prefetch ('' skips)",
    )
    p.add_argument("--cached-slices", type=int, default=None, help="slices the cached rows read (default 4 batches)")
    p.add_argument("--pack", default=None, help="trials per device for the packed sweep (default 1,4,8; '' skips)")
    p.add_argument("--pack-batch", type=int, default=None, help="batch of each packed trial (default 8)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of a card not in the table")
    p.add_argument("--budget", type=float, default=450.0, help="seconds; later rows are skipped past it")
    p.add_argument("--write-results", action="store_true", help="append the tables to bench/RESULTS.md")
    p.add_argument("--results", type=Path, default=RESULTS, help=argparse.SUPPRESS)
    p.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    return p


def _settings(args) -> None:
    """Fill the defaults that depend on --smoke/--quick."""
    args.image_size = args.image_size or (56 if args.smoke else 448)
    args.pack_batch = args.pack_batch or (2 if args.smoke else 8)
    args.pack = args.pack if args.pack is not None else ("1,2" if args.smoke else ("1,4" if args.quick else "1,4,8"))
    args.seconds = 0.2 if args.smoke else (3.0 if args.quick else 6.0)
    args.pack_seconds = 0.5 if args.smoke else (5.0 if args.quick else 10.0)
    args.warmup = 1 if args.smoke else 3


def _parse_list(value: str, allowed, flag: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in allowed]
    if bad or not items:
        raise SystemExit(f"bench/gpu.py: error: {flag} takes a comma list of {', '.join(allowed)}, got {value!r}")
    return items


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _settings(args)
    sizes = _parse_list(args.sizes, list(SHAPES), "--sizes")
    modes = _parse_list(args.modes, ["frozen", "e2e"], "--modes")
    packs = [int(k) for k in _parse_list(args.pack, [str(i) for i in range(1, 33)], "--pack")] if args.pack else []
    feeds = _parse_list(args.cached, list(FEEDS), "--cached") if args.cached else []

    if args.device == "cpu" and not args.smoke:
        print("bench/gpu.py: error: full sizes need a GPU; on the CPU run --smoke", file=sys.stderr)
        return 2

    import torch

    from lasegseg.models.decoders import list_decoders

    if args.decoder not in list_decoders() or args.decoder == "unet":
        print(f"bench/gpu.py: error: --decoder must be a backbone decoder, got {args.decoder!r}", file=sys.stderr)
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("bench/gpu.py: error: no CUDA device here (use --device cpu --smoke)", file=sys.stderr)
        return 2
    if device.type == "cpu" and not args.smoke:
        print("bench/gpu.py: error: no CUDA device here; on the CPU run --device cpu --smoke", file=sys.stderr)
        return 2
    if device.type == "cpu":
        torch.set_num_threads(1)  # the smoke run's shapes gain nothing from threads; shared CI cores lose from them
    env = environment(device)
    peak = peak_tflops(env["device"], args.peak_tflops)
    peak_text = f"{peak:g} TFLOP/s dense bf16" if peak else "unknown (pass --peak-tflops for MFU)"
    print(f"{env['device']} · peak {peak_text} · torch {env['torch']} · CUDA {env['cuda']}", flush=True)
    started = time.monotonic()

    def over_budget() -> bool:
        return time.monotonic() - started > args.budget

    rows = [_timed_row(shapes_for(args)[size], mode, args, device, peak, False, over_budget()) for size in sizes
            for mode in modes]  # fmt: skip
    cached = _cached_rows(sizes, feeds, args, device, rows, over_budget)
    packing = []
    for k in packs:
        if over_budget():
            packing.append({"k": k, "batch": args.pack_batch, "img_s": None, "status": "skipped (time budget)"})
            continue
        t0 = time.monotonic()
        packing.append(measure_packing(k, args, device))
        print(f"  packed ×{k}: {packing[-1]['status']} ({time.monotonic() - t0:.1f} s)", flush=True)
    # Compiling takes minutes for the large models: these rows come last, after everything the budget must cover.
    if args.compile:
        rows += [_timed_row(shapes_for(args)[size], mode, args, device, peak, True, over_budget()) for size in sizes
                 for mode in modes]  # fmt: skip

    tables = [f"{args.image_size} px, decoder {args.decoder}, peak {peak_text}\n\n" + rows_table(rows, peak)]
    if cached:
        tables.append(
            "Frozen on cached features: the decoder's levels computed once and stored as a sweep stores them (fp16 "
            "memory maps), then decoder steps with each feed of the batches\n\n" + cached_table(cached)
        )
    if packing:
        tables.append(
            f"Packed frozen sweep: K × {shapes_for(args)['S'].name} frozen trainings as separate processes on one "
            f"device, each for {args.pack_seconds:g} s\n\n" + packing_table(packing)
        )
    print("\n" + "\n\n".join(tables))
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps({"env": env, "peak_tflops": peak, "rows": rows, "cached": cached, "packing": packing}, indent=2)
        )
    if args.write_results:
        write_results(args.results, env, "python bench/gpu.py " + " ".join(argv or sys.argv[1:]), tables)
        print(f"appended to {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
