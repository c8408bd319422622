"""Processes of a running sweep killed for real: a trial's worker mid-epoch, and the sweep driver itself.

Nothing may be lost or duplicated: a killed trial continues from its last checkpoint in the same MLflow run and
ends with the metrics an uninterrupted run has; a killed driver resumed with ``--resume`` runs only what did not
finish, and every trial keeps exactly one MLflow run with each epoch logged once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import dinov2_demo, sweep_env, sweep_runs

ROOT = Path(__file__).resolve().parents[2]
FEWSHOT = ROOT / "sweeps" / "fewshot.py"

pytestmark = [pytest.mark.faults, pytest.mark.slow]
# These tests watch Tune's per-trial result logs, which a sweep leaves off (every metric is in MLflow).
TUNE_RESULT_LOGS = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "0"}


def _result_lines(trial_dir: Path) -> list[dict]:
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return out


def _scratch() -> set[Path]:
    import tempfile

    return set(Path(tempfile.gettempdir()).glob("lasegseg-trial-*"))


def _assert_each_epoch_once(client, run, epochs: int) -> None:
    for key in ("train_loss", "val_dice", "lr"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(epochs)), (run.info.run_name, key, steps)


def test_trial_killed_mid_epoch_resumes_in_its_run_and_ends_as_if_never_killed(phantom_dir, tmp_path):
    """SIGKILL the trial's worker half-way through an epoch; with the same seed the final metrics must equal an
    uninterrupted run's: weights, optimizer moments, LR-schedule step, sampler order and RNG all come back."""
    epochs = 10
    sweep = tmp_path / "one.yaml"
    sweep.write_text(
        f"name: fault\nbase: {{data.image_size: 28, train.epochs: {epochs}, model.decoder: conv, "
        "model.mode: finetune}\nseeds: [0]\nresources: {cpus_per_trial: 1, max_concurrent: 1, max_failures: 2}\n"
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, str(FEWSHOT), "--config", str(sweep), "--data", str(phantom_dir), "--tracking-uri", uri,
           "--storage-path", str(tmp_path / "runs")]  # fmt: skip
    scratch_before = _scratch()
    # Tune's result log reaches the storage folder with its state saves: on every controller step here, so that the
    # test sees each epoch as it ends (a sweep saves every 10 s or more).
    env = {**sweep_env(), "TUNE_GLOBAL_CHECKPOINT_S": "0", **TUNE_RESULT_LOGS}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    grid = tmp_path / "runs" / "fault" / "tune" / "study"
    killed, killed_after = None, None
    deadline = time.time() + 600
    while killed is None and time.time() < deadline and proc.poll() is None:
        for trial_dir in grid.glob("trial_*"):
            lines = _result_lines(trial_dir)
            if lines and lines[-1].get("epoch", 0) >= 2 and not lines[-1].get("done"):
                # Half an epoch after the report of epoch e: the worker is inside epoch e + 1.
                time.sleep(0.5 * float(lines[-1].get("epoch_seconds", 0.2)))
                killed, killed_after = lines[-1]["pid"], lines[-1]["epoch"]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.02)
    out, _ = proc.communicate(timeout=900)
    assert killed is not None, "the trial finished before it could be killed:\n" + out[-2000:]
    assert proc.returncode == 0, out[-3000:]

    lines = _result_lines(next(grid.glob("trial_*")))
    by_killed = [ln["epoch"] for ln in lines if ln["pid"] == killed and not ln.get("done")]
    after = [ln["epoch"] for ln in lines if ln["pid"] != killed and not ln.get("done")]
    assert max(by_killed) == killed_after  # the kill cut epoch killed_after + 1 short
    # The epochs the killed attempt checkpointed (the first always; later ones once 19× a save's cost has passed).
    saved = [ln["epoch"] for ln in lines if ln["pid"] == killed and ln.get("checkpoint_dir_name")]
    assert saved and after[0] == max(saved) + 1 > 0  # the next attempt went on from its last checkpoint, not epoch 0
    # SIGKILL skips cleanup; the next attempt removed the killed process's scratch checkpoints.
    assert _scratch() <= scratch_before
    client, _, parents, trials = sweep_runs(uri, "fault")
    assert len(parents) == 1 and len(trials) == 1
    run = trials[0]
    assert run.info.status == "FINISHED"
    _assert_each_epoch_once(client, run, epochs)

    # The same trial, never interrupted, in this process (same thread count, deterministic CPU kernels).
    from lasegseg.config import from_flat
    from lasegseg.train.trial import run_trial

    flat = {k: v for k, v in run.data.params.items()}
    reference = run_trial(from_flat(flat))
    logged_loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train_loss"),
                                           key=lambda m: m.step)]  # fmt: skip
    assert logged_loss == pytest.approx([h["train_loss"] for h in reference["history"]], rel=1e-6, abs=1e-7)
    for key in ("test_dice_mean", "test_iou_mean", "test_hd95_mean", "best_epoch"):
        assert run.data.metrics[key] == pytest.approx(float(reference[key]), rel=1e-6, abs=1e-7), key
    assert run.data.metrics["best_val_dice"] == pytest.approx(reference["val_dice"], rel=1e-6, abs=1e-7)


def test_killed_driver_resumes_only_unfinished_trials(phantom_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [
        sys.executable, str(FEWSHOT), "--config", str(ROOT / "sweeps" / "configs" / "demo.yaml"), "--data",
        str(phantom_dir), "--tracking-uri", uri, "--storage-path", str(tmp_path / "runs"), "--set", "train.epochs=2",
        *dinov2_demo(28), "--set", "seed=0", "--max-concurrent", "1",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        env={**sweep_env(), **TUNE_RESULT_LOGS},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    grid = tmp_path / "runs" / "lasegseg-demo" / "tune" / "study"
    deadline = time.time() + 900
    done_before: set[str] = set()
    while time.time() < deadline and proc.poll() is None:
        done_before = {d.name for d in grid.glob("trial_*") if any(ln.get("done") for ln in _result_lines(d))}
        if len(done_before) >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
    proc.communicate(timeout=60)
    time.sleep(2)
    client, _, _, before = sweep_runs(uri, "lasegseg-demo")
    finished_before = {r.data.tags["lasegseg.trial_id"]: r.info.end_time for r in before
                       if r.info.status == "FINISHED"}  # fmt: skip
    assert len(finished_before) >= 3

    resumed = subprocess.run(
        cmd + ["--resume"], env={**sweep_env(), **TUNE_RESULT_LOGS}, capture_output=True, text=True, timeout=1500
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for name in done_before:  # finished trials were not run again…
        assert sum(bool(ln.get("done")) for ln in _result_lines(grid / name)) == 1
    client, _, parents, trials = sweep_runs(uri, "lasegseg-demo")
    assert len(parents) == 1
    assert len(trials) == 8 and len({t.data.tags["lasegseg.trial_id"] for t in trials}) == 8  # …nor duplicated
    assert all(t.info.status == "FINISHED" for t in trials)
    for t in trials:
        if t.data.tags["lasegseg.trial_id"] in finished_before:  # and their runs were not reopened
            assert t.info.end_time == finished_before[t.data.tags["lasegseg.trial_id"]]
        _assert_each_epoch_once(client, t, 2)
