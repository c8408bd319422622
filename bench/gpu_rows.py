"""The backbone rows: one size in one mode, timed (a backbone row that runs out of memory is retried once at half
the batch), with its FLOPs per image, TFLOP/s and MFU."""

from __future__ import annotations

import time

import torch

from bench.gpu_model import build_segmenter, count_flops, make_step
from bench.gpu_shapes import VitShape, vit_flops
from bench.gpu_timing import free_memory, is_oom, time_steps


def measure_row(shape: VitShape, mode: str, args, device, peak: float | None, *, compiled: bool = False) -> dict:
    """One table row; on OOM the batch is halved once, and a second OOM is reported in the row."""
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
            if not is_oom(exc):
                row["status"] = f"error: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:80]}"
                return row
            row["status"] = f"OOM at batch {batch}"
            if attempt == 1 or batch == 1:
                return row
            batch //= 2
            row["batch"] = batch
        finally:
            del seg, step
            free_memory(device)
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


def timed_row(shape: VitShape, mode: str, args, device, peak, compiled: bool, skip: bool) -> dict:
    """One backbone row, or a skipped one past the time budget; prints its status and seconds."""
    if skip:
        suffix = "+compile" if compiled else ""
        return {"model": shape.name, "mode": mode + suffix, "batch": 0, "status": "skipped (time budget)"}
    t0 = time.monotonic()
    row = measure_row(shape, mode, args, device, peak, compiled=compiled)
    print(f"  {shape.name} {row['mode']}: {row['status']} ({time.monotonic() - t0:.1f} s)", flush=True)
    return row
