"""The rehearsal's arithmetic, pure: per-trial overheads from ``trial_timings.csv`` (with the slots each attempt held
rebuilt from the attempts' intervals), the idle slot-time while trials were pending, the saves of Tune's experiment
state, the MLflow server's request log, the runs (each FINISHED once? rerun after a resume?) and the bucket.

Definitions (the table prints them too):

- an attempt holds a slot from ``scheduled_at`` to ``ended_at``; slots are rebuilt greedily: attempts in order of
  ``scheduled_at``, each on the free slot freed last (so a slot's attempts follow each other as Tune reuses a
  worker);
- scheduling = ``scheduled_at`` − the slot's previous ``ended_at`` (Tune's start for a slot's first attempt);
- worker set-up = ``first_step_at`` − ``started_at``; bookkeeping = ``tracking_start_s`` + ``end_cost_s``;
- gap between trials on one slot = ``first_step_at`` − the slot's previous ``ended_at`` (no training on that slot
  meanwhile: scheduling, the trainable's entry, its run start and set-up);
- idle share = ∫ max(0, min(S − running(t), pending(t))) dt / (S × study wall), from Tune's start to the last
  attempt's end, where pending(t) = trials neither finished nor running at t (those not yet created by the search,
  such as grid trials waiting on their cell's screen, count).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections import Counter, defaultdict
from typing import Any

REQUEST = re.compile(r'"(GET|POST|PUT|PATCH|DELETE|HEAD) (/\S*) HTTP/[\d.]+"')
MARKER_FILE = "mlflow_run.json"  # a finished trial's checkpoint holds only this (lasegseg/sweep/trainable.py)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) by linear interpolation between the closest ranks; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def med_p95(values: list[float]) -> tuple[float | None, float | None]:
    return (statistics.median(values) if values else None), percentile(values, 95)


def _f(row: dict[str, str], key: str) -> float | None:
    text = row.get(key) or ""
    try:
        return float(text)
    except ValueError:
        return None


def attempts(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """Attempts that both started and ended, in order of ``scheduled_at``."""
    done = [r for r in rows if _f(r, "scheduled_at") is not None and _f(r, "ended_at") is not None]
    return sorted(done, key=lambda r: _f(r, "scheduled_at"))


def assign_slots(intervals: list[tuple[float, float]], slots: int | None = None) -> list[tuple[int, float | None]]:
    """Greedy slots for intervals sorted by start: each goes on the free slot freed last (a new slot when none is
    free). Returns, per interval, ``(slot, previous end on that slot or None)``; more slots than ``slots`` may be
    used when the intervals overlap more than that (Tune's own bookkeeping after a trial's end)."""
    free_at: list[float] = []
    out = []
    for start, end in intervals:
        free = [i for i, t in enumerate(free_at) if t <= start]
        if free:
            slot = max(free, key=lambda i: free_at[i])
            out.append((slot, free_at[slot]))
            free_at[slot] = end
        else:
            free_at.append(end)
            out.append((len(free_at) - 1, None))
    return out


def overheads(rows: list[dict[str, str]], tune_start: float | None = None) -> dict[str, list[float]]:
    """Per attempt: scheduling, worker set-up, bookkeeping and the gap on its slot (seconds; see the module doc)."""
    done = attempts(rows)
    start = tune_start if tune_start is not None else min((_f(r, "tune_started_at") or math.inf for r in done),
                                                          default=None)  # fmt: skip
    slots = assign_slots([(_f(r, "scheduled_at"), _f(r, "ended_at")) for r in done])
    out: dict[str, list[float]] = {"scheduling": [], "setup": [], "bookkeeping": [], "gap": []}
    for row, (_slot, prev_end) in zip(done, slots, strict=True):
        scheduled, first = _f(row, "scheduled_at"), _f(row, "first_step_at")
        before = prev_end if prev_end is not None else start
        if before is not None and math.isfinite(before):
            out["scheduling"].append(max(0.0, scheduled - before))
            if first:
                out["gap"].append(max(0.0, first - before))
        started = _f(row, "started_at")
        if first and started:
            out["setup"].append(max(0.0, first - started))
        end_cost = _f(row, "end_cost_s")
        if end_cost is not None:
            out["bookkeeping"].append(end_cost + (_f(row, "tracking_start_s") or 0.0))
    return out


def idle_share(rows: list[dict[str, str]], total: int, slots: int, tune_start: float | None = None) -> float | None:
    """Share of the study's slot-time idle while trials were pending (see the module doc); None without attempts.

    Args:
        rows: trial_timings.csv rows; total: trials of the study; slots: slots of the cluster.
    """
    done = attempts(rows)
    if not done:
        return None
    t0 = tune_start if tune_start is not None else min(_f(r, "tune_started_at") or _f(r, "scheduled_at") for r in done)
    last_end: dict[str, float] = {}
    for r in done:
        last_end[r["trial_id"]] = max(last_end.get(r["trial_id"], 0.0), _f(r, "ended_at"))
    events: list[tuple[float, int, int]] = []  # (time, Δrunning, Δfinished)
    for r in done:
        events.append((_f(r, "scheduled_at"), 1, 0))
        final = last_end[r["trial_id"]] == _f(r, "ended_at")
        events.append((_f(r, "ended_at"), -1, 1 if final else 0))
    events.sort()
    t_end = events[-1][0]
    idle = 0.0
    running = finished = 0
    t = t0
    for when, d_run, d_fin in events:
        if when > t:
            pending = total - finished - running
            idle += max(0, min(slots - running, pending)) * (when - t)
            t = when
        running += d_run
        finished += d_fin
    wall = t_end - t0
    return idle / (slots * wall) if wall > 0 else None


def compute_split(rows: list[dict[str, str]]) -> float:
    """Seconds of training (``fit_s``: epochs with their validation) summed over the attempts."""
    return sum(_f(r, "fit_s") or 0.0 for r in rows)


def state_saves(text: str) -> dict[str, Any]:
    """``$LASEGSEG_TUNE_STATE_LOG`` lines (``wall_time,seconds_in_driver,forced``) → count, max, total, forced."""
    secs, forced = [], 0
    for line in text.splitlines():
        parts = line.strip().split(",")
        if len(parts) == 3:
            secs.append(float(parts[1]))
            forced += int(parts[2])
    return {"state_saves": len(secs), "state_save_max_s": max(secs, default=0.0),
            "state_save_total_s": sum(secs), "state_saves_forced": forced}  # fmt: skip


def count_requests(log: str) -> dict[str, Any]:
    """The server's access-log lines: total and the ten most frequent ``METHOD path`` (query strings dropped)."""
    kinds = Counter(f"{m.group(1)} {m.group(2).split('?')[0]}" for m in REQUEST.finditer(log))
    return {"total": sum(kinds.values()), "top": kinds.most_common(10)}


