"""Timing a training step on a device, and the failures a row survives: a step timed over a span after its warm-up
(CUDA events on a GPU), out-of-memory recognised, and memory handed back between rows."""

from __future__ import annotations

import gc
import time

import torch


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device, *, warmup: int, seconds: float, min_steps: int = 3) -> tuple[float, int, float]:
    """Warm up, then run ``step`` for about ``seconds`` (at least ``min_steps``); (s per step, steps, warm-up s).

    On CUDA the span is measured with events around the whole loop, so host-side queueing is not counted twice.
    """
    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
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


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` is the device running out of memory."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def free_memory(device) -> None:
    """Collect garbage and hand the CUDA cache back, so the next row starts from an empty device."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
