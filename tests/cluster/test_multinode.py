"""A sweep across a CPU head and two worker nodes with logical GPUs, storing to S3, tracking to an MLflow server.

Everything is real and on loopback: three Ray nodes started by ``cluster/local.sh`` (each worker with its own cache
folder standing in for a node's disk), SeaweedFS's S3 server started by ``cluster/s3.sh``, an MLflow server. Then a
node is killed mid-trial and the S3 server goes away for 20 s mid-sweep.
"""

from __future__ import annotations

import csv
import io
import json
import secrets
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.cluster.conftest import ROOT, LocalCluster, trial_runs
from tests.helpers import dinov2_demo, ray_listeners_off_loopback

pytestmark = pytest.mark.cluster
FEWSHOT = ROOT / "sweeps" / "fewshot.py"
# The demo sweep cut to 4 trials: linear × {frozen, finetune} × {2, 4} patients, seed 0, tiny slices.
DEMO = ["--config", "sweeps/configs/demo.yaml", "--set", "train.epochs=2", *dinov2_demo(28),
        "--set", "model.decoder=linear", "--set", "seed=0"]  # fmt: skip
ABS_DEMO = [str(ROOT / a) if a.endswith(".yaml") else a for a in DEMO]  # for drivers started elsewhere
PASSWORD = "pw-" + secrets.token_urlsafe(16)


@pytest.fixture(scope="module")
def three(servers, tmp_path_factory):
    """A head (no trials, no GPUs) and two worker nodes with one logical GPU and two CPUs each."""
    s3, mlflow = servers
    env = {**s3.env, "MLFLOW_TRACKING_URI": mlflow.url, "MLFLOW_TRACKING_USERNAME": "sweeper",
           "MLFLOW_TRACKING_PASSWORD": PASSWORD}  # fmt: skip
    cluster = LocalCluster(tmp_path_factory.mktemp("three"), env)
    sweep = [*DEMO, "--experiment", "multinode", "--storage-path", f"s3://{s3.bucket}/runs", "--gpus-per-trial", "1",
             "--frozen-gpus-per-trial", "0.5", "--max-concurrent", "4"]  # fmt: skip
    try:
        cluster.submit_line = cluster.start("--workers", "2", "--gpus-per-worker", "1", "--cpus-per-worker", "2", "--",
                                            *sweep)  # fmt: skip
        yield cluster
    finally:
        cluster.stop()
    cluster.assert_stopped()


def _timings(s3, name: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(s3.read(f"runs/{name}/trial_timings.csv").decode())))


def _features(cache: Path) -> list[Path]:
    return sorted(p.parent for p in cache.glob("features/*/manifest.json"))


def test_a_submitted_sweep_runs_on_the_gpu_nodes_and_stores_to_s3(three, servers):
    s3, mlflow = servers
    nodes = three.nodes()
    head = next(i for i, n in nodes.items() if n["index"] == 0)
    workers = {i for i, n in nodes.items() if n["index"]}
    assert nodes[head]["gpus"] == 0 and nodes[head]["cpus"] == 0 and len(workers) == 2
    assert {n["ip"] for n in nodes.values()} == {"127.0.0.1"}
    submitted = time.time()
    job = three.shell(three.submit_line)
    output = job.stdout + job.stderr
    assert job.returncode == 0 and "succeeded" in output.lower(), output[-4000:]
    assert ray_listeners_off_loopback() == []  # GCS, raylets, agents and the job's workers

    _, _, parents, trials = trial_runs(mlflow.url, "multinode")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == 4 and all(r.info.status == "FINISHED" for r in trials)
    assert len({r.data.tags["lasegseg.trial_id"] for r in trials}) == 4  # each trial exactly one run
    ran_on = {r.data.tags["lasegseg.node_id"] for r in trials}
    assert ran_on == workers and head not in ran_on  # both worker nodes, never the head
    assert {r.data.tags["lasegseg.device"] for r in trials} == {"cpu"}  # logical GPUs, no CUDA here
    assert all(r.data.tags["lasegseg.node_ip"] == nodes[r.data.tags["lasegseg.node_id"]]["ip"] for r in trials)

    # Features: built by one task per worker node, in that node's own cache folder; none on the head.
    assert output.count("caches on node") == 2 and output.count("features built: tiny") == 2
    assert [len(_features(three.node_cache(i))) for i in (1, 2)] == [1, 1]
    assert _features(three.head_cache) == []
    timings = _timings(s3, "multinode")
    assert {row["node_id"] for row in timings} <= workers
    assert all(row["features_built"] == "false" for row in timings)  # no trial had to build them again
    first_trial = min(float(row["scheduled_at"]) for row in timings)
    print(f"\nsubmission to first trial: {first_trial - submitted:.1f} s; job wall {time.time() - submitted:.1f} s")

    keys = s3.keys("runs/multinode/")
    assert {"runs/multinode/summary.md", "runs/multinode/sweep_state.json"} <= set(keys)
    assert any(k.startswith("runs/multinode/tune/study/") for k in keys)  # the study is one Tune run
    assert json.loads(s3.read("runs/multinode/sweep_state.json"))["status"] == "finished"
    _assert_no_secrets(output, s3, mlflow)