def run_checks(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Every trial run FINISHED exactly once: statuses, and (config hash, role) pairs held by more than one run."""
    trials = [r for r in runs if r["role"] != "sweep"]
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for r in trials:
        groups[(r["config"], r["role"])].append(r["run_id"])
    doubled = {f"{role}:{cfg}": ids for (cfg, role), ids in groups.items() if len(ids) > 1}
    return {"runs_total": len(runs), "runs_trials": len(trials), "runs_by_status": dict(Counter(r["status"] for r in
            trials)), "runs_by_role": dict(Counter(r["role"] for r in runs)), "runs_doubled": len(doubled),
            "runs_doubled_keys": list(doubled)[:5]}  # fmt: skip


def rerun(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs FINISHED before a kill that were trained again after it: their end time moved, or another run of the
    same (config, role) appeared."""
    now = {r["run_id"]: r for r in after}
    by_key = defaultdict(list)
    for r in after:
        by_key[(r["config"], r["role"])].append(r["run_id"])
    out = []
    for r in before:
        if r["status"] != "FINISHED" or r["role"] == "sweep":
            continue
        later = now.get(r["run_id"])
        if later is None or later["end"] != r["end"] or len(by_key[(r["config"], r["role"])]) > 1:
            out.append(r)
    return out


def bucket_summary(objects: list[tuple[str, int]], sweep_prefix: str) -> dict[str, Any]:
    """The bucket at the end: bytes by top-level part, Tune's experiment state, training state left in trial
    checkpoints (anything but the finished-run marker), and whether the summary was pushed."""
    by_part: Counter = Counter()
    for key, size in objects:
        by_part[key.split("/", 1)[0]] += size
    tune = f"{sweep_prefix}/tune/study/"
    state = [(k, s) for k, s in objects if k.startswith(tune) and re.fullmatch(r"experiment_state-.*\.json",
                                                                              k[len(tune):])]  # fmt: skip
    ckpt = [(k, s) for k, s in objects if k.startswith(tune) and "/checkpoint_" in k and not k.endswith("/")]
    leftover = [(k, s) for k, s in ckpt if not k.endswith("/" + MARKER_FILE)]
    trials_left = {k[len(tune) :].split("/", 1)[0] for k, _ in leftover}
    names = {k[len(sweep_prefix) + 1 :] for k, _ in objects if k.startswith(sweep_prefix + "/")}
    return {"bucket_bytes": sum(s for _, s in objects), "bucket_objects": len(objects),
            "bucket_by_part": dict(by_part), "state_json_bytes": sum(s for _, s in state),
            "state_json_files": len(state), "training_state_bytes": sum(s for _, s in leftover),
            "training_state_files": len(leftover), "training_state_trials": len(trials_left),
            "markers": sum(1 for k, _ in ckpt if k.endswith("/" + MARKER_FILE)),
            "summary_in_bucket": sorted(n for n in names if n.startswith("summary."))}  # fmt: skip


def driver_tail(rows: list[dict[str, str]], launched: float, wall: float) -> float | None:
    """Seconds from the last attempt's end to the driver's exit (its summary, comparison and pushes)."""
    ends = [_f(r, "ended_at") for r in rows if _f(r, "ended_at")]
    return launched + wall - max(ends) if ends else None


def first_new(rows: list[dict[str, str]], since: float) -> float | None:
    """Seconds from ``since`` (a resume's launch) to the first attempt scheduled after it."""
    later = [_f(r, "scheduled_at") for r in rows if (_f(r, "scheduled_at") or 0) > since]
    return min(later) - since if later else None


def loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1, or IPv4 loopback mapped into IPv6 (``::ffff:7f00:1``)."""
    import ipaddress

    addr = ipaddress.ip_address(ip.split("%")[0])
    return bool((getattr(addr, "ipv4_mapped", None) or addr).is_loopback)


def dumps(value: Any) -> str:
    return json.dumps(value, default=str)
