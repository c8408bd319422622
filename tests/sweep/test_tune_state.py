"""A finished trial's entry in Tune's experiment state keeps only what a resume and the sweep's end read."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

from ray.tune.experiment import Trial

from lasegseg.sweep.tune_state import CompactFinished, compact, kept_keys, periodic_state_saves, trace_state_saves


def _trial(epochs: int = 20) -> Trial:
    trial = Trial("fn", config={"i": 3, "optim.lr": 1e-3}, stub=True)
    for it in range(1, epochs + 1):
        trial.update_last_result({
            "val_dice": 0.5 + it / 100, "training_iteration": it, "time_total_s": float(it), "loss": 1.0 / it,
            "time_this_iter_s": 1.0, "timestamp": 1_700_000_000 + it, "done": it == epochs,
            "test_dice_mean": 0.7, "mlflow_run_id": "abc", "timing": json.dumps({"fit_s": 3.0}),
        })  # fmt: skip
    return trial


def _size(trial: Trial) -> int:
    return sum(len(part) for part in trial.get_json_state())


def test_compacting_drops_per_metric_statistics_and_trims_the_last_result():
    trial = _trial()
    before = _size(trial)
    compact(trial)
    after = _size(trial)
    meta = json.loads(trial.get_json_state()[1])
    assert meta["metric_analysis"] == {} and meta["metric_n_steps"] == {}
    kept = {"val_dice": 0.7, "test_dice_mean": 0.7, "training_iteration": 20, "mlflow_run_id": "abc"}
    assert {k: v for k, v in trial.last_result.items() if k != "trial_id"} == kept  # Tune adds the trial's id
    assert set(trial.last_result) <= {*kept_keys(), "trial_id"}
    assert trial.run_metadata.checkpoint_manager is None or trial.checkpoint is None
    assert after < before / 2 and after < 5000, (before, after)


def test_the_callback_compacts_a_trial_as_it_completes():
    trial = _trial()
    CompactFinished().on_trial_complete(0, [trial], trial)
    assert "loss" not in trial.last_result and trial.run_metadata.metric_n_steps == {}


def test_a_trials_checkpoint_no_longer_forces_a_save_of_the_whole_state(monkeypatch):
    from ray.tune.execution import experiment_state

    cls = experiment_state._ExperimentCheckpointManager
    monkeypatch.setattr(cls, "on_trial_checkpoint", cls.on_trial_checkpoint)  # undone after the test
    manager = cls(storage=None, checkpoint_period="auto", sync_every_n_trial_checkpoints=1)
    manager.on_trial_checkpoint(_trial(1))
    assert manager._should_force_sync_up  # Tune's own rule: this is what made the saves quadratic
    periodic_state_saves()
    manager = cls(storage=None, checkpoint_period="auto", sync_every_n_trial_checkpoints=1)
    manager.on_trial_checkpoint(_trial(1))
    assert not manager._should_force_sync_up


def test_traced_saves_are_recorded_with_their_cost(tmp_path, monkeypatch):
    from ray.tune.execution import experiment_state

    cls = experiment_state._ExperimentCheckpointManager
    monkeypatch.setattr(cls, "sync_up_experiment_state", cls.sync_up_experiment_state)
    trace_state_saves(str(tmp_path / "saves.csv"))
    storage = SimpleNamespace(experiment_driver_staging_path=str(tmp_path), experiment_fs_path=str(tmp_path),
                              syncer=SimpleNamespace(sync_up=lambda *a: True, wait=lambda: None))  # fmt: skip
    manager = cls(storage=storage, checkpoint_period=1000, sync_every_n_trial_checkpoints=None)
    manager.sync_up_experiment_state(lambda: time.sleep(0.05))
    manager.sync_up_experiment_state(lambda: None)  # within the period: skipped, not recorded
    manager.sync_up_experiment_state(lambda: None, force=True)
    rows = [line.split(",") for line in (tmp_path / "saves.csv").read_text().splitlines()]
    assert len(rows) == 2 and float(rows[0][1]) >= 0.05 and [r[2] for r in rows] == ["0", "1"]
