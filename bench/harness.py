"""The shared runner: the grids, the phantom and backbone, and the sweeps and naive runs the benchmarks reuse.

Sweeps share their runs between benchmarks within one invocation; each sweep starts from an empty cache folder, so
its time includes building the slice and feature caches (the tiny backbone is made once).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import ROOT, Report, child_env, peak_memory_of_tree, read_timings

IMAGE_SIZE = 56
# Random-weight stand-ins for the grids' backbone (--backbone): name → transformers Dinov2Config fields.
BENCH_BACKBONES: dict[str, dict[str, int] | None] = {
    "tiny": None,  # lasegseg's own tiny DINOv2 (4 blocks of width 128)
    "vit-s-shape": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
}
PHANTOM_CASES = 12


@dataclass
class Grid:
    """One sweep grid, written both as a sweep YAML (lasegseg) and as bench/naive.py arguments."""

    name: str
    mode: str
    decoders: list[str]
    lrs: list[float]
    patients: list[int]
    seeds: list[int]
    epochs: int
    backbone: str = "tiny"
    modes: list[str] | None = None  # several modes as a grid axis (``mode`` is then ignored)

    @property
    def size(self) -> int:
        """Number of trials: decoders × learning rates × few-shot sizes × seeds."""
        return len(self.decoders) * len(self.lrs) * len(self.patients) * len(self.seeds) * len(self.modes or [0])

    def yaml(self) -> str:
        """The grid as a sweeps/fewshot.py config, one trial at a time."""
        modes = f", model.mode: [{', '.join(self.modes)}]" if self.modes else ""
        return (
            f"name: bench-{self.name}\n"
            f"base: {{model.backbone: '{self.backbone}', model.mode: {self.mode}, data.image_size: {IMAGE_SIZE}, "
            f"train.epochs: {self.epochs}, train.batch_size: 16}}\n"
            f"grid: {{model.decoder: [{', '.join(self.decoders)}]{modes}, "
            f"optim.lr: [{', '.join(map(repr, self.lrs))}]}}\n"
            f"fewshot: [{', '.join(f'{{data.patients: {p}}}' for p in self.patients)}]\n"
            f"seeds: [{', '.join(map(str, self.seeds))}]\n"
            "resources: {cpus_per_trial: 1, max_concurrent: 1, max_failures: 0}\n"
        )

    def naive_args(self) -> list[str]:
        """The same grid as bench/naive.py arguments."""
        modes = ",".join(self.modes or [self.mode])
        return ["--decoders", ",".join(self.decoders), "--modes", modes, "--lrs", ",".join(map(repr, self.lrs)),
                "--patients", ",".join(map(str, self.patients)), "--seeds", ",".join(map(str, self.seeds)),
                "--epochs", str(self.epochs), "--image-size", str(IMAGE_SIZE), "--batch-size", "16",
                "--backbone", self.backbone]  # fmt: skip


def grids(quick: bool, epochs: int | None = None) -> dict[str, Grid]:
    """The frozen and fine-tuned grids: the issue's 3×3×2×2 at 20 epochs, or a smaller one for --quick.

    Args:
        quick: the smaller grids.
        epochs: override every grid's epochs (smoke runs).
    """
    decoders = ["linear", "conv", "multiscale"]
    if quick:
        out = {
            "frozen": Grid("frozen", "frozen", decoders, [1e-3, 3e-3], [2, 4], [0], epochs=6),
            "finetune": Grid("finetune", "finetune", ["linear", "conv"], [1e-3], [2, 4], [0], epochs=6),
        }
    else:
        out = {
            "frozen": Grid("frozen", "frozen", decoders, [3e-4, 1e-3, 3e-3], [2, 4], [0, 1], epochs=20),
            "finetune": Grid("finetune", "finetune", decoders, [1e-3], [2, 4], [0, 1], epochs=20),
        }
    # The plain-loop grid (same in both modes): linear/conv × frozen/finetune × 2/4 patients × 2 seeds.
    out["plain"] = Grid("plain", "frozen", ["linear", "conv"], [1e-3], [2, 4], [0, 1], epochs=15,
                        modes=["frozen", "finetune"])  # fmt: skip
    for g in out.values():
        g.epochs = epochs or g.epochs
    return out


@dataclass
class SweepRun:
    """One finished sweeps/fewshot.py process."""

    grid: str
    concurrency: int
    seconds: float
    peak_rss: int
    peak_pss: int
    sweep_dir: Path
    cache_dir: Path
    launched: float = 0.0


def make_random_backbone(folder: Path, shape: dict[str, int]) -> Path:
    """A seeded, randomly initialised DINOv2 of the given shape, saved like a downloaded one (``from_pretrained``).

    Args:
        folder: where config.json and model.safetensors go (reused when present).
        shape: Dinov2Config fields (width, depth, heads, MLP size); patch 14 as every DINOv2.
    """
    if (folder / "config.json").is_file():
        return folder
    import torch
    from transformers import Dinov2Config, Dinov2Model

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = Dinov2Model(Dinov2Config(patch_size=14, image_size=518, **shape))
    model.save_pretrained(folder, safe_serialization=True)
    return folder


class Bench:
    """Shared state of one invocation: scratch folder, phantom, tiny backbone and the sweeps already run."""

    def __init__(
        self, tmp: Path, quick: bool, report: Report, epochs: int | None = None, backbone: str = "tiny"
    ) -> None:
        self.tmp, self.quick, self.report = tmp, quick, report
        self.grids = grids(quick, epochs)
        self.sweeps: dict[tuple[str, int], SweepRun] = {}
        self.naive_runs: dict[tuple[str, str], dict[str, Any]] = {}
        self.base_cache = tmp / "base-cache"
        os.environ["LASEGSEG_CACHE"] = str(self.base_cache)
        self._phantom: Path | None = None
        if BENCH_BACKBONES[backbone] is not None:
            folder = make_random_backbone(self.base_cache / "backbones" / backbone, BENCH_BACKBONES[backbone])
            for g in self.grids.values():
                g.backbone = str(folder)

    @property
    def phantom(self) -> Path:
        """A 12-case seeded phantom (8 train / 2 val / 2 test), and the tiny backbone made once for everyone."""
        if self._phantom is None:
            from lasegseg.data.phantom import write_phantom
            from lasegseg.models.tiny import tiny_backbone_dir

            self._phantom = self.tmp / "phantom"
            write_phantom(self._phantom, cases=PHANTOM_CASES, seed=0, layout="msd")
            tiny_backbone_dir()
        return self._phantom

    def fresh_cache(self, tag: str) -> Path:
        """An empty cache folder that shares only the tiny backbone (slice and feature caches start cold)."""
        _ = self.phantom  # also makes the backbone
        cache = Path(tempfile.mkdtemp(prefix=f"cache-{tag}-", dir=self.tmp))
        (cache / "backbones").symlink_to(self.base_cache / "backbones", target_is_directory=True)
        return cache

    def sweep(self, grid: str, concurrency: int, cpus_per_trial: float = 1.0) -> SweepRun:
        """Run (or reuse) sweeps/fewshot.py on ``grid`` at ``concurrency``, timing it and its memory."""
        key = (grid, concurrency)
        if key in self.sweeps:
            return self.sweeps[key]
        g = self.grids[grid]
        config = self.tmp / f"{g.name}.yaml"
        config.write_text(g.yaml())
        store = Path(tempfile.mkdtemp(prefix=f"sweep-{grid}-c{concurrency}-", dir=self.tmp))
        cache_dir = self.fresh_cache(f"{grid}-c{concurrency}")
        env = child_env(LASEGSEG_CACHE=str(cache_dir))
        cmd = [sys.executable, str(ROOT / "sweeps" / "fewshot.py"), "--config", str(config), "--data",
               str(self.phantom), "--storage-path", str(store), "--max-concurrent", str(concurrency),
               "--cpus-per-trial", str(cpus_per_trial)]  # fmt: skip
        log = store / "sweep.log"
        with open(log, "wb") as fh:
            launched, t0 = time.time(), time.perf_counter()
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
            peak_rss, peak_pss = peak_memory_of_tree(proc)
            seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            tail = log.read_text(errors="replace").splitlines()[-15:]
            raise SystemExit(f"sweep {grid} at concurrency {concurrency} failed (exit {proc.returncode}):\n"
                             + "\n".join(tail))  # fmt: skip
        run = SweepRun(grid, concurrency, seconds, peak_rss, peak_pss, store / f"bench-{g.name}", cache_dir, launched)
        timings = read_timings(run.sweep_dir)
        # Driver start-up: imports, Ray, MLflow, slice + feature cache builds, until the first trial is scheduled.
        startup = min(float(r["scheduled_at"]) for r in timings) - launched if timings else None
        print(f"    (sweep {grid}: {g.size} trials at concurrency {concurrency}: {seconds:.1f} s, "
              f"{'' if startup is None else f'{startup:.1f} s of it before the first trial, '}"
              f"peak RSS {peak_rss / 2**20:.0f} MiB)", flush=True)  # fmt: skip
        self.sweeps[key] = run
        return run

    def naive(self, grid: str, variant: str = "naive") -> dict[str, Any]:
        """Run (or reuse) bench/naive.py (``--variant``) on ``grid``; returns its JSON plus the process wall time."""
        key = (grid, variant)
        if key in self.naive_runs:
            return self.naive_runs[key]
        g = self.grids[grid]
        out = self.tmp / f"{variant}-{grid}.json"
        cmd = [sys.executable, str(ROOT / "bench" / "naive.py"), "--data", str(self.phantom), *g.naive_args(),
               "--threads", "1", "--json", str(out), "--variant", variant]  # fmt: skip
        if variant == "naive":
            cmd += ["--out", str(self.tmp / f"naive-{grid}-models")]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=child_env(LASEGSEG_CACHE=str(self.base_cache)), cwd=ROOT,
                              capture_output=True, text=True)  # fmt: skip
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"bench/naive.py failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        result = json.loads(out.read_text())
        result["wall_s"] = seconds
        print(f"    ({variant} {grid}: {g.size} trials: {seconds:.1f} s)", flush=True)
        self.naive_runs[key] = result
        return result
