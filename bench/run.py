"""lasegseg benchmarks: each prints a ratio measured in one run on this machine (min / median over repeats).

    python bench/run.py --quick          # CPU, a few minutes
    python bench/run.py --only step      # one benchmark: step | sweep

1. step  — the training loop's step time vs a bare PyTorch loop on the same model and batch (goal ≤ 1.05×).
2. sweep — N tiny trials through the Ray Tune sweep vs the same trials called in a plain loop (goal ≤ 1.15× at
           concurrency 1), and peak memory with 1 vs 2 concurrent trials (the slice cache is memory-mapped, not
           copied per trial).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _phantom(tmp: Path, cases: int = 6) -> Path:
    from lasegseg.data.phantom import write_phantom

    root = tmp / "phantom"
    if not root.exists():
        write_phantom(root, cases=cases, seed=0, layout="msd")
    return root


def _row(name: str, ours: list[float], ref: list[float], unit: str = "s", goal: str = "") -> None:
    ratio_min = min(ours) / min(ref)
    ratio_med = statistics.median(ours) / statistics.median(ref)
    print(
        f"{name:<38} lasegseg {min(ours):8.4f}{unit} (median {statistics.median(ours):.4f})  "
        f"reference {min(ref):8.4f}{unit} (median {statistics.median(ref):.4f})  "
        f"ratio min {ratio_min:5.3f}×  median {ratio_med:5.3f}×  {goal}",
        flush=True,
    )


def bench_step(tmp: Path, quick: bool) -> None:
    """The lasegseg epoch loop (memory-mapped fp16 slices, LR schedule) vs a bare loop over ready tensors."""
    for decoder, mode, size in (("multiscale", "finetune", 112), ("linear", "frozen", 112)):
        _bench_step_one(tmp, quick, decoder, mode, size)


def _bench_step_one(tmp: Path, quick: bool, decoder: str, mode: str, size: int) -> None:
    import numpy as np
    import torch

    from lasegseg.config import Config
    from lasegseg.models.segmenter import build_segmenter, param_groups
    from lasegseg.train.trial import _loss_fn, lr_factor, prepare_data, train_one_epoch

    cfg = Config().replace(**{"data.path": str(_phantom(tmp)), "data.image_size": size, "model.decoder": decoder,
                              "model.mode": mode, "train.batch_size": 16})  # fmt: skip
    data = prepare_data(cfg)
    steps = 6 if quick else 20
    order = data.train_rows[: steps * cfg.train.batch_size]
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
    repeats = 3 if quick else 7
    a, b = [], []
    for _ in range(repeats):  # interleaved so machine noise hits both alike
        b.append(bare())
        a.append(ours())
    _row(f"train step {decoder}/{mode} {size}px b16", a, b, goal="(goal ≤ 1.05×)")


def _peak_rss_of_tree(proc: subprocess.Popen, interval: float = 0.2) -> tuple[int, float]:
    """Poll the summed RSS of a process tree until it exits; returns (peak bytes, seconds)."""
    import psutil

    t0 = time.perf_counter()
    peak = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(interval)
    return peak, time.perf_counter() - t0


def bench_sweep(tmp: Path, quick: bool) -> None:
    """Sweep overhead at concurrency 1, and peak memory at 1 vs 2 concurrent trials."""
    from lasegseg.sweep.spec import load_spec

    data = _phantom(tmp)
    sweep_yaml = tmp / "bench.yaml"
    epochs = 3 if quick else 6
    sweep_yaml.write_text(
        f"name: bench\nbase: {{data.image_size: 56, train.epochs: {epochs}, model.mode: frozen}}\n"
        "grid: {model.decoder: [linear, conv]}\nfewshot: [{data.patients: 2}, {data.patients: 4}]\nseeds: [0]\n"
        "resources: {cpus_per_trial: 1, max_concurrent: 1}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    spec = load_spec(sweep_yaml, overrides={"data.path": str(data)})
    trials = spec.trials()

    # Reference: the same trials in a plain loop, in one fresh process (imports and cache open included).
    loop = (
        "import sys, time; t=time.perf_counter();"
        "from lasegseg.config import from_flat; from lasegseg.train.trial import open_cache, prepare_data, run_trial;"
        f"trials={trials!r};"
        "cache=open_cache(from_flat(trials[0]));"
        "[run_trial(from_flat(f), data=prepare_data(from_flat(f), cache=cache)) for f in trials];"
        "print(time.perf_counter()-t)"
    )
    ref_times, sweep_times, peaks = [], [], {}
    repeats = 1 if quick else 2
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", loop], env=env, check=True, capture_output=True, cwd=ROOT)
        ref_times.append(time.perf_counter() - t)
        for conc in (1, 2):
            store = Path(tempfile.mkdtemp(dir=tmp))
            cmd = [sys.executable, str(ROOT / "sweeps" / "fewshot.py"), "--config", str(sweep_yaml), "--data",
                   str(data), "--storage-path", str(store), "--max-concurrent", str(conc)]  # fmt: skip
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
            peak, seconds = _peak_rss_of_tree(proc)
            if proc.returncode != 0:
                raise SystemExit(f"sweep failed (exit {proc.returncode})")
            peaks.setdefault(conc, []).append(peak)
            if conc == 1:
                sweep_times.append(seconds)
    _row(f"sweep of {len(trials)} trials, concurrency 1", sweep_times, ref_times, goal="(goal ≤ 1.15×)")
    p1, p2 = min(peaks[1]), min(peaks[2])
    print(f"{'peak RSS of the sweep process tree':<38} 1 trial {p1 / 2**20:8.0f} MiB   2 concurrent {p2 / 2**20:8.0f} "
          f"MiB   ratio {p2 / p1:5.3f}×", flush=True)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and epochs (CPU, a few minutes)")
    parser.add_argument("--only", choices=("step", "sweep"), default=None)
    args = parser.parse_args()
    os.environ.setdefault("LASEGSEG_CACHE", str(Path(tempfile.gettempdir()) / "lasegseg-bench-cache"))
    with tempfile.TemporaryDirectory(prefix="lasegseg-bench-") as tmp:
        tmp_path = Path(tmp)
        if args.only in (None, "step"):
            bench_step(tmp_path, args.quick)
        if args.only in (None, "sweep"):
            bench_sweep(tmp_path, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
