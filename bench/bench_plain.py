"""0. plain — the loop a new user writes first (bench/naive.py --variant plain: one process, no tracking, no
validation) against sweeps/fewshot.py on the same grid (linear/conv × frozen/finetune × 2/4 patients × 2 seeds,
15 epochs): the sweep at concurrency 1 within 1.15× the loop's wall time, at concurrency 2 on 2 cores ≥ 1.5× faster
than the loop; per-epoch validation ≤ 10 % of a training epoch; ≤ 3 s from the last trial's end to the sweep's exit.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from bench.harness import Bench, SweepRun


def measure(b: Bench) -> None:
    """The plain loop, the sweep at concurrency 1 and 2, the validation share and the sweep's tail."""
    g = b.grids["plain"]
    loop = b.naive("plain", variant="plain")["wall_s"]
    c1, c2 = b.sweep("plain", 1), b.sweep("plain", 2)
    b.report.add("plain", f"sweep/plain loop, {g.size} trials, conc 1", c1.seconds / loop, goal="≤ 1.15",
                 detail=f"sweep {c1.seconds:.1f}s, plain loop {loop:.1f}s")  # fmt: skip
    b.report.add("plain", "plain loop/sweep, conc 2 on 2 cores", loop / c2.seconds, goal="≥ 1.5",
                 detail=f"sweep {c2.seconds:.1f}s, plain loop {loop:.1f}s")  # fmt: skip
    share, detail = validation_share(b)
    b.report.add("plain", "validation / training time per epoch", share, goal="≤ 0.10", detail=detail)
    for run in (c1, c2):
        tail = seconds_after_last_trial(run)
        b.report.add("plain", f"last trial's end → sweep exit, conc {run.concurrency}", tail, unit="s", goal="≤ 3",
                     detail="" if tail is not None else "no MLflow end times")  # fmt: skip


def validation_share(b: Bench) -> tuple[float, str]:
    """Validation time over training time of the grid's two heaviest trials, in this process: every epoch's
    validation (within ``train.val_budget``) plus the chosen epoch's on every slice, over the epochs' training."""
    from lasegseg.config import Config
    from lasegseg.train.trial import run_trial

    g, val, train, names = b.grids["plain"], 0.0, 0.0, []
    for mode in ("frozen", "finetune"):
        cfg = Config().replace(**{"data.path": str(b.phantom), "model.backbone": g.backbone, "model.mode": mode,
                                  "model.decoder": "conv", "data.patients": max(g.patients), "data.image_size": 56,
                                  "train.epochs": g.epochs, "train.batch_size": 16, "optim.lr": g.lrs[0]})  # fmt: skip
        with tempfile.TemporaryDirectory(dir=b.tmp) as out:
            results = run_trial(cfg, Path(out))
        history = results["history"]
        v = sum(h.get("val_seconds", 0.0) for h in history)
        t = sum(h["epoch_seconds"] for h in history) - v
        full = results.get("val_full_seconds", 0.0)
        val, train = val + v + full, train + t
        names.append(f"conv/{mode}/p{max(g.patients)}: {v:.2f}s + {full:.2f}s (chosen epoch, every slice) of "
                     f"{t:.2f}s, every {results.get('val_slice_stride', 1)}. slice")  # fmt: skip
    return val / train, "; ".join(names)


def seconds_after_last_trial(run: SweepRun) -> float | None:
    """From the last trial's MLflow end time to the sweep process's exit."""
    try:
        from mlflow.tracking import MlflowClient

        state = json.loads((run.sweep_dir / "sweep_state.json").read_text())
        runs = MlflowClient(state["tracking_uri"]).search_runs(
            [state["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{state['parent_run_id']}'"
        )
    except Exception as exc:  # any failure here only loses this one row
        print(f"    (trial end times unavailable: {type(exc).__name__}: {exc})", flush=True)
        return None
    ends = [r.info.end_time for r in runs if r.info.end_time]
    return run.launched + run.seconds - max(ends) / 1000 if ends else None