def _assert_no_secrets(output: str, s3, mlflow) -> None:
    """Object-store and tracking credentials appear nowhere a user or a reader of the results could see them."""
    secrets_ = [s3.secret_key, s3.access_key, PASSWORD]
    places = {"driver output": output.encode()}
    places |= {f"s3://{s3.bucket}/{k}": s3.read(k) for k in s3.keys() if not k.endswith("/")}
    places |= {str(p): p.read_bytes() for p in mlflow.root.rglob("*") if p.is_file() and p.name != "server.log"}
    for where, data in places.items():
        for secret in secrets_:
            assert secret.encode() not in data, f"a credential leaked into {where}"


def test_more_gpus_per_trial_than_any_node_has_is_refused_within_seconds(three, servers, tmp_path):
    _, mlflow = servers
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(FEWSHOT), *ABS_DEMO, "--gpus-per-trial", "2", "--experiment", "toolarge",
         "--storage-path", str(tmp_path / "runs")],
        env=three.driver_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fewshot.py: error:")]
    assert len(errors) == 1 and "2 GPU but no node has that much" in errors[0]
    assert elapsed < 60, elapsed
    assert not list((tmp_path / "runs").glob("*/tune"))  # refused before any trial


def _sweep(three, tmp_path, s3, name: str, *args: str) -> subprocess.Popen:
    """A sweep driver on this machine, joined to the cluster, storing to the bucket."""
    cmd = [sys.executable, str(FEWSHOT), "--config", str(ROOT / "sweeps/configs/demo.yaml"), *dinov2_demo(56),
           "--set", "model.decoder=linear", "--set", "model.mode=finetune", "--set", "seed=0", "--experiment", name,
           "--storage-path", f"s3://{s3.bucket}/runs", "--gpus-per-trial", "1", *args]  # fmt: skip
    env = three.driver_env(LASEGSEG_STORAGE_RETRY_SECONDS="180")
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)


def _collect(proc: subprocess.Popen) -> list[str]:
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return lines


def _wait_for_epochs(mlflow, name: str, n: int, proc, timeout: float = 300) -> list:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, "the sweep ended before the fault was injected"
        try:
            client, _, _, trials = trial_runs(mlflow.url, name)
            running = [r for r in trials if len(client.get_metric_history(r.info.run_id, "train_loss")) >= n]
            if running:
                return running
        except Exception:  # noqa: BLE001 - the experiment may not exist yet
            pass
        time.sleep(0.3)
    raise AssertionError(f"no trial of {name} reached {n} epochs")


def _assert_each_epoch_once(mlflow, name: str, epochs: int, n_trials: int) -> list:
    client, _, parents, trials = trial_runs(mlflow.url, name)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(trials) == n_trials and all(r.info.status == "FINISHED" for r in trials)
    for run in trials:
        for key in ("train_loss", "val_dice"):
            steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
            assert steps == list(range(epochs)), (key, steps)
    return trials


