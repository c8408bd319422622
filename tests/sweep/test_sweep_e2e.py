"""Whole sweeps on a local Ray with a sqlite MLflow store: the bar of the sweep issue, faults and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
FEWSHOT = ROOT / "sweeps" / "fewshot.py"

pytestmark = pytest.mark.slow


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _sweep_cmd(data: Path, storage: Path, uri: str, *extra: str) -> list[str]:
    return [
        sys.executable, str(FEWSHOT), "--config", str(ROOT / "sweeps" / "configs" / "demo.yaml"),
        "--data", str(data), "--tracking-uri", uri, "--storage-path", str(storage),
        "--set", "train.epochs=1", "--set", "data.image_size=28", *extra,
    ]  # fmt: skip


def _children(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("lasegseg.role") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("lasegseg.role") == "trial"]
    return client, exp, parents, trials


@pytest.fixture(scope="module")
def demo_sweep(phantom_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    proc = subprocess.run(
        _sweep_cmd(phantom_dir, tmp / "runs", uri), env=_env(tmp), capture_output=True, text=True, timeout=1500
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, uri, proc


def test_demo_sweep_logs_one_parent_and_every_trial(demo_sweep):
    tmp, uri, proc = demo_sweep
    client, exp, parents, trials = _children(uri, "lasegseg-demo")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    assert len(parents) == 1
    parent = parents[0]
    assert len(trials) == 16  # 2 decoders × 2 modes × 2 patient counts × 2 seeds
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials)
    assert all(t.info.status == "FINISHED" for t in trials)
    for t in trials:
        assert "test_dice_mean" in t.data.metrics and "best_val_dice" in t.data.metrics
        assert t.data.params["model.decoder"] in ("linear", "multiscale")
        assert t.data.params["train.epochs"] == "1"
        assert "·s" in t.info.run_name
        artifacts = {a.path for a in client.list_artifacts(t.info.run_id)}
        assert {"model", "metrics.json", "per_patient.csv", "overlays.png"} <= artifacts
        steps = [m.step for m in client.get_metric_history(t.info.run_id, "train_loss")]
        assert steps == [0]
    assert len({t.data.tags["lasegseg.trial_id"] for t in trials}) == 16


def test_demo_sweep_summary_has_one_row_per_cell(demo_sweep):
    tmp, uri, proc = demo_sweep
    sweep_dir = tmp / "runs" / "lasegseg-demo"
    summary = pd.read_parquet(sweep_dir / "summary.parquet")
    assert len(summary) == 8
    assert set(summary["n"]) == {2}
    for col in ("test_dice_mean_mean", "test_dice_mean_std", "test_iou_mean_mean", "val_dice_mean"):
        assert col in summary.columns
    assert (sweep_dir / "summary.csv").is_file() and (sweep_dir / "summary.md").is_file()
    plots = list(sweep_dir.glob("fewshot_patients_*.png"))
    assert len(plots) == 2 and all(p.stat().st_size > 5000 for p in plots)


def test_aggregate_command_rebuilds_the_summary_from_mlflow_alone(demo_sweep, tmp_path):
    from lasegseg.cli import main

    tmp, uri, proc = demo_sweep
    assert main(["aggregate", "--experiment", "lasegseg-demo", "--tracking-uri", uri, "--out", str(tmp_path)]) == 0
    ours = pd.read_parquet(tmp_path / "summary.parquet").sort_values("cell").reset_index(drop=True)
    theirs = pd.read_parquet(tmp / "runs" / "lasegseg-demo" / "summary.parquet").sort_values("cell")
    pd.testing.assert_frame_equal(ours, theirs.reset_index(drop=True))


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--set", "model.decodr=linear"], "unknown config key 'model.decodr'"),
        (["--set", "optim.lr=0"], "'optim.lr' must be > 0"),
        (["--set", "data.fraction=2"], "'data.fraction' must be in (0, 1]"),
        (["--tracking-uri", "http://127.0.0.1:9"], "unreachable"),
    ],
)
def test_bad_sweeps_are_refused_before_any_trial(phantom_dir, tmp_path, extra, needle):
    cmd = _sweep_cmd(phantom_dir, tmp_path / "runs", f"sqlite:///{tmp_path / 'db.sqlite'}") + extra
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "runs" / "lasegseg-demo" / "tune").exists()


def test_missing_data_folder_is_refused(tmp_path):
    cmd = _sweep_cmd(tmp_path / "nowhere", tmp_path / "runs", f"sqlite:///{tmp_path / 'db.sqlite'}")
    proc = subprocess.run(cmd, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr


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


def _one_trial_yaml(tmp_path: Path, epochs: int) -> Path:
    cfg = tmp_path / "one.yaml"
    cfg.write_text(
        f"name: fault\nbase: {{data.image_size: 28, train.epochs: {epochs}, model.decoder: linear, "
        "model.mode: finetune}\nseeds: [0]\nresources: {cpus_per_trial: 1, max_concurrent: 1, max_failures: 2}\n"
    )
    return cfg


def test_killed_trial_resumes_from_its_checkpoint_in_the_same_run(phantom_dir, tmp_path):
    epochs = 40
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, str(FEWSHOT), "--config", str(_one_trial_yaml(tmp_path, epochs)), "--data",
           str(phantom_dir), "--tracking-uri", uri, "--storage-path", str(tmp_path / "runs")]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    grid = tmp_path / "runs" / "fault" / "tune" / "grid"
    killed = None
    deadline = time.time() + 600
    while killed is None and time.time() < deadline and proc.poll() is None:
        for trial_dir in grid.glob("trial_*"):
            lines = _result_lines(trial_dir)
            if lines and lines[-1].get("epoch", 0) >= 3 and not lines[-1].get("done"):
                killed = lines[-1]["pid"]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.05)
    out, _ = proc.communicate(timeout=900)
    assert killed is not None, "the trial finished before it could be killed:\n" + out[-2000:]
    assert proc.returncode == 0, out[-3000:]
    lines = _result_lines(next(grid.glob("trial_*")))
    pids = [ln["pid"] for ln in lines]
    assert killed in pids and pids[-1] != killed  # a new process finished the trial
    after = [ln["epoch"] for ln in lines if ln["pid"] != killed]
    assert after[0] > 0  # it continued from a checkpoint, not from epoch 0
    _, _, parents, trials = _children(uri, "fault")
    assert len(parents) == 1 and len(trials) == 1
    from mlflow.tracking import MlflowClient

    steps = [m.step for m in MlflowClient(uri).get_metric_history(trials[0].info.run_id, "train_loss")]
    assert sorted(steps) == list(range(epochs))  # every epoch logged exactly once
    assert trials[0].info.status == "FINISHED"


def test_interrupted_driver_resumes_only_unfinished_trials(phantom_dir, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = _sweep_cmd(phantom_dir, tmp_path / "runs", uri, "--set", "seed=0", "--max-concurrent", "1")
    proc = subprocess.Popen(
        cmd, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    grid = tmp_path / "runs" / "lasegseg-demo" / "tune" / "grid"
    deadline = time.time() + 900
    done_before: set[str] = set()
    while time.time() < deadline and proc.poll() is None:
        done_before = {d.name for d in grid.glob("trial_*") if any(ln.get("done") for ln in _result_lines(d))}
        if len(done_before) >= 3:
            break
        time.sleep(0.1)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    time.sleep(2)
    resumed = subprocess.run(cmd + ["--resume"], env=_env(tmp_path), capture_output=True, text=True, timeout=1500)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for name in done_before:  # finished trials were not run again
        assert sum(bool(ln.get("done")) for ln in _result_lines(grid / name)) == 1
    _, _, parents, trials = _children(uri, "lasegseg-demo")
    assert len(parents) == 1
    assert len(trials) == 8 and len({t.data.tags["lasegseg.trial_id"] for t in trials}) == 8
    assert all(t.info.status == "FINISHED" for t in trials)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_the_sweep_on_a_started_cluster(phantom_dir, tmp_path):
    """`ray start --head` (token auth) then `ray job submit --working-dir . -- python sweeps/fewshot.py …`."""
    ray_bin = Path(sys.executable).parent / "ray"
    env = _env(tmp_path)
    env["RAY_AUTH_MODE"] = "token"
    gcs, dash = _free_port(), _free_port()
    start = subprocess.run(
        [str(ray_bin), "start", "--head", f"--port={gcs}", "--num-cpus=2", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert start.returncode == 0, start.stdout + start.stderr
    try:
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        submit = subprocess.run(
            [str(ray_bin), "job", "submit", f"--address=http://127.0.0.1:{dash}", f"--working-dir={ROOT}", "--",
             "python", "sweeps/fewshot.py", "--config", str(_one_trial_yaml(tmp_path, 2)), "--data", str(phantom_dir),
             "--tracking-uri", uri, "--storage-path", str(tmp_path / "runs")],
            env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
        )  # fmt: skip
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in (submit.stdout + submit.stderr).lower()
        _, _, parents, trials = _children(uri, "fault")
        assert len(parents) == 1 and len(trials) == 1 and trials[0].info.status == "FINISHED"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)
