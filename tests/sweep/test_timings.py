"""The driver's trial_timings.csv (the benchmark reads exactly these columns), the worker warm-up and the local
cluster's start (warm workers for the first trials)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lasegseg.config import Config
from lasegseg.sweep import tune_runner, worker


def _trial(trial_id: str, **flat):
    return SimpleNamespace(trial_id=trial_id, config={"trial": Config().replace(**flat).to_flat()})


def test_timings_file_has_one_row_per_attempt_with_fixed_cost(tmp_path):
    cb = tune_runner._timings_callback(tmp_path)
    cb.setup(stop=None, num_samples=1, total_num_samples=1)
    tune_started = cb.tune_started_at
    a = _trial("t_00000", **{"model.mode": "frozen", "data.patients": 2})
    cb.on_trial_start(iteration=0, trials=[a], trial=a)
    scheduled = cb.scheduled["t_00000"]
    worker = {"worker_pid": 4242, "worker_started_at": scheduled - 9.0, "worker_prewarmed": True,
              "node_ip": "10.0.0.2", "node_id": "n2", "device": "cpu", "slice_cache_built": True}  # fmt: skip
    cb.on_trial_result(0, [a], a, {"trial_started_at": scheduled + 0.5, "first_step_at": scheduled + 1.25,
                                    "tracking_start_s": 0.04, "backbone_loaded": False, **worker})  # fmt: skip
    cb.on_trial_result(0, [a], a, {"train_loss": 0.3})  # later reports carry no timings
    cb.on_trial_restore(iteration=1, trials=[a], trial=a)  # a retry is a new attempt with its own fixed cost
    cb.on_trial_result(1, [a], a, {"trial_started_at": time.time(), "first_step_at": time.time() + 2.0})
    # Its test patients were scored 0.3 s before Tune recorded it complete: the end of its bookkeeping.
    a.last_result = {"scored_at": time.time() - 0.3, "fit_s": 12.5, "checkpoint_s": 0.25}
    cb.on_trial_complete(iteration=2, trials=[a], trial=a)
    with open(tmp_path / tune_runner.TIMINGS_FILE, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames) == (
        "trial_id", "run_name", "tune_started_at", "scheduled_at", "started_at", "first_step_at", "fixed_cost_s",
        "worker_pid", "worker_started_at", "worker_prewarmed", "node_ip", "node_id", "device", "slice_cache_built",
        "features_built", "backbone_loaded", "tracking_start_s", "end_cost_s", "fit_s", "checkpoint_s",
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
    # Where each attempt ran and which caches it had to build there.
    assert [rows[0][k] for k in ("node_ip", "node_id", "device", "slice_cache_built", "features_built")] == [
        "10.0.0.2", "n2", "cpu", "true", "false"]  # fmt: skip
    # A frozen trial on its node's features decoded them without loading its backbone; one that did not say did.
    assert (rows[0]["backbone_loaded"], rows[1]["backbone_loaded"]) == ("false", "true")
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
    monkeypatch.setenv(worker.PREWARM_ENV, "tiny|False")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    worker.prewarm_worker()
    assert [key[:2] for key in segmenter._BACKBONE_TEMPLATE] == [("tiny", False)]
    monkeypatch.setenv(worker.PREWARM_ENV, "no-such-backbone|False")
    worker.prewarm_worker()  # a bad name only skips the warm-up


def test_worker_info_describes_this_process(monkeypatch):
    monkeypatch.setattr(worker, "_PREWARMED", False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = worker.worker_info()
    assert before["worker_pid"] == os.getpid() and before["worker_prewarmed"] is False
    assert 0 < before["worker_started_at"] < time.time()
    worker.prewarm_worker(full=False)
    assert worker.worker_info()["worker_prewarmed"] is True


@pytest.mark.parametrize("backbone_code", ["1", "0"])
def test_preload_module_warms_a_fresh_process_without_touching_store_or_weights(tmp_path, backbone_code):
    """What a worker of the local cluster runs as it starts: imports only (no sqlite store, no backbone), and no
    transformers when every trial of the sweep decodes cached features."""
    db = tmp_path / "mlflow.db"
    code = (
        "import sys; import lasegseg.sweep.preload; from lasegseg.sweep import worker as t; "
        "from lasegseg.models import segmenter as s; "
        "print(sorted(m for m in ('torch', 'transformers', 'mlflow.tracking', 'lasegseg.train.trial') "
        "if m in sys.modules), t.worker_info()['worker_prewarmed'], len(s._BACKBONE_TEMPLATE))"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", worker.PREWARM_ENV: "tiny|False",
           worker.WARM_BACKBONE_CODE_ENV: backbone_code}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = ["lasegseg.train.trial", "mlflow.tracking", "torch"] + (["transformers"] if backbone_code == "1" else [])
    assert proc.stdout.split("\n")[0] == f"{imported} True 0"
    assert not db.exists()  # the driver creates the store; a worker racing it would run the migrations twice


class _FakeRay:
    """``ray.init`` that records the environment the cluster's processes would inherit."""

    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return False

    def init(self, **kwargs):
        self.calls.append((kwargs, dict(os.environ)))


