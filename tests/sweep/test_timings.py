"""The driver's trial_timings.csv (the benchmark reads exactly these columns) and the worker warm-up hook."""

from __future__ import annotations

import csv
import time
from types import SimpleNamespace

import pytest

from lasegseg.config import Config
from lasegseg.sweep import tune_runner


def _trial(trial_id: str, **flat):
    return SimpleNamespace(trial_id=trial_id, config={"trial": Config().replace(**flat).to_flat()})


def test_timings_file_has_one_row_per_attempt_with_fixed_cost(tmp_path):
    cb = tune_runner._timings_callback(tmp_path)
    a = _trial("t_00000", **{"model.mode": "frozen", "data.patients": 2})
    cb.on_trial_start(iteration=0, trials=[a], trial=a)
    scheduled = cb.scheduled["t_00000"]
    cb.on_trial_result(0, [a], a, {"trial_started_at": scheduled + 0.5, "first_step_at": scheduled + 1.25})
    cb.on_trial_result(0, [a], a, {"train_loss": 0.3})  # later reports carry no timings
    cb.on_trial_restore(iteration=1, trials=[a], trial=a)  # a retry is a new attempt with its own fixed cost
    cb.on_trial_result(1, [a], a, {"trial_started_at": time.time(), "first_step_at": time.time() + 2.0})
    with open(tmp_path / tune_runner.TIMINGS_FILE, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames) == (
        "trial_id", "run_name", "scheduled_at", "started_at", "first_step_at", "fixed_cost_s",
    )  # fmt: skip
    assert [r["trial_id"] for r in rows] == ["t_00000", "t_00000"]
    assert rows[0]["run_name"] == "multiscale·frozen·p2·lr0.0003·s0"
    assert float(rows[0]["fixed_cost_s"]) == pytest.approx(1.25, abs=2e-3)
    assert float(rows[0]["first_step_at"]) - float(rows[0]["scheduled_at"]) == pytest.approx(1.25, abs=2e-3)
    assert float(rows[1]["fixed_cost_s"]) > 1.9
    # A resumed sweep appends to the file instead of replacing it.
    again = tune_runner._timings_callback(tmp_path)
    b = _trial("t_00001")
    again.on_trial_start(iteration=0, trials=[b], trial=b)
    again.on_trial_result(0, [b], b, {"trial_started_at": time.time(), "first_step_at": time.time()})
    with open(tmp_path / tune_runner.TIMINGS_FILE, newline="") as fh:
        assert [r["trial_id"] for r in csv.DictReader(fh)] == ["t_00000", "t_00000", "t_00001"]


def test_prewarm_loads_the_backbone_template(monkeypatch):
    from lasegseg.models import segmenter

    monkeypatch.setattr(segmenter, "_BACKBONE_TEMPLATE", {})
    monkeypatch.setenv(tune_runner.PREWARM_ENV, "tiny|False")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tune_runner.prewarm_worker()
    assert [key[:2] for key in segmenter._BACKBONE_TEMPLATE] == [("tiny", False)]
    monkeypatch.setenv(tune_runner.PREWARM_ENV, "no-such-backbone|False")
    tune_runner.prewarm_worker()  # a bad name only skips the warm-up
