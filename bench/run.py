"""lasegseg benchmarks: each prints a ratio measured in one run on this machine (min / median over repeats).

    python bench/run.py --quick                  # CPU, under 10 minutes on 2 cores
    python bench/run.py --only naive,fixed       # some: plain step data sweep memory naive fixed floor bounds scale
    python bench/run.py --only scale --full      # the paper's study rehearsed at N ≈ 16, 128 and its full 1,406 trials
    python bench/run.py --quick --json out.json  # also write every row as JSON

0. plain  — the loop a new user writes first (bench/naive.py --variant plain, no tracking, no validation) vs
            sweeps/fewshot.py on linear/conv × frozen/finetune × 2/4 patients × 2 seeds at 15 epochs: ≤ 1.15× at
            concurrency 1, ≥ 1.5× faster at concurrency 2; validation ≤ 10 % of an epoch; ≤ 3 s after the last trial.
1. step   — the training loop's step time vs a bare PyTorch loop on the same model and batch (goal ≤ 1.05×).
2. data   — slice-cache (and frozen-feature-cache) batch reads vs the model's step (loader never the bottleneck),
            and one cache build per dataset however many trials open it.
3. sweep  — the frozen grid through the Ray Tune sweep vs the same trials called in a plain loop (goal ≤ 1.15× at
            concurrency 1), and the speed-up at concurrency 2 on 2 cores.
4. memory — peak memory of the sweep process tree with 1, 2 and 4 concurrent trials (caches are memory-mapped, so
            data is shared, not copied per trial).
5. naive  — bench/naive.py (a researcher's per-trial script: reads the volumes again per trial, runs the backbone on
            every batch, fp32) vs sweeps/fewshot.py on the same grid, data, model and epochs; process start and
            imports included on both sides. Frozen grid (goal ≥ 5× faster), fine-tuned trials (per-trial sum
            ≤ 1.05× the naive time, checkpointing ≤ 5 % of their training time), whole grid.
6. fixed  — a trial's fixed cost (scheduling → first optimizer step) from the driver's trial_timings.csv: cold =
            first trial of a fresh worker, warm = median of the rest (goal ≤ 3 s).
7. floor  — the frozen grid's sweep wall time at concurrency 1 vs its floor, timed in the bench process: one backbone
            pass over every slice plus every decoder step and evaluation pass of the grid's trials (goal ≤ 1.15×);
            the speed-up over naive printed beside the bound that the floor implies (naive / floor).
8. bounds — what no Ray-based sweep here can go below: a new local Ray cluster's first torch optimizer step from
            process launch (row 2's goal: ≤ 5 s), and the memory of the worker process every concurrent trial adds
            (row 6's goal: ≤ 300 MiB); no Tune, MLflow, data or lasegseg in either.
9. scale  — sweeps/configs/paper.yaml rehearsed end to end (stand-in backbones, small per-trial sizes, derived by code)
            on a 3-node loopback cluster with 16 logical GPUs, SeaweedFS and the MLflow server, at N ≈ 16 and ≈ 128
            trials (--full: and the full grid), resumed after a SIGKILL at N ≈ 128: the growth of every cost with N,
            judged against the study's goals; with bounds, fixed and memory in the same run, rows 2 and 6 against
            the bounds floor. Not part of --quick's default set: run it with --only scale.

Every process runs with OMP_NUM_THREADS=1 and one CPU per trial (the 4-trial memory run uses 0.5 so that four fit
on two cores). Sweeps share their runs between benchmarks within one invocation; each sweep starts from an empty
cache folder, so its time includes building the slice and feature caches (the tiny backbone is made once).

``--backbone vit-s-shape`` runs the grids (sweep, memory, naive, fixed, floor) on a randomly initialised DINOv2 with
ViT-S/14's shape instead of the tiny one, loaded from a local folder through the same ``from_pretrained`` path: on
a CPU it costs what a real backbone costs relative to the decoders (17× the tiny one at 56 px), which is what the
frozen-feature cache is for. Expect the naive side to take several times longer.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `python bench/run.py` puts bench/ itself first on the path; the `bench` package lives in the repository root.
sys.path.insert(0, str(ROOT))

from bench import (  # noqa: E402
    bench_bounds,
    bench_data,
    bench_fixed,
    bench_floor,
    bench_memory,
    bench_naive_grid,
    bench_plain,
    bench_scale,
    bench_step,
    bench_sweep,
)
from bench.common import Report, machine  # noqa: E402
from bench.harness import BENCH_BACKBONES, IMAGE_SIZE, Bench  # noqa: E402

# Every benchmark by name, in the order they run: later ones reuse the sweeps the earlier ones started.
RUNNERS = {
    "plain": bench_plain.measure,
    "step": bench_step.measure,
    "data": bench_data.measure,
    "sweep": bench_sweep.measure,
    "memory": bench_memory.measure,
    "naive": bench_naive_grid.measure,
    "fixed": bench_fixed.measure,
    "floor": bench_floor.measure,
    "bounds": bench_bounds.measure,
    "scale": bench_scale.measure,
}
BENCHMARKS = tuple(RUNNERS)
# Run only when named (--only): the rehearsal takes tens of minutes.
ON_REQUEST = ("scale",)


def parse_only(text: str | None) -> list[str]:
    """``--only step,naive`` → the benchmarks to run in their canonical order (all when empty)."""
    if not text:
        return [n for n in BENCHMARKS if n not in ON_REQUEST]
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"run.py: error: unknown benchmark '{unknown[0]}' (valid: {', '.join(BENCHMARKS)})")
    return [n for n in BENCHMARKS if n in names]


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the selected benchmarks in order, print the summary (and write the JSON)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller grids and fewer repeats (CPU, < 10 minutes)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every row as JSON here")
    parser.add_argument("--epochs", type=int, default=None, help="override the grids' epochs (smoke runs)")
    parser.add_argument("--keep", default=None, metavar="DIR", help="work in DIR and keep it (sweep logs, outputs)")
    parser.add_argument("--full", action="store_true", help="scale: rehearse the full grid (1,406 trials) too")
    parser.add_argument("--backbone", default="tiny", choices=sorted(BENCH_BACKBONES),
                        help="the grids' backbone: the tiny DINOv2, or a random one of ViT-S's shape")  # fmt: skip
    args = parser.parse_args(argv)
    selected = parse_only(args.only)
    # One intra-op thread everywhere, this process included: both sides of every ratio run alike.
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    t_start = time.perf_counter()
    report = Report()
    print(f"lasegseg bench ({'quick' if args.quick else 'full'}): {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lasegseg-bench-") as scratch:
        tmp = Path(args.keep) if args.keep else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        bench = Bench(tmp, args.quick, report, args.epochs, backbone=args.backbone)
        bench.scale_full = args.full
        for g in bench.grids.values():
            print(f"grid {g.name}: {g.size} trials ({len(g.decoders)} decoders × {len(g.modes or [g.mode])} modes × "
                  f"{len(g.lrs)} lr × "
                  f"{len(g.patients)} few-shot sizes × {len(g.seeds)} seeds), {g.epochs} epochs, {IMAGE_SIZE} px, "
                  f"backbone {args.backbone}",
                  flush=True)  # fmt: skip
        for name in selected:
            t0 = time.perf_counter()
            print(f"[{name}]", flush=True)
            RUNNERS[name](bench)
            print(f"    ({name}: {time.perf_counter() - t0:.0f} s)", flush=True)
        if args.keep is None:
            shutil.rmtree(tmp / "phantom", ignore_errors=True)
    wall = time.perf_counter() - t_start
    print(f"\nsummary (wall {wall:.0f} s)\n{report.summary()}", flush=True)
    if args.json:
        payload = {"machine": machine(), "quick": args.quick, "backbone": args.backbone, "benchmarks": selected,
                   "wall_s": wall, "rows": [asdict(r) for r in report.rows]}  # fmt: skip
        Path(args.json).write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
