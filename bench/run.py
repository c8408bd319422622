"""lasegseg benchmarks: each prints a ratio measured in one run on this machine (min / median over repeats).

    python bench/run.py --quick                  # CPU, under 10 minutes on 2 cores
    python bench/run.py --only naive,fixed       # some benchmarks: step | data | sweep | memory | naive | fixed
    python bench/run.py --quick --json out.json  # also write every row as JSON

1. step   — the training loop's step time vs a bare PyTorch loop on the same model and batch (goal ≤ 1.05×).
2. data   — slice-cache (and frozen-feature-cache) batch reads vs the model's step (loader never the bottleneck),
            and one cache build per dataset however many trials open it.
3. sweep  — the frozen grid through the Ray Tune sweep vs the same trials called in a plain loop (goal ≤ 1.15× at
            concurrency 1), and the speed-up at concurrency 2 on 2 cores.
4. memory — peak memory of the sweep process tree with 1, 2 and 4 concurrent trials (caches are memory-mapped, so
            data is shared, not copied per trial).
5. naive  — bench/naive.py (a researcher's per-trial script: reads the volumes again per trial, runs the backbone on
            every batch, fp32) vs sweeps/fewshot.py on the same grid, data, model and epochs; process start and
            imports included on both sides. Frozen grid (goal ≥ 5× faster), fine-tuned trials (goal ≤ 1.10× the
            naive time), whole grid.
6. fixed  — a trial's fixed cost (scheduling → first optimizer step) from the driver's trial_timings.csv: cold =
            first trial of a fresh worker, warm = median of the rest (goal ≤ 3 s).

Every process runs with OMP_NUM_THREADS=1 and one CPU per trial (the 4-trial memory run uses 0.5 so that four fit
on two cores). Sweeps share their runs between benchmarks within one invocation; each sweep starts from an empty
cache folder, so its time includes building the slice and feature caches (the tiny backbone is made once).

``--backbone vit-s-shape`` runs the grids (sweep, memory, naive, fixed) on a randomly initialised DINOv2 with
ViT-S/14's shape instead of the tiny one, loaded from a local folder through the same ``from_pretrained`` path: on
a CPU it costs what a real backbone costs relative to the decoders (17× the tiny one at 56 px), which is what the
frozen-feature cache is for. Expect the naive side to take several times longer.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BENCHMARKS = ("step", "data", "sweep", "memory", "naive", "fixed")
IMAGE_SIZE = 56
# Random-weight stand-ins for the grids' backbone (--backbone): name → transformers Dinov2Config fields.
BENCH_BACKBONES: dict[str, dict[str, int] | None] = {
    "tiny": None,  # lasegseg's own tiny DINOv2 (4 blocks of width 128)
    "vit-s-shape": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6, "intermediate_size": 1536},
}
PHANTOM_CASES = 12
FIXED_COST_GOAL_S = 3.0


# ---------------------------------------------------------------------------------------------------------------
# Rows: every measurement is one row (printed at once, summarised and written as JSON at the end)


@dataclass
class Row:
    """One measured ratio (or value) with its goal.

    Args:
        bench: benchmark name.
        name: what was measured.
        value: the ratio (or seconds for fixed cost); None when it could not be measured.
        unit: ``×`` or ``s``.
        goal: e.g. ``≤ 1.05``; empty for information only.
        verdict: PASS, MISS, info or n/a.
        detail: the raw numbers behind the ratio.
    """

    bench: str
    name: str
    value: float | None
    unit: str = "×"
    goal: str = ""
    verdict: str = "info"
    detail: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)

    def add(self, bench: str, name: str, value: float | None, *, unit: str = "×", goal: str = "",
            detail: str = "", note: str = "") -> Row:  # fmt: skip
        """Record and print one row; ``goal`` is ``≤ x`` or ``≥ x`` and decides PASS/MISS."""
        if value is None:
            verdict = "n/a"
        elif not goal:
            verdict = "info"
        else:
            op, threshold = goal.split()
            ok = value <= float(threshold) if op == "≤" else value >= float(threshold)
            verdict = "PASS" if ok else "MISS"
        row = Row(bench, name, value, unit, goal, verdict, detail + (f"  {note}" if note else ""))
        self.rows.append(row)
        shown = _value(value, unit)
        goal_text = f"(goal {goal}{unit})" if goal else ""
        print(f"  {name:<46} {shown:>9} {goal_text:<14} {verdict:<5} {row.detail}", flush=True)
        return row

    def ratio(self, bench: str, name: str, ours: list[float], ref: list[float], *, goal: str = "",
              invert: bool = False) -> Row:  # fmt: skip
        """A ratio of two timed lists: ours/ref (or ref/ours with ``invert``, a speed-up), judged on the minima.

        The minimum is the least noise-affected estimate on a shared machine; the median ratio is shown beside it.
        """
        a, b = (ref, ours) if invert else (ours, ref)
        r_min = min(a) / min(b)
        r_med = statistics.median(a) / statistics.median(b)
        detail = (f"lasegseg {_secs(min(ours))} (med {_secs(statistics.median(ours))})  reference {_secs(min(ref))} "
                  f"(med {_secs(statistics.median(ref))})  median ratio {r_med:.3f}×  n={len(ours)}")  # fmt: skip
        return self.add(bench, name, r_min, goal=goal, detail=detail)

    def summary(self) -> str:
        lines = [f"{'benchmark':<8} {'measure':<46} {'value':>9} {'goal':>8}  verdict", "-" * 86]
        for r in self.rows:
            shown = _value(r.value, r.unit)
            goal = f"{r.goal}{r.unit}" if r.goal else ""
            lines.append(f"{r.bench:<8} {r.name:<46} {shown:>9} {goal:>8}  {r.verdict}")
        return "\n".join(lines)


def _secs(seconds: float) -> str:
    return f"{seconds * 1000:.2f}ms" if seconds < 1 else f"{seconds:.2f}s"


def _value(value: float | None, unit: str) -> str:
    if value is None:
        return "n/a"
    return f"{value:g}" if not unit else f"{value:.3f}{unit}"


# ---------------------------------------------------------------------------------------------------------------
# Shared set-up


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}


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

    @property
    def size(self) -> int:
        return len(self.decoders) * len(self.lrs) * len(self.patients) * len(self.seeds)

    def yaml(self) -> str:
        return (
            f"name: bench-{self.name}\n"
            f"base: {{model.backbone: '{self.backbone}', model.mode: {self.mode}, data.image_size: {IMAGE_SIZE}, "
            f"train.epochs: {self.epochs}, train.batch_size: 16}}\n"
            f"grid: {{model.decoder: [{', '.join(self.decoders)}], optim.lr: [{', '.join(map(repr, self.lrs))}]}}\n"
            f"fewshot: [{', '.join(f'{{data.patients: {p}}}' for p in self.patients)}]\n"
            f"seeds: [{', '.join(map(str, self.seeds))}]\n"
            "resources: {cpus_per_trial: 1, max_concurrent: 1, max_failures: 0}\n"
        )

    def naive_args(self) -> list[str]:
        return ["--decoders", ",".join(self.decoders), "--modes", self.mode, "--lrs", ",".join(map(repr, self.lrs)),
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
            from lasegseg.models.backbones import tiny_backbone_dir

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
        env = _env(LASEGSEG_CACHE=str(cache_dir))
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
        timings = _timings(run.sweep_dir)
        # Driver start-up: imports, Ray, MLflow, slice + feature cache builds, until the first trial is scheduled.
        startup = min(float(r["scheduled_at"]) for r in timings) - launched if timings else None
        print(f"    (sweep {grid}: {g.size} trials at concurrency {concurrency}: {seconds:.1f} s, "
              f"{'' if startup is None else f'{startup:.1f} s of it before the first trial, '}"
              f"peak RSS {peak_rss / 2**20:.0f} MiB)", flush=True)  # fmt: skip
        self.sweeps[key] = run
        return run

    def naive(self, grid: str) -> dict[str, Any]:
        """Run bench/naive.py on ``grid``; returns its JSON plus the process wall time."""
        g = self.grids[grid]
        out = self.tmp / f"naive-{grid}.json"
        cmd = [sys.executable, str(ROOT / "bench" / "naive.py"), "--data", str(self.phantom), *g.naive_args(),
               "--threads", "1", "--json", str(out), "--out", str(self.tmp / f"naive-{grid}-models")]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=_env(LASEGSEG_CACHE=str(self.base_cache)), cwd=ROOT, capture_output=True,
                              text=True)  # fmt: skip
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"bench/naive.py failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
        result = json.loads(out.read_text())
        result["wall_s"] = seconds
        print(f"    (naive {grid}: {g.size} trials: {seconds:.1f} s)", flush=True)
        return result


def peak_memory_of_tree(proc: subprocess.Popen, interval: float = 0.25) -> tuple[int, int]:
    """Poll a process tree until its root exits; returns (peak summed RSS, peak summed PSS) in bytes.

    RSS counts a memory-mapped page once per process that touches it; PSS splits shared pages between them, so its
    sum is the tree's real footprint. Read from /proc (Linux), no extra dependency.
    """
    peak_rss = peak_pss = 0
    while proc.poll() is None:
        rss = pss = 0
        for pid in _tree(proc.pid):
            r, p = _rss_pss(pid)
            rss, pss = rss + r, pss + p
        peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        time.sleep(interval)
    return peak_rss, peak_pss


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _rss_pss(pid: int) -> tuple[int, int]:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in text.splitlines()[1:] if "kB" in line}
    return values.get("Rss", 0), values.get("Pss", 0)


# ---------------------------------------------------------------------------------------------------------------
# 1. step


def bench_step(b: Bench) -> None:
    """The lasegseg epoch loop (memory-mapped fp16 slices, LR schedule) vs a bare loop over ready tensors.

    --quick uses the grids' 56 px (a step there is ~4× cheaper, so fixed per-step costs weigh more, not less).
    """
    size = IMAGE_SIZE if b.quick else 112
    for decoder, mode in (("multiscale", "finetune"), ("linear", "frozen")):
        _bench_step_one(b, decoder, mode, size)


def _bench_step_one(b: Bench, decoder: str, mode: str, size: int) -> None:
    import numpy as np
    import torch

    from lasegseg.config import Config
    from lasegseg.models.segmenter import build_segmenter, param_groups
    from lasegseg.train.trial import _loss_fn, lr_factor, prepare_data, train_one_epoch

    cfg = Config().replace(**{"data.path": str(b.phantom), "data.image_size": size, "model.decoder": decoder,
                              "model.mode": mode, "train.batch_size": 16})  # fmt: skip
    data = prepare_data(cfg)
    steps = 6 if b.quick else 20
    order = np.resize(data.train_rows, steps * cfg.train.batch_size)
    torch.manual_seed(0)
    model = build_segmenter(cfg.model)
    groups = param_groups(model, cfg.optim.lr, cfg.model.backbone_lr_mult, cfg.optim.weight_decay)
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    loss_fn = _loss_fn()
    device = torch.device("cpu")
    idx = np.sort(order[: cfg.train.batch_size])
    x = torch.from_numpy(data.cache.images[idx].astype(np.float32))[:, None]
    y = torch.from_numpy(data.cache.labels[idx].astype(np.int64))[:, None]

    def bare() -> float:
        t = time.perf_counter()
        for _ in range(steps):
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - t) / steps

    def ours() -> float:
        t = time.perf_counter()
        train_one_epoch(model, opt, loss_fn, data.cache.images, data.cache.labels, order,
                        batch_size=cfg.train.batch_size, device=device, amp="auto",
                        lr_at=lambda i: lr_factor(i, 1000, 10, 0.01))  # fmt: skip
        return (time.perf_counter() - t) / steps

    model.train()
    bare(), ours()  # warm-up
    repeats = 3 if b.quick else 7
    a, r = [], []
    for _ in range(repeats):  # interleaved so machine noise hits both alike
        r.append(bare())
        a.append(ours())
    b.report.ratio("step", f"train step {decoder}/{mode} {size}px b16", a, r, goal="≤ 1.05")


# ---------------------------------------------------------------------------------------------------------------
# 2. data


def bench_data(b: Bench) -> None:
    """Cache builds per dataset, and batch reads from the caches vs the cheapest training steps they feed."""
    import numpy as np
    import torch

    from lasegseg.config import Config
    from lasegseg.models.segmenter import build_segmenter
    from lasegseg.train.features import get_or_build_features
    from lasegseg.train.trial import _loss_fn, prepare_data

    cache_dir = b.fresh_cache("data")
    base = Config().replace(**{"data.path": str(b.phantom), "data.image_size": IMAGE_SIZE,
                               "data.cache_dir": str(cache_dir), "train.batch_size": 16})  # fmt: skip
    t0 = time.perf_counter()
    data = prepare_data(base)
    build_s = time.perf_counter() - t0
    reopen = []
    for seed, patients in ((0, 2), (1, 4), (2, 0)):  # three more trials' views of the same dataset
        t0 = time.perf_counter()
        prepare_data(base.replace(seed=seed, **{"data.patients": patients}))
        reopen.append(time.perf_counter() - t0)
    built = [p for p in cache_dir.iterdir() if (p / "manifest.json").is_file()]
    b.report.add("data", "slice caches built for 4 trial views", float(len(built)), unit="", goal="≤ 1",
                 detail=f"build {build_s:.2f}s, reopen {statistics.median(reopen) * 1000:.0f} ms "
                        f"({build_s / statistics.median(reopen):.0f}× cheaper)")  # fmt: skip

    cache, rows = data.cache, np.arange(len(data.cache))
    bs, n_batches = 16, (20 if b.quick else 80)
    rng = np.random.default_rng(0)
    batches = [np.sort(rng.choice(rows, bs, replace=False)) for _ in range(n_batches)]

    def read_slices() -> float:
        t = time.perf_counter()
        for idx in batches:
            torch.from_numpy(np.asarray(cache.images[idx]))[:, None].float()
            torch.from_numpy(np.asarray(cache.labels[idx]))[:, None].long()
        return (time.perf_counter() - t) / n_batches

    torch.manual_seed(0)
    frozen = build_segmenter(base.replace(**{"model.mode": "frozen", "model.decoder": "linear"}).model)
    t0 = time.perf_counter()
    feats = get_or_build_features(frozen.backbone, cache)
    feat_build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    get_or_build_features(frozen.backbone, cache)
    feat_open_s = time.perf_counter() - t0
    n_feat = len(list((cache_dir / "features").glob("*/manifest.json")))
    b.report.add("data", "feature caches built for 2 frozen opens", float(n_feat), unit="", goal="≤ 1",
                 detail=f"build {feat_build_s:.2f}s, reopen {feat_open_s * 1000:.0f} ms")  # fmt: skip

    def read_features() -> float:
        t = time.perf_counter()
        for idx in batches:
            feats.batch(idx, torch.device("cpu"))
        return (time.perf_counter() - t) / n_batches

    loss_fn = _loss_fn()
    x = torch.from_numpy(np.asarray(cache.images[batches[0]]))[:, None].float()
    y = torch.from_numpy(np.asarray(cache.labels[batches[0]]))[:, None].long()
    f = feats.batch(batches[0], torch.device("cpu"))
    finetune = build_segmenter(base.replace(**{"model.mode": "finetune", "model.decoder": "linear"}).model)

    def step(model, forward) -> float:
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        t = time.perf_counter()
        for _ in range(n_batches):
            loss = loss_fn(forward(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - t) / n_batches

    repeats = 3 if b.quick else 7
    read_slices(), read_features()  # warm the page cache, as every epoch after the first finds it
    slice_t, feat_t, ft_t, fr_t = [], [], [], []
    for _ in range(repeats):
        slice_t.append(read_slices())
        feat_t.append(read_features())
        ft_t.append(step(finetune, lambda: finetune(x)))
        fr_t.append(step(frozen, lambda: frozen.decode(f, x)))
    # Loader time as a share of the step it feeds; the cheapest steps (linear decoder) are the hardest case.
    b.report.ratio("data", "slice batch read / finetune-linear step", slice_t, ft_t, goal="≤ 0.10")
    both = [s + t for s, t in zip(slice_t, feat_t, strict=True)]
    b.report.ratio("data", "slice+feature read / frozen-linear step", both, fr_t, goal="≤ 0.10")


# ---------------------------------------------------------------------------------------------------------------
# 3. sweep


def bench_sweep(b: Bench) -> None:
    """The frozen grid through the sweep (concurrency 1 and 2) vs run_trial in a plain loop in one process."""
    from lasegseg.sweep.spec import load_spec

    g = b.grids["frozen"]
    config = b.tmp / "loop.yaml"
    config.write_text(g.yaml())
    trials = load_spec(config, overrides={"data.path": str(b.phantom)}).trials()
    # The same trials in one fresh process: imports, cache build and backbone loads included, as in the sweep.
    loop = (
        "import sys, time; t=time.perf_counter(); import torch; torch.set_num_threads(1);"
        "from lasegseg.config import from_flat; from lasegseg.train.trial import open_cache, prepare_data, run_trial;"
        f"trials={trials!r};"
        "cache=open_cache(from_flat(trials[0]));"
        "[run_trial(from_flat(f), data=prepare_data(from_flat(f), cache=cache)) for f in trials]"
    )
    t0 = time.perf_counter()
    env = _env(LASEGSEG_CACHE=str(b.fresh_cache("loop")))
    subprocess.run([sys.executable, "-c", loop], env=env, check=True, capture_output=True, cwd=ROOT)
    loop_s = time.perf_counter() - t0
    c1, c2 = b.sweep("frozen", 1), b.sweep("frozen", 2)
    b.report.ratio("sweep", f"sweep/loop, {g.size} frozen trials, conc 1", [c1.seconds], [loop_s], goal="≤ 1.15")
    b.report.add("sweep", "speed-up at concurrency 2 on 2 cores", c1.seconds / c2.seconds,
                 detail=f"conc 1 {c1.seconds:.1f}s, conc 2 {c2.seconds:.1f}s (ideal 2×)")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# 4. memory


def bench_memory(b: Bench) -> None:
    """Peak memory of the sweep process tree with 1, 2 and 4 trials at once (frozen grid)."""
    runs = {1: b.sweep("frozen", 1), 2: b.sweep("frozen", 2), 4: b.sweep("frozen", 4, cpus_per_trial=0.5)}
    p1 = runs[1]
    for conc in (2, 4):
        r = runs[conc]
        b.report.add(
            "memory",
            f"peak RSS {conc} vs 1 concurrent trials",
            r.peak_rss / p1.peak_rss,
            detail=f"{p1.peak_rss / 2**20:.0f} → {r.peak_rss / 2**20:.0f} MiB RSS; PSS "
            f"{p1.peak_pss / 2**20:.0f} → {r.peak_pss / 2**20:.0f} MiB "
            f"(+{(r.peak_pss - p1.peak_pss) / (conc - 1) / 2**20:.0f} MiB PSS per added trial)",
        )
    caches = sum(f.stat().st_size for d in p1.cache_dir.iterdir() if d.name != "backbones" for f in d.rglob("*")
                 if f.is_file())  # fmt: skip
    print(f"    (slice + feature caches the trials share: {caches / 2**20:.1f} MiB on disk)", flush=True)


# ---------------------------------------------------------------------------------------------------------------
# 5. naive


def bench_naive(b: Bench) -> None:
    """bench/naive.py vs sweeps/fewshot.py on the frozen grid, the fine-tuned trials and the whole grid."""
    naive = {name: b.naive(name) for name in ("frozen", "finetune")}
    ours1 = {name: b.sweep(name, 1) for name in ("frozen", "finetune")}
    # Concurrency 2 for both grids in full mode; --quick keeps it to the frozen grid (the sweep benchmark's run).
    ours2 = {name: b.sweep(name, 2) for name in (("frozen",) if b.quick else ("frozen", "finetune"))}
    nf, nt = naive["frozen"]["wall_s"], naive["finetune"]["wall_s"]
    gf, gt = b.grids["frozen"], b.grids["finetune"]
    b.report.ratio("naive", f"frozen grid ({gf.size} trials) speed-up, conc 1", [ours1["frozen"].seconds], [nf],
                   goal="≥ 5", invert=True)  # fmt: skip
    b.report.ratio("naive", "frozen grid speed-up, conc 2", [ours2["frozen"].seconds], [nf], invert=True)
    b.report.ratio("naive", f"fine-tuned ({gt.size} trials) lasegseg/naive, conc 1", [ours1["finetune"].seconds],
                   [nt], goal="≤ 1.10")  # fmt: skip
    # Per trial (sums of trial times, without either process's start-up): what each trial costs once running.
    # The frozen trials' share excludes the driver's one-off feature-cache build, which the grid row includes.
    for name, goal, invert in (("finetune", "≤ 1.10", False), ("frozen", "", True)):
        per_trial = _per_trial_seconds(ours1[name].sweep_dir)
        naive_trials = sum(t["seconds"] for t in naive[name]["trials"])
        label = "fine-tuned per-trial sum lasegseg/naive" if name == "finetune" else "frozen per-trial sum speed-up"
        if len(per_trial) == b.grids[name].size:
            b.report.ratio("naive", label, [sum(per_trial.values())], [naive_trials],
                           goal=goal, invert=invert)  # fmt: skip
        else:
            b.report.add("naive", label, None, detail="no MLflow run times for every trial")
    for name, run in ours1.items():
        rows = _timings(run.sweep_dir)
        startup = min(float(r["scheduled_at"]) for r in rows) - run.launched if rows else None
        b.report.add("naive", f"lasegseg {name} sweep start-up to 1st trial", startup, unit="s",
                     detail=f"of {run.seconds:.1f}s wall (imports, caches, MLflow, Ray, first worker)")  # fmt: skip
    if "finetune" in ours2:
        b.report.ratio("naive", "fine-tuned lasegseg/naive, conc 2", [ours2["finetune"].seconds], [nt])
    whole = ours1["frozen"].seconds + ours1["finetune"].seconds
    b.report.ratio("naive", f"whole grid ({gf.size + gt.size} trials) speed-up, conc 1", [whole], [nf + nt],
                   invert=True)  # fmt: skip
    if "finetune" in ours2:
        whole2 = ours2["frozen"].seconds + ours2["finetune"].seconds
        b.report.ratio("naive", "whole grid speed-up, conc 2", [whole2], [nf + nt], invert=True)
    # Same data, model and epochs: the quality should be alike too (not a speed number; printed for sanity).
    for name in ("frozen", "finetune"):
        dice = [t["test_dice"] for t in naive[name]["trials"]]
        print(f"    ({name}: naive mean test Dice {statistics.mean(dice):.3f}; "
              f"lasegseg {_mean_test_dice(ours1[name].sweep_dir)})", flush=True)  # fmt: skip


def _per_trial_seconds(sweep_dir: Path) -> dict[str, float]:
    """Trial name → seconds from scheduling (trial_timings.csv) or MLflow start to the MLflow run's end."""
    try:
        from mlflow.tracking import MlflowClient

        state = json.loads((sweep_dir / "sweep_state.json").read_text())
        runs = MlflowClient(state["tracking_uri"]).search_runs(
            [state["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}'"
        )
    except Exception as exc:  # any failure here only loses this one row
        print(f"    (per-trial times unavailable: {type(exc).__name__}: {exc})", flush=True)
        return {}
    scheduled = {r["run_name"]: float(r["scheduled_at"]) for r in _timings(sweep_dir) or []}
    out = {}
    for run in runs:
        name, end = run.info.run_name, run.info.end_time
        if end:
            start = scheduled.get(name, run.info.start_time / 1000)
            out[name] = end / 1000 - start
    return out


def _mean_test_dice(sweep_dir: Path) -> str:
    try:
        with open(sweep_dir / "trials.csv", newline="") as fh:
            values = [float(r["test_dice_mean"]) for r in csv.DictReader(fh) if r.get("test_dice_mean")]
        return f"{statistics.mean(values):.3f}"
    except (OSError, ValueError, KeyError, statistics.StatisticsError):
        return "n/a"


# ---------------------------------------------------------------------------------------------------------------
# 6. fixed


def _timings(sweep_dir: Path) -> list[dict[str, str]] | None:
    path = sweep_dir / "trial_timings.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _tune_start(sweep_dir: Path) -> float | None:
    """Wall-clock start of the sweep's Tune experiment (``stats.start_time`` of its experiment state), or None."""
    starts = []
    for path in sweep_dir.glob("tune/*/experiment_state-*.json"):
        try:
            starts.append(float(json.loads(path.read_text())["stats"]["start_time"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return min(starts, default=None)


def fixed_costs(runs: list[SweepRun]) -> tuple[list[float], list[float], list[float]] | None:
    """Fixed costs in seconds over sweeps, None when no sweep wrote trial_timings.csv.

    Returns:
        ``(cold, cold_from_start, warm)``: cold = the first ``concurrency`` trials to start in a sweep (each the
        first of its worker), from the driver's scheduling time; cold_from_start = the same trials' first step
        measured from the Tune experiment's start, so whatever the worker still had to do (a process start and
        its imports if it was not started warm with the cluster) counts too; warm = the other trials (reused
        workers).
    """
    cold, cold_from_start, warm, found = [], [], [], False
    for run in runs:
        rows = _timings(run.sweep_dir)
        if rows is None:
            continue
        found = True
        rows = sorted((r for r in rows if r.get("fixed_cost_s")), key=lambda r: float(r["started_at"]))
        cold += [float(r["fixed_cost_s"]) for r in rows[: run.concurrency]]
        warm += [float(r["fixed_cost_s"]) for r in rows[run.concurrency :]]
        start = _tune_start(run.sweep_dir)
        for r in rows[: run.concurrency]:
            # The driver's own record of when Tune began (before any trial's resources were asked for), else Tune's.
            began = float(r.get("tune_started_at") or 0) or start
            if began is not None:
                cold_from_start.append(float(r["first_step_at"]) - began)
    return (cold, cold_from_start, warm) if found else None


def bench_fixed(b: Bench) -> None:
    """Fixed cost per trial from the trial_timings.csv of every sweep run in this invocation."""
    if not b.sweeps:
        b.sweep("frozen", 1)
    runs = list(b.sweeps.values())
    costs = fixed_costs(runs)
    goal = f"≤ {FIXED_COST_GOAL_S:g}"
    names = ("cold, from scheduling (first of a worker)", "cold, from Tune start (worker start incl.)",
             "warm (median of the rest)")  # fmt: skip
    if costs is None:
        for name in names:
            b.report.add("fixed", name, None, unit="s", detail="n/a (driver did not write trial_timings.csv)")
        return
    for i, (name, values) in enumerate(zip(names, costs, strict=True)):
        detail = f"max {max(values, default=0):.2f}s over {len(values)} trials of {len(runs)} sweeps"
        if i == 1:  # contention shows here: n workers starting at once on 2 cores
            detail += "; first trial per sweep: " + ", ".join(
                f"{r.grid}/c{r.concurrency} {c[1][0]:.1f}s" for r in runs if (c := fixed_costs([r])) and c[1]
            )
        b.report.add("fixed", name, statistics.median(values) if values else None, unit="s", goal=goal, detail=detail)
    # Whether the first trials found warm workers (started with the local cluster, torch & co. imported) or paid a
    # process start: trial_timings.csv records each trial's worker.
    warm_started, total = 0, 0
    for run in runs:
        rows = _timings(run.sweep_dir) or []
        total += len(rows)
        warm_started += sum(
            1 for r in rows if r.get("worker_prewarmed") == "true"
            and 0 < float(r.get("worker_started_at") or 0) < float(r.get("tune_started_at") or 0)
        )  # fmt: skip
    b.report.add("fixed", "trials on warm pre-started workers", warm_started, unit="",
                 detail=f"{warm_started} of {total} trials (info)")  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------


def parse_only(text: str | None) -> list[str]:
    """``--only step,naive`` → the benchmarks to run in their canonical order (all when empty)."""
    if not text:
        return list(BENCHMARKS)
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"run.py: error: unknown benchmark '{unknown[0]}' (valid: {', '.join(BENCHMARKS)})")
    return [n for n in BENCHMARKS if n in names]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))  # fmt: skip
        cpu = model
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}, "
            f"OMP_NUM_THREADS=1, load average {os.getloadavg()[0]:.1f}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller grids and fewer repeats (CPU, < 10 minutes)")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every row as JSON here")
    parser.add_argument("--epochs", type=int, default=None, help="override the grids' epochs (smoke runs)")
    parser.add_argument("--keep", default=None, metavar="DIR", help="work in DIR and keep it (sweep logs, outputs)")
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
        for g in bench.grids.values():
            print(f"grid {g.name}: {g.size} trials ({len(g.decoders)} decoders × {len(g.lrs)} lr × "
                  f"{len(g.patients)} few-shot sizes × {len(g.seeds)} seeds), {g.epochs} epochs, {IMAGE_SIZE} px, "
                  f"backbone {args.backbone}",
                  flush=True)  # fmt: skip
        runners = {"step": bench_step, "data": bench_data, "sweep": bench_sweep, "memory": bench_memory,
                   "naive": bench_naive, "fixed": bench_fixed}  # fmt: skip
        for name in selected:
            t0 = time.perf_counter()
            print(f"[{name}]", flush=True)
            runners[name](bench)
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
