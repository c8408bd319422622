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

Modules: ``gpu_shapes`` (the shapes, feeds, peak table and analytic FLOPs), ``gpu_model`` (the segmenter, its step
and counted FLOPs), ``gpu_timing``, ``gpu_rows`` (backbone rows), ``gpu_cached`` (cached-feature rows),
``gpu_packing`` (the packed sweep) and ``gpu_report`` (tables and the results file); this script parses the
arguments and runs them in order.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_report import cached_table, environment, packing_table, rows_table, write_results  # noqa: E402
from bench.gpu_shapes import FEEDS, SHAPES, peak_tflops, shapes_for  # noqa: E402

RESULTS = ROOT / "bench" / "RESULTS.md"


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

    # deferred: heavy (torch, transformers, lasegseg): the argument checks above answer without them
    import torch

    from bench.gpu_cached import cached_rows
    from bench.gpu_packing import packing_rows
    from bench.gpu_rows import timed_row
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

    rows = [timed_row(shapes_for(args)[size], mode, args, device, peak, False, over_budget()) for size in sizes
            for mode in modes]  # fmt: skip
    cached = cached_rows(sizes, feeds, args, device, rows, over_budget)
    packing = packing_rows(packs, args, device, over_budget)
    # Compiling takes minutes for the large models: these rows come last, after everything the budget must cover.
    if args.compile:
        rows += [timed_row(shapes_for(args)[size], mode, args, device, peak, True, over_budget()) for size in sizes
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