@pytest.fixture
def fake_ray(monkeypatch):
    import ray
    from ray.tune.execution import class_cache

    fake = _FakeRay()
    monkeypatch.setattr(ray, "init", fake.init)
    monkeypatch.setattr(ray, "is_initialized", fake.is_initialized)
    monkeypatch.setattr(class_cache, "DEFAULT_ENV_VARS", {"PL_DISABLE_FORK": "1"})
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_preload_python_modules", "RAY_num_workers_soft_limit"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    # The driver keeps this one on purpose (Tune reads it in this process); set here, so the test restores it.
    monkeypatch.setenv("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    return fake


def test_local_cluster_inherits_the_sweep_env_and_preloads_workers(fake_ray):
    from ray.tune.execution import class_cache

    from lasegseg.sweep import cluster

    before = dict(os.environ)
    cluster.init_ray({"MLFLOW_TRACKING_URI": "sqlite:////s/mlflow.db", "LASEGSEG_CACHE": "/c"}, 2)
    ((kwargs, env),) = fake_ray.calls
    assert "runtime_env" not in kwargs  # a runtime_env would keep trial actors off the workers started warm
    assert kwargs["num_cpus"] == 2 and kwargs["include_dashboard"] is False
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:////s/mlflow.db" and env["LASEGSEG_CACHE"] == "/c"
    assert env["RAY_preload_python_modules"] == worker.PRELOAD_MODULE
    assert env["RAY_num_workers_soft_limit"] == "2"  # warm idle workers outlive Tune's CPU reservations
    root = str(Path(cluster.__file__).resolve().parents[2])
    assert env["PYTHONPATH"].split(os.pathsep) == [root, "/elsewhere"]
    assert dict(os.environ) == before  # this process's environment is as it was
    assert "PL_DISABLE_FORK" not in class_cache.DEFAULT_ENV_VARS  # Tune's actors get an empty runtime env


def test_workers_warm_the_backbone_only_when_a_trial_loads_one(fake_ray, tmp_path):
    """A sweep whose backbone trials all decode cached features spares its workers transformers; one trial that
    runs its backbone (fine-tuned here) makes every worker import it, and the setup hook load that backbone."""
    from types import SimpleNamespace

    from lasegseg.sweep import runner

    frozen = {"model.backbone": "tiny", "model.mode": "frozen", "model.decoder": "linear"}
    baseline = {"model.backbone": "none", "model.decoder": "unet"}
    tuned = {"model.backbone": "tiny", "model.mode": "finetune", "model.decoder": "conv", "model.registers": True}
    res = SimpleNamespace(max_concurrent=1, cpus_per_trial=1.0)
    for trials, warm, prewarm in (([baseline, frozen], "0", None), ([frozen, baseline, tuned], None, "tiny|True")):
        fake_ray.calls.clear()
        runner._start_ray(SimpleNamespace(trials=trials, spec=SimpleNamespace(resources=res)), "sqlite:////s/m.db")
        ((_, env),) = fake_ray.calls
        assert env.get(worker.WARM_BACKBONE_CODE_ENV) == warm and env.get(worker.PREWARM_ENV) == prewarm


def test_existing_cluster_gets_the_env_in_the_job_runtime_env(fake_ray, monkeypatch):
    from lasegseg.sweep import cluster

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    before = dict(os.environ)
    cluster.init_ray({"MLFLOW_TRACKING_URI": "http://mlflow:5000"}, None)
    ((kwargs, env),) = fake_ray.calls
    assert kwargs["runtime_env"] == {
        "env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"},
        "worker_process_setup_hook": "lasegseg.sweep.worker.prewarm_worker",
    }
    assert "RAY_preload_python_modules" not in env and dict(os.environ) == before


@pytest.mark.parametrize(
    "max_concurrent,cpus_per_trial,expected",
    [(1, 1.0, 1), (4, 0.5, 2), (3, 0.5, 2), (0, 1.0, None), (2, 0.0, None), (10**6, 1.0, os.cpu_count())],
)
def test_local_cluster_cpus_follow_max_concurrent(max_concurrent, cpus_per_trial, expected):
    from lasegseg.sweep import cluster

    res = SimpleNamespace(max_concurrent=max_concurrent, cpus_per_trial=cpus_per_trial)
    assert cluster.local_cpus(res) == expected
