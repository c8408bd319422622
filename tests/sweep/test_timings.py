"""The driver's trial_timings.csv: the benchmark reads exactly these columns."""

from __future__ import annotations

import csv
import json
import time
from types import SimpleNamespace

import pytest

from lasegseg.config import Config
from lasegseg.sweep import timings
from lasegseg.sweep.study_table import ROW, StudyTable


def _trial(trial_id: str, **flat):
    return SimpleNamespace(trial_id=trial_id, config={ROW: 0}, flat=Config().replace(**flat).to_flat())


def _cb(path, trial) -> timings.Timings:
    return timings.Timings(path, StudyTable((trial.flat,), 0, (-1,)), flush_s=0.0)


def _said(**fields) -> dict:
    """A trial's report with timings: one JSON string, as the trainable sends it."""
    return {timings.TIMING: json.dumps(fields)}


def test_timings_file_has_one_row_per_attempt_with_fixed_cost(tmp_path):
    a = _trial("t_00000", **{"model.mode": "frozen", "data.patients": 2})
    cb = _cb(tmp_path, a)
    cb.setup(stop=None, num_samples=1, total_num_samples=1)
    tune_started = cb.tune_started_at
    cb.on_trial_start(iteration=0, trials=[a], trial=a)
    scheduled = cb.scheduled["t_00000"]
    worker = {"worker_pid": 4242, "worker_started_at": scheduled - 9.0, "worker_prewarmed": True,
              "node_ip": "10.0.0.2", "node_id": "n2", "device": "cpu", "slice_cache_built": True}  # fmt: skip
    cb.on_trial_result(0, [a], a, _said(trial_started_at=scheduled + 0.5, first_step_at=scheduled + 1.25,
                                         tracking_start_s=0.04, backbone_loaded=False, **worker))  # fmt: skip
    cb.on_trial_result(0, [a], a, {"val_dice": 0.3})  # later reports carry no timings
    cb.on_trial_restore(iteration=1, trials=[a], trial=a)  # a retry is a new attempt with its own fixed cost
    cb.on_trial_result(1, [a], a, _said(trial_started_at=time.time(), first_step_at=time.time() + 2.0))
    # Its test patients were scored 0.3 s before Tune recorded it complete: the end of its bookkeeping.
    a.last_result = _said(scored_at=time.time() - 0.3, fit_s=12.5, checkpoint_s=0.25)
    cb.on_trial_complete(iteration=2, trials=[a], trial=a)
    with open(tmp_path / timings.TIMINGS_FILE, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames) == (
        "trial_id", "run_name", "tune_started_at", "scheduled_at", "started_at", "first_step_at", "fixed_cost_s",
        "worker_pid", "worker_started_at", "worker_prewarmed", "node_ip", "node_id", "device", "slice_cache_built",
        "features_built", "backbone_loaded", "tracking_start_s", "end_cost_s", "fit_s", "checkpoint_s", "ended_at",
    )  # fmt: skip
    assert [r["trial_id"] for r in rows] == ["t_00000", "t_00000"]
    assert rows[0]["run_name"] == "multiscale·frozen·p2·lr0.0003·s0"
    assert float(rows[0]["fixed_cost_s"]) == pytest.approx(1.25, abs=2e-3)
    assert float(rows[0]["tune_started_at"]) == pytest.approx(tune_started, abs=2e-3)
    assert tune_started <= scheduled
    assert float(rows[0]["first_step_at"]) - float(rows[0]["scheduled_at"]) == pytest.approx(1.25, abs=2e-3)
    assert float(rows[1]["fixed_cost_s"]) > 1.9
    assert (rows[0]["worker_pid"], rows[0]["worker_prewarmed"]) == ("4242", "true")
    assert float(rows[0]["worker_started_at"]) == pytest.approx(scheduled - 9.0, abs=2e-3)
    assert (rows[1]["worker_pid"], rows[1]["worker_prewarmed"]) == ("", "false")  # a worker that did not say
    assert rows[0]["tracking_start_s"] == "0.040" and rows[0]["end_cost_s"] == ""
    assert float(rows[1]["end_cost_s"]) == pytest.approx(0.3, abs=0.05)  # the completed attempt gets the end cost
    assert (rows[1]["fit_s"], rows[1]["checkpoint_s"]) == ("12.500", "0.250")  # and its epochs' and saves' time
    assert rows[0]["ended_at"] == "" and float(rows[1]["ended_at"]) == pytest.approx(time.time(), abs=5)
    # Where each attempt ran and which caches it had to build there.
    assert [rows[0][k] for k in ("node_ip", "node_id", "device", "slice_cache_built", "features_built")] == [
        "10.0.0.2", "n2", "cpu", "true", "false"]  # fmt: skip
    # A frozen trial on its node's features decoded them without loading its backbone; one that did not say did.
    assert (rows[0]["backbone_loaded"], rows[1]["backbone_loaded"]) == ("false", "true")
    # A resumed sweep appends to the file instead of replacing it.
    b = _trial("t_00001")
    again = _cb(tmp_path, b)
    again.on_trial_start(iteration=0, trials=[b], trial=b)
    again.on_trial_result(0, [b], b, _said(trial_started_at=time.time(), first_step_at=time.time()))
    with open(tmp_path / timings.TIMINGS_FILE, newline="") as fh:
        assert [r["trial_id"] for r in csv.DictReader(fh)] == ["t_00000", "t_00000", "t_00001"]


def test_the_file_is_written_at_most_every_flush_period_and_at_the_end(tmp_path):
    a = _trial("t_00000")
    cb = timings.Timings(tmp_path, StudyTable((a.flat,), 0, (-1,)), flush_s=3600.0)
    for i in range(3):
        t = _trial(f"t_{i:05d}")
        cb.on_trial_start(iteration=0, trials=[t], trial=t)
        cb.on_trial_result(0, [t], t, _said(trial_started_at=time.time(), first_step_at=time.time()))
    with open(tmp_path / timings.TIMINGS_FILE, newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 1  # the first write, then nothing for the period
    cb.on_experiment_end(trials=[])
    with open(tmp_path / timings.TIMINGS_FILE, newline="") as fh:
        assert [r["trial_id"] for r in csv.DictReader(fh)] == ["t_00000", "t_00001", "t_00002"]
