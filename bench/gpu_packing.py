"""The packed sweep: K small frozen trainings as K processes on one device at once (what
``resources.frozen_gpus_per_trial`` does in a sweep), their summed throughput against one running alone."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import queue as queue_lib
import time

import torch

from bench.gpu_model import build_segmenter, make_step
from bench.gpu_shapes import VitShape, shapes_for
from bench.gpu_timing import is_oom, sync


def _pack_worker(rank: int, cfg: dict, barrier, queue) -> None:
    """One small frozen training: build, warm up, wait for the others, train for ``cfg['seconds']``, report."""
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    try:
        shape = VitShape(**cfg["shape"])
        seg = build_segmenter(shape, mode="frozen", decoder=cfg["decoder"], image_size=cfg["image_size"],
                              device=device)  # fmt: skip
        step = make_step(seg, seg, cfg["batch"], cfg["image_size"], device)
        for _ in range(cfg["warmup"]):
            step()
        sync(device)
        barrier.wait(timeout=cfg["barrier_timeout"])
        t0, steps = time.perf_counter(), 0
        while steps < 2 or time.perf_counter() - t0 < cfg["seconds"]:
            step()
            steps += 1
        sync(device)
        queue.put((rank, steps * cfg["batch"], time.perf_counter() - t0, ""))
    except Exception as exc:  # noqa: BLE001 - reported to the parent as the row's status
        barrier.abort()
        kind = "OOM" if is_oom(exc) else f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:80]}"
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


def packing_rows(packs: list[int], args, device, over_budget) -> list[dict]:
    """The packed sweep's rows, one per K in ``packs``; those that would start past the time budget are skipped."""
    packing = []
    for k in packs:
        if over_budget():
            packing.append({"k": k, "batch": args.pack_batch, "img_s": None, "status": "skipped (time budget)"})
            continue
        t0 = time.monotonic()
        packing.append(measure_packing(k, args, device))
        print(f"  packed ×{k}: {packing[-1]['status']} ({time.monotonic() - t0:.1f} s)", flush=True)
    return packing
