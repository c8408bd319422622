"""6. fixed — a trial's fixed cost (scheduling → first optimizer step) from the driver's trial_timings.csv: cold =
first trial of a fresh worker, warm = median of the rest (goal ≤ 3 s); and its bookkeeping (opening its MLflow run,
then from its test patients scored to Tune recording it complete: model, files, overlays, artifacts, final metrics,
last report; goal ≤ 0.2 s).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from bench.common import read_timings
from bench.harness import Bench, SweepRun

FIXED_COST_GOAL_S = 3.0
BOOKKEEPING_GOAL_S = 0.2


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
        rows = read_timings(run.sweep_dir)
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


def bookkeeping(runs: list[SweepRun]) -> tuple[list[float], list[float]]:
    """Per trial that completed: ``(tracking_start_s + end_cost_s, end_cost_s)`` over the sweeps' timings files."""
    total, end = [], []
    for run in runs:
        for r in read_timings(run.sweep_dir) or []:
            if r.get("end_cost_s"):
                end.append(float(r["end_cost_s"]))
                total.append(end[-1] + float(r.get("tracking_start_s") or 0.0))
    return total, end


def measure(b: Bench) -> None:
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
        rows = read_timings(run.sweep_dir) or []
        total += len(rows)
        warm_started += sum(
            1 for r in rows if r.get("worker_prewarmed") == "true"
            and 0 < float(r.get("worker_started_at") or 0) < float(r.get("tune_started_at") or 0)
        )  # fmt: skip
    b.report.add("fixed", "trials on warm pre-started workers", warm_started, unit="",
                 detail=f"{warm_started} of {total} trials (info)")  # fmt: skip
    total, end = bookkeeping(runs)
    b.report.add(
        "fixed", "bookkeeping per trial (median)", statistics.median(total) if total else None, unit="s",
        goal=f"≤ {BOOKKEEPING_GOAL_S:g}",
        detail=(f"MLflow run start + scored → complete; end alone median {statistics.median(end):.3f}s, max "
                f"{max(end):.3f}s over {len(end)} trials") if end else "n/a (no trial recorded end_cost_s)",
    )  # fmt: skip
