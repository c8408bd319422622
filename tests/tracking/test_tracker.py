"""A trial's child run against a real sqlite store: what ends up in it, and how a retry or resume finds it again.

The outage cases (a store that goes down, lost answers, rejected batches) live in ``tests/faults``; here the store
answers, and these tests pin what ends up in it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lasegseg.config import Config, config_hash
from lasegseg.metric_table import epoch_metrics
from lasegseg.tracking.store import start_parent
from lasegseg.tracking.tracker import TrialTracker


def _flat(**extra) -> dict:
    return {**Config().replace(**{"model.backbone": "tiny", "optim.lr": 3e-4}).to_flat(), **extra}


def _tracker(sweep, trial_id: str = "t0", *, flat: dict | None = None, buffer: Path | None = None, parent=None):
    return TrialTracker(
        sweep.uri, sweep.exp, parent or sweep.parent, trial_id, f"run-{trial_id}", flat or _flat(),
        buffer_path=buffer, retry_seconds=20,
    )  # fmt: skip


def _epoch(e: int, scale: float = 1.0) -> dict[str, float]:
    return {"train_loss": scale / (e + 1), "val_dice": 0.1 * e, "val_iou": 0.05 * e, "lr": 1e-3, "epoch_seconds": 2.0}


def _history(sweep, run_id: str, key: str) -> dict[int, float]:
    """step → value; fails on a step stored twice."""
    rows = sweep.client.get_metric_history(run_id, key)
    steps = [m.step for m in rows]
    assert len(steps) == len(set(steps)), f"{key}: a step was logged twice: {sorted(steps)}"
    return {m.step: m.value for m in rows}


# ------------------------------------------------------------------------------------------------ trial runs


def test_a_trial_logs_one_child_run_with_params_epochs_and_final_metrics_once(sweep, tmp_path):
    flat = _flat(**{"note": "x" * 7000})  # longer than MLflow's 6000-character parameter limit
    buffer = tmp_path / "pending.jsonl"
    tracker = _tracker(sweep, flat=flat, buffer=buffer)
    run_id = tracker.start()
    for e in range(3):
        metrics = _epoch(e)
        if e == 1:
            metrics["val_iou"] = float("nan")  # a non-finite value is skipped, not stored
        tracker.log_epoch(e, metrics)
    tracker.log_epoch(1, _epoch(1, scale=9.0))  # the same epoch again: ignored
    artifacts = tmp_path / "out"
    artifacts.mkdir()
    (artifacts / "metrics.json").write_text("{}")
    results = {"val_dice": 0.8, "val_iou": 0.7, "test_dice_mean": 0.75, "best_epoch": 2, "test_hd95_mean": float("nan")}
    tracker.finish(results, artifact_dir=artifacts)

    run = sweep.client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-t0"
    tags = run.data.tags
    assert tags["mlflow.parentRunId"] == sweep.parent and tags["lasegseg.trial_id"] == "t0"
    assert tags["lasegseg.role"] == "trial" and tags["lasegseg.cell"] == config_hash(flat, exclude=("seed",))
    params = run.data.params
    assert set(params) == set(flat) and params["optim.lr"] == "0.0003" and params["model.backbone"] == "tiny"
    assert len(params["note"]) == 6000 and params["note"].endswith("...")
    assert _history(sweep, run_id, "train_loss") == {0: 1.0, 1: 0.5, 2: pytest.approx(1 / 3)}
    for key in ("val_dice", "lr"):
        assert sorted(_history(sweep, run_id, key)) == [0, 1, 2]
    assert sorted(_history(sweep, run_id, "val_iou")) == [0, 2]
    final = {k: v for k, v in run.data.metrics.items() if k not in epoch_metrics()}
    assert final == {"best_val_dice": 0.8, "best_val_iou": 0.7, "test_dice_mean": 0.75, "best_epoch": 2.0}
    assert tracker.stats["metrics"] == 11 + 4  # every metric sent exactly once
    assert [a.path for a in sweep.client.list_artifacts(run_id)] == ["metrics.json"]
    assert not buffer.exists()  # nothing left waiting
    (other,) = [r for r in sweep.client.search_runs([sweep.exp]) if r.info.run_id != run_id]
    assert other.info.run_id == sweep.parent and other.data.params == {"sweep.name": "demo"}


def test_a_retried_trial_continues_its_own_run_without_relogging_epochs(sweep, tmp_path):
    first = _tracker(sweep, buffer=tmp_path / "a.jsonl")
    run_id = first.start()
    first.log_history([{"epoch": e, **_epoch(e)} for e in range(2)])
    first.flush(seconds=20)
    first.fail("RuntimeError: worker died")
    run = sweep.client.get_run(run_id)
    assert run.info.status == "FAILED" and run.data.tags["lasegseg.error"] == "RuntimeError: worker died"

    second = _tracker(sweep, buffer=tmp_path / "b.jsonl")  # a new attempt: same trial id, no run id to go on
    assert second.start() == run_id
    assert sweep.client.get_run(run_id).info.status == "RUNNING"
    assert second.logged_steps == {0, 1} and second.finished_results() is None
    second.log_history([{"epoch": e, **_epoch(e, scale=5.0)} for e in range(4)])  # its checkpoint knows 0..3
    second.finish({"val_dice": 0.3, "test_dice_mean": 0.25})
    assert _history(sweep, run_id, "train_loss") == {0: 1.0, 1: 0.5, 2: 5.0 / 3, 3: 1.25}  # 0, 1 from attempt 1
    assert second.stats["metrics"] == 2 * 4 + 2

    third = _tracker(sweep)  # a resumed sweep meets the finished run: it is not reopened
    assert third.start() == run_id
    finished = third.finished_results()
    assert finished == sweep.client.get_run(run_id).data.metrics and finished["test_dice_mean"] == 0.25
    assert sweep.client.get_run(run_id).info.status == "FINISHED"
    third.close()
    trials = sweep.client.search_runs([sweep.exp], filter_string="tags.`lasegseg.role` = 'trial'")
    assert [r.info.run_id for r in trials] == [run_id]


def test_other_trials_and_other_sweeps_get_runs_of_their_own(sweep):
    a = _tracker(sweep, "t0").start()
    b = _tracker(sweep, "t1", flat=_flat(seed=1)).start()
    other_parent = start_parent(sweep.uri, sweep.exp, "sweep-2", {}, {})
    c = _tracker(sweep, "t0", parent=other_parent).start()
    assert len({a, b, c}) == 3
    assert sweep.client.get_run(c).data.tags["mlflow.parentRunId"] == other_parent
    assert _tracker(sweep, "t1", flat=_flat(seed=1)).start() == b


def test_a_trial_restarted_under_a_new_trial_id_continues_its_run(sweep, tmp_path):
    """Tune restarts a trial whose checkpoint it lost with a fresh trial id: its config finds its run."""
    first = _tracker(sweep, "old_00000")
    run_id = first.start()
    first.log_history([{"epoch": e, **_epoch(e)} for e in range(2)])
    first.close()
    restarted = _tracker(sweep, "new_00000")
    assert restarted.start() == run_id and restarted.logged_steps == {0, 1}  # epochs 0, 1 are not logged again
    assert sweep.client.get_run(run_id).data.tags["lasegseg.trial_id"] == "new_00000"
    assert _tracker(sweep, "new_00000").start() == run_id  # later attempts find it by the new id
    restarted.close()
    assert _tracker(sweep, "new_00001", flat=_flat(seed=1)).start() != run_id  # another config: another trial
    screen = TrialTracker(sweep.uri, sweep.exp, sweep.parent, "new_00002", "screen", _flat(), stage="screen",
                          retry_seconds=20)  # fmt: skip
    assert screen.start() != run_id  # another stage's trial with the same config is another run
    screen.close()
    trials = sweep.client.search_runs([sweep.exp], filter_string="tags.`lasegseg.role` = 'trial'")
    assert len(trials) == 2


def test_a_new_trials_run_takes_four_requests_with_its_attempt_tags_and_params(sweep):
    """Its bookkeeping before the first epoch: search by trial id and by config, create with every tag, log params."""
    tracker = _tracker(sweep, "fresh")
    calls: list[str] = []
    real = tracker.client

    class Counting:
        def __getattr__(self, name):
            calls.append(name)
            return getattr(real, name)

    tracker.client = Counting()
    run_id = tracker.start(attempt_tags={"lasegseg.node_ip": "127.0.0.1", "lasegseg.device": "cpu"})
    assert tracker.finished_results() is None  # created just now: nothing to ask
    assert calls == ["search_runs", "search_runs", "create_run", "log_batch"]
    run = sweep.client.get_run(run_id)
    assert run.data.tags["lasegseg.node_ip"] == "127.0.0.1" and run.data.tags["lasegseg.trial_id"] == "fresh"
    assert run.data.params["model.backbone"] == "tiny" and len(run.data.params) == len(_flat())
    calls.clear()
    again = _tracker(sweep, "fresh")  # a retry on another node: same run, its own attempt tags
    again.client = Counting()
    assert again.start(attempt_tags={"lasegseg.node_ip": "10.0.0.7"}) == run_id
    assert again.finished_results() is None and "get_run" in calls and calls.count("get_run") == 1
    assert sweep.client.get_run(run_id).data.tags["lasegseg.node_ip"] == "10.0.0.7"
    tracker.close()
    again.close()


def test_a_known_run_id_is_used_without_searching(sweep):
    run_id = _tracker(sweep, "t0").start()
    tracker = _tracker(sweep, "renamed-by-tune")
    assert tracker.start(known_run_id=run_id) == run_id
    assert len(sweep.client.search_runs([sweep.exp], filter_string="tags.`lasegseg.role` = 'trial'")) == 1
