"""The driver's ``trial_timings.csv``: per trial attempt, what it cost before it trained and after it was scored.

The benchmark reads exactly these columns (``bench/bench_fixed.py``).
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

from ray import tune

from lasegseg.fsio import atomic_write
from lasegseg.sweep.state import TIMINGS_FILE
from lasegseg.sweep.study_table import StudyTable

TIMING = "timing"
TIMING_FIELDS = (
    "trial_id", "run_name", "tune_started_at", "scheduled_at", "started_at", "first_step_at", "fixed_cost_s",
    "worker_pid", "worker_started_at", "worker_prewarmed", "node_ip", "node_id", "device", "slice_cache_built",
    "features_built", "backbone_loaded", "tracking_start_s", "end_cost_s", "fit_s", "checkpoint_s", "ended_at",
)  # fmt: skip
"""``fixed_cost_s``: Tune scheduling the trial → its first optimizer step. ``tracking_start_s``: opening its MLflow
run (part of the fixed cost). ``end_cost_s``: its test patients scored → Tune recording it complete (model, files,
overlays, MLflow artifacts and final metrics, the last report). The two last are the trial's bookkeeping.
``ended_at``: when Tune recorded the attempt ended (complete, stopped early or failed): with ``scheduled_at``, the
slot-time each attempt held."""


class Timings(tune.Callback):
    """Writes ``<sweep_dir>/trial_timings.csv``: per trial attempt, when Tune started it (driver wall clock), when
    the trainable was entered and when it reached its first optimizer step (from its first report).

    ``fixed_cost_s = first_step_at - scheduled_at`` is what a trial costs before it trains: scheduling, worker
    start, imports, data attach, model build. ``worker_pid``, ``worker_started_at`` (process start, wall clock)
    and ``worker_prewarmed`` tell a trial on a warm worker from one that paid a process start: a worker started
    before ``tune_started_at`` (this Tune run's start) was not started for the trial. Rows of earlier runs of the
    sweep (``--resume``) are kept.

    The trial reports these in one JSON string, ``result["timing"]`` (a string, so that Tune keeps no per-metric
    statistics of it in its experiment state).

    The file is rewritten whole (a row gains its end cost when its trial ends), at most every ``flush_s`` seconds
    and when the study ends: rewritten on every result, a 1,400-trial study's driver would write gigabytes of it.

    Args:
        sweep_dir: the sweep's local folder.
        table: the study's trials (their names).
        flush_s: the least time between two writes of the file.
    """

    def __init__(self, sweep_dir: Path, table: StudyTable, flush_s: float = 5.0) -> None:
        self.table, self.flush_s, self._written = table, flush_s, -float("inf")
        self.path = Path(sweep_dir) / TIMINGS_FILE
        self.scheduled: dict[str, float] = {}
        self.tune_started_at = time.time()
        self.rows: list[dict[str, Any]] = []
        if self.path.is_file():
            with open(self.path, newline="") as fh:
                self.rows = list(csv.DictReader(fh))

    def setup(self, stop=None, num_samples=None, total_num_samples=None, **info):
        self.tune_started_at = time.time()  # before Tune asks Ray for any trial's resources or worker

    def on_trial_start(self, iteration, trials, trial, **info):
        self.scheduled[trial.trial_id] = time.time()

    def on_trial_restore(self, iteration, trials, trial, **info):
        self.scheduled[trial.trial_id] = time.time()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        result = timing(result)
        if "first_step_at" not in result or trial.trial_id not in self.scheduled:
            return
        scheduled = self.scheduled.pop(trial.trial_id)
        first = float(result["first_step_at"])
        self.rows.append({
            "trial_id": trial.trial_id, "run_name": self.table.name(trial.config),
            "tune_started_at": f"{self.tune_started_at:.3f}",
            "scheduled_at": f"{scheduled:.3f}", "started_at": f"{float(result['trial_started_at']):.3f}",
            "first_step_at": f"{first:.3f}", "fixed_cost_s": f"{first - scheduled:.3f}" if first else "",
            "worker_pid": result.get("worker_pid", ""),
            "worker_started_at": f"{float(result.get('worker_started_at') or 0):.3f}",
            "worker_prewarmed": str(bool(result.get("worker_prewarmed", False))).lower(),
            "node_ip": result.get("node_ip", ""), "node_id": result.get("node_id", ""),
            "device": result.get("device", ""),
            "slice_cache_built": str(bool(result.get("slice_cache_built", False))).lower(),
            "features_built": str(bool(result.get("features_built", False))).lower(),
            "backbone_loaded": str(bool(result.get("backbone_loaded", True))).lower(),
            "tracking_start_s": f"{float(result.get('tracking_start_s', 0.0)):.3f}",
        })  # fmt: skip
        self._save()

    def on_trial_complete(self, iteration, trials, trial, **info):
        last = timing(trial.last_result or {})
        scored = float(last.get("scored_at") or 0.0)
        row = next((r for r in reversed(self.rows) if r["trial_id"] == trial.trial_id), None)
        if row is None:
            return
        row["ended_at"] = f"{time.time():.3f}"
        if not scored:  # stopped early (ASHA): never scored
            self._save()
            return
        row["end_cost_s"] = f"{time.time() - scored:.3f}"
        # This attempt's epochs (training + validation) and the part of it its training-state saves took.
        row["fit_s"] = f"{float(last.get('fit_s') or 0.0):.3f}"
        row["checkpoint_s"] = f"{float(last.get('checkpoint_s') or 0.0):.3f}"
        self._save()

    def on_trial_error(self, iteration, trials, trial, **info):
        row = next((r for r in reversed(self.rows) if r["trial_id"] == trial.trial_id), None)
        if row is not None:
            row["ended_at"] = f"{time.time():.3f}"
            self._save()

    def on_experiment_end(self, trials, **info):
        self._save(force=True)

    def _save(self, force: bool = False) -> None:
        if force or time.monotonic() - self._written >= self.flush_s:
            atomic_write(self.path, _csv_text(self.rows))
            self._written = time.monotonic()


def timing(result: dict[str, Any]) -> dict[str, Any]:
    """The timing fields a trial reported (``result["timing"]``, JSON), {} when it reported none."""
    text = result.get(TIMING)
    return json.loads(text) if isinstance(text, str) and text else {}


def _csv_text(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=TIMING_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