def test_an_s3_outage_of_20_s_mid_sweep_costs_waiting_only(three, servers, tmp_path):
    s3, mlflow = servers
    epochs = 8
    proc = _sweep(three, tmp_path, s3, "s3outage", "--set", f"train.epochs={epochs}", "--set", "data.image_size=56")
    lines = _collect(proc)
    _wait_for_epochs(mlflow, "s3outage", 1, proc)
    s3.proxy.outage()
    time.sleep(20)
    s3.proxy.restore()
    assert proc.wait(timeout=600) == 0, "".join(lines)[-4000:]
    _assert_each_epoch_once(mlflow, "s3outage", epochs, 2)
    assert "runs/s3outage/summary.md" in s3.keys("runs/s3outage/")
    assert not (tmp_path / "s3:").exists()  # an s3:// root never becomes a local folder


def test_a_killed_driver_resumes_from_the_bucket_alone(three, servers, tmp_path):
    """The driver dies mid-sweep and its machine's copy of the sweep is gone: --resume reads the bucket."""
    import os
    import shutil
    import signal

    s3, mlflow = servers
    args = ["--set", "train.epochs=3", *dinov2_demo(28), "--set", "model.mode=frozen", "--set",
            "seed=0", "--config", str(ROOT / "sweeps/configs/demo.yaml"), "--max-concurrent", "1"]  # fmt: skip
    cmd = [sys.executable, str(FEWSHOT), *args, "--set", "model.decoder=linear", "--experiment", "resumed",
           "--storage-path", f"s3://{s3.bucket}/runs", "--gpus-per-trial", "1"]  # fmt: skip
    env = three.driver_env()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path,
                            start_new_session=True)  # fmt: skip
    lines = _collect(proc)
    _wait_for_epochs(mlflow, "resumed", 3, proc)  # the first trial has trained; the sweep goes on
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    shutil.rmtree(three.head_cache / "sweeps" / "resumed")  # nothing local: state, timings, Tune's state are in S3
    resumed = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert resumed.returncode == 0, "".join(lines)[-2000:] + resumed.stdout[-3000:] + resumed.stderr[-2000:]
    _assert_each_epoch_once(mlflow, "resumed", 3, 2)
    assert "runs/resumed/summary.md" in s3.keys("runs/resumed/")


def test_a_node_killed_mid_trial_costs_the_epoch_in_flight(three, servers, tmp_path):
    s3, mlflow = servers
    epochs = 14
    proc = _sweep(three, tmp_path, s3, "nodeloss", "--set", f"train.epochs={epochs}", "--set", "data.image_size=56",
                  "--set", "data.patients=2", "--max-failures", "2")  # fmt: skip
    lines = _collect(proc)
    (run,) = _wait_for_epochs(mlflow, "nodeloss", 2, proc)
    nodes = three.nodes()
    victim = nodes[run.data.tags["lasegseg.node_id"]]["index"]
    assert victim in (1, 2)
    assert three.kill_node(victim) > 0
    assert proc.wait(timeout=600) == 0, "".join(lines)[-4000:]
    (done,) = _assert_each_epoch_once(mlflow, "nodeloss", epochs, 1)
    assert done.info.run_id == run.info.run_id  # the same MLflow run
    survivor = {i for i, n in nodes.items() if n["index"] not in (0, victim)}
    assert done.data.tags["lasegseg.node_id"] in survivor
    _assert_equals_an_uninterrupted_run(done)


def _assert_equals_an_uninterrupted_run(run) -> None:
    """The resumed trial ends with the metrics of the same trial trained without interruption (CPU, one thread)."""
    import torch

    from lasegseg.config import from_flat
    from lasegseg.train.trial import run_trial

    flat = {k: v for k, v in run.data.params.items() if k.count(".") == 1 or k == "seed"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        reference = run_trial(from_flat(flat), device="cpu")
    finally:
        torch.set_num_threads(threads)
    for key in ("test_dice_mean", "test_iou_mean", "best_epoch"):
        assert run.data.metrics[key] == pytest.approx(reference[key], abs=1e-6), key
    assert Path(flat["data.path"]).is_dir()
