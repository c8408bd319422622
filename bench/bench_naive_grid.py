"""5. naive — bench/naive.py (a researcher's per-trial script: reads the volumes again per trial, runs the backbone
on every batch, fp32) vs sweeps/fewshot.py on the same grid, data, model and epochs; process start and imports
included on both sides. Frozen grid (goal ≥ 5× faster), fine-tuned trials (per-trial sum ≤ 1.05× the naive
time; checkpointing ≤ 5 % of their training time), whole grid.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from bench.common import read_timings
from bench.harness import Bench


def measure(b: Bench) -> None:
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
    for name, goal, invert in (("finetune", "≤ 1.05", False), ("frozen", "", True)):
        per_trial = _per_trial_seconds(ours1[name].sweep_dir)
        naive_trials = sum(t["seconds"] for t in naive[name]["trials"])
        label = "fine-tuned per-trial sum lasegseg/naive" if name == "finetune" else "frozen per-trial sum speed-up"
        if len(per_trial) == b.grids[name].size:
            b.report.ratio("naive", label, [sum(per_trial.values())], [naive_trials],
                           goal=goal, invert=invert)  # fmt: skip
        else:
            b.report.add("naive", label, None, detail="no MLflow run times for every trial")
    _checkpoint_share(b, ours1["finetune"])
    for name, run in ours1.items():
        rows = read_timings(run.sweep_dir)
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


def _checkpoint_share(b: Bench, run) -> None:
    """Training-state saves (the write and Tune's copy) over the epochs' time, summed over the fine-tuned trials."""
    rows = [r for r in read_timings(run.sweep_dir) or [] if r.get("fit_s")]
    fit, saves = sum(float(r["fit_s"]) for r in rows), sum(float(r["checkpoint_s"] or 0) for r in rows)
    b.report.add(
        "naive", "checkpointing / fine-tuned training time", saves / fit if fit else None, goal="≤ 0.05",
        detail=f"{saves:.2f}s of saves over {fit:.1f}s of epochs in {len(rows)} trials" if fit else "no fit_s recorded",
    )  # fmt: skip


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
    scheduled = {r["run_name"]: float(r["scheduled_at"]) for r in read_timings(sweep_dir) or []}
    out = {}
    for run in runs:
        name, end = run.info.run_name, run.info.end_time
        if end:
            start = scheduled.get(name, run.info.start_time / 1000)
            out[name] = end / 1000 - start
    return out


def _mean_test_dice(sweep_dir: Path) -> str:
    """The sweep's mean test Dice over its trials.csv, ``n/a`` when it has none."""
    try:
        with open(sweep_dir / "trials.csv", newline="") as fh:
            values = [float(r["test_dice_mean"]) for r in csv.DictReader(fh) if r.get("test_dice_mean")]
        return f"{statistics.mean(values):.3f}"
    except (OSError, ValueError, KeyError, statistics.StatisticsError):
        return "n/a"
