"""MLflow outages: metrics buffered while the store is down arrive afterwards, each exactly once.

Unit level: a real sqlite (and PostgreSQL, when ``LASEGSEG_TEST_PG_URI`` is set) store behind a client wrapper
that fails on demand. End to end: a real ``mlflow server`` killed for ~20 s in the middle of a real sweep.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from lasegseg.errors import LasegsegError
from lasegseg.metric_table import epoch_metrics
from lasegseg.tracking.buffer import pending_path
from lasegseg.tracking.store import ensure_experiment, start_parent
from lasegseg.tracking.tracker import TrialTracker
from tests.helpers import MlflowServer, postgres_test_uri
from tests.helpers import free_port as _free_port

ROOT = Path(__file__).resolve().parents[2]
FEWSHOT = ROOT / "sweeps" / "fewshot.py"

pytestmark = pytest.mark.faults


class Flaky:
    """An MlflowClient whose calls fail like an unreachable server while ``down`` is set.

    ``lose_answers`` names calls whose next invocations reach the store but whose answer is lost (the server
    died after committing), as many times as the count says.
    """

    def __init__(self, real, down: bool = False) -> None:
        self.real = real
        self.down = down
        self.lose_answers: dict[str, int] = {}
        self.reject = False
        self.calls: dict[str, int] = {}

    def __getattr__(self, name):
        target = getattr(self.real, name)

        def call(*args, **kwargs):
            from mlflow.exceptions import MlflowException

            self.calls[name] = self.calls.get(name, 0) + 1
            if self.reject and name == "log_batch":
                raise MlflowException.invalid_parameter_value("metric rejected")
            if self.down:
                raise MlflowException("API request failed with exception Connection refused")
            out = target(*args, **kwargs)
            if self.lose_answers.get(name, 0) > 0:
                self.lose_answers[name] -= 1
                raise MlflowException("API request failed with exception Read timed out")
            return out

        return call


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    """One database for the unit tests (creating its tables takes seconds); each test has its own experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_uri(request, sqlite_uri) -> str:
    if request.param == "sqlite":
        return sqlite_uri
    return postgres_test_uri()


def _tracker(uri: str, tmp_path: Path, trial_id: str = "t0", retry_seconds: float = 20.0) -> TrialTracker:
    exp = ensure_experiment(uri, f"outage-{tmp_path.parent.name}-{tmp_path.name}")
    parent = start_parent(uri, exp, "sweep", {}, {})
    return TrialTracker(
        uri, exp, parent, trial_id, f"run-{trial_id}", {"seed": 0}, buffer_path=tmp_path / "pending.jsonl",
        retry_seconds=retry_seconds,
    )  # fmt: skip


def _epoch(e: int) -> dict[str, float]:
    return {"train_loss": 1.0 / (e + 1), "val_dice": 0.1 * e, "val_iou": 0.05 * e, "lr": 1e-3, "epoch_seconds": 1.0}


def _steps(tracker: TrialTracker, key: str = "train_loss") -> list[int]:
    return sorted(m.step for m in tracker.client.real.get_metric_history(tracker.run_id, key))


def _start(tracker: TrialTracker, known: str | None = None) -> Flaky:
    tracker.client = Flaky(tracker.client)
    tracker.start(known)
    return tracker.client


def test_epochs_logged_while_the_store_is_down_arrive_in_order_once_it_is_back(sqlite_uri, tmp_path):
    tracker = _tracker(sqlite_uri, tmp_path)
    flaky = _start(tracker)
    flaky.down = True
    t0 = time.perf_counter()
    for e in range(5):
        tracker.log_epoch(e, _epoch(e))
    assert time.perf_counter() - t0 < 1.0  # training never waits for the store
    lines = (tmp_path / "pending.jsonl").read_text().splitlines()
    assert [json.loads(ln)["metrics"][0][3] for ln in lines] == [0, 1, 2, 3, 4]
    time.sleep(1.0)
    assert flaky.calls.get("log_batch", 0) >= 1 and tracker.stats["failed_attempts"] >= 1
    assert _steps(tracker) == []
    flaky.down = False
    tracker.log_epoch(5, _epoch(5))
    tracker.flush(seconds=20)
    for key in epoch_metrics():
        assert _steps(tracker, key) == list(range(6))
    assert not (tmp_path / "pending.jsonl").exists()
    tracker.close()


def test_a_resent_batch_whose_first_attempt_arrived_is_stored_once(store_uri, tmp_path):
    tracker = _tracker(store_uri, tmp_path)
    flaky = _start(tracker)
    flaky.lose_answers["log_batch"] = 2  # the store commits, the answer is lost, the tracker sends again
    for e in range(3):
        tracker.log_epoch(e, _epoch(e))
    tracker.flush(seconds=30)
    assert flaky.calls["log_batch"] >= 3
    for key in epoch_metrics():
        history = tracker.client.real.get_metric_history(tracker.run_id, key)
        assert sorted(m.step for m in history) == [0, 1, 2]
    tracker.close()


def test_a_killed_attempt_resends_its_buffer_with_the_original_timestamps(sqlite_uri, tmp_path):
    first = _tracker(sqlite_uri, tmp_path)
    flaky = _start(first)
    first.log_epoch(0, _epoch(0))
    first.flush(seconds=10)
    flaky.down = True
    for e in (1, 2):
        first.log_epoch(e, _epoch(e))
    stamps = {m[3]: m[2] for ln in (tmp_path / "pending.jsonl").read_text().splitlines()
              for m in json.loads(ln)["metrics"]}  # fmt: skip
    first.close()  # the process dies here; its buffer file stays
    with open(tmp_path / "pending.jsonl", "a") as fh:
        fh.write('{"run_id": "' + first.run_id + '", "kind": "epoch", "metrics": [["train_lo')  # cut short by the kill

    second = TrialTracker(first.tracking_uri, first.experiment_id, first.parent_run_id, "t0", "run-t0", {"seed": 0},
                          buffer_path=tmp_path / "pending.jsonl", retry_seconds=20)  # fmt: skip
    _start(second, known=first.run_id)
    assert second.logged_steps == {0, 1, 2}
    second.log_history([{"epoch": e, **_epoch(e)} for e in range(4)])  # the checkpoint knew epochs 0..3
    second.flush(seconds=20)
    history = second.client.real.get_metric_history(first.run_id, "train_loss")
    assert sorted(m.step for m in history) == [0, 1, 2, 3]
    assert {m.step: m.timestamp for m in history if m.step in (1, 2)} == {1: stamps[1], 2: stamps[2]}
    second.close()


def test_run_creation_waits_for_the_store_and_a_lost_answer_makes_no_second_run(sqlite_uri, tmp_path):
    tracker = _tracker(sqlite_uri, tmp_path)
    flaky = Flaky(tracker.client, down=True)
    flaky.lose_answers["create_run"] = 1
    tracker.client = flaky
    threading.Timer(1.5, lambda: setattr(flaky, "down", False)).start()
    run_id = tracker.start()
    runs = flaky.real.search_runs([tracker.experiment_id], filter_string="tags.`lasegseg.trial_id` = 't0'")
    assert [r.info.run_id for r in runs] == [run_id]
    assert flaky.calls["create_run"] == 1 and flaky.calls["search_runs"] >= 2


def test_finish_waits_for_the_store_and_gives_up_after_its_bound(sqlite_uri, tmp_path):
    tracker = _tracker(sqlite_uri, tmp_path, retry_seconds=30)
    flaky = _start(tracker)
    tracker.log_epoch(0, _epoch(0))
    flaky.down = True
    threading.Timer(2.0, lambda: setattr(flaky, "down", False)).start()
    tracker.finish({"test_dice_mean": 0.5, "val_dice": 0.6, "best_epoch": 0})
    run = flaky.real.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.data.metrics["test_dice_mean"] == 0.5

    other = _tracker(sqlite_uri, tmp_path / "o", trial_id="t1", retry_seconds=1.5)
    flaky = _start(other)
    flaky.down = True
    t0 = time.perf_counter()
    with pytest.raises(LasegsegError, match="did not take the buffered metrics within 2 s"):
        other.finish({"test_dice_mean": 0.5})
    assert time.perf_counter() - t0 < 10
    other.close()


def test_a_rejected_batch_fails_the_flush_at_once(sqlite_uri, tmp_path):
    tracker = _tracker(sqlite_uri, tmp_path)
    flaky = _start(tracker)
    flaky.reject = True
    tracker.log_epoch(0, _epoch(0))
    t0 = time.perf_counter()
    with pytest.raises(LasegsegError, match="rejected metrics: metric rejected"):
        tracker.flush(seconds=30)
    assert time.perf_counter() - t0 < 5


# ------------------------------------------------------------------------------------------------ end to end


def _trial_epochs(grid: Path) -> dict[str, list[int]]:
    """Epochs each trial reported to Tune so far (result.json rows), by trial folder."""
    out = {}
    for trial_dir in grid.glob("trial_*"):
        rows = []
        path = trial_dir / "result.json"
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line being written
            if not row.get("done"):
                rows.append(row["epoch"])
        out[trial_dir.name] = rows
    return out


def _rest(url: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - loopback
        return json.loads(resp.read() or b"{}")


def _logged_steps(url: str) -> int:
    """Per-epoch train_loss values the server holds, over all runs (0 while nothing is logged yet)."""
    try:
        runs = _rest(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": ["1"], "max_results": 50})
    except OSError:
        return 0
    return sum(
        int(m["step"]) + 1
        for r in runs.get("runs", [])
        for m in r["data"].get("metrics", [])
        if m["key"] == "train_loss"
    )


def test_sweep_survives_a_20_s_mlflow_outage(phantom_dir, tmp_path):
    epochs, outage_s = 40, 20.0
    root = tmp_path / "server"
    root.mkdir()
    server = MlflowServer(root, _free_port())
    server.start()
    cfg = tmp_path / "outage.yaml"
    cfg.write_text(
        f"name: outage\nbase: {{model.backbone: tiny, data.image_size: 56, train.epochs: {epochs}, "
        "model.decoder: linear, model.mode: frozen}\nseeds: [0, 1]\n"
        "resources: {cpus_per_trial: 1, max_concurrent: 2, max_failures: 0}\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "LASEGSEG_MLFLOW_RETRY_SECONDS": "120",
           # Tune's per-trial result logs (off in a sweep), saved to the storage folder on every controller step.
           "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "0", "TUNE_GLOBAL_CHECKPOINT_S": "0"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, str(FEWSHOT), "--config", str(cfg), "--data", str(phantom_dir), "--tracking-uri",
           server.url, "--storage-path", str(tmp_path / "runs")]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    grid = tmp_path / "runs" / "outage" / "tune" / "study"
    pending = Path(os.environ["LASEGSEG_CACHE"]) / "mlflow-pending"
    try:
        deadline = time.time() + 300
        while _logged_steps(server.url) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, "the sweep ended before the outage:\n" + proc.stdout.read()[-3000:]
        server.kill()
        killed_at = time.time()
        before = _trial_epochs(grid)
        time.sleep(outage_s)
        during = _trial_epochs(grid)
        buffered = [len(p.read_text().splitlines()) for p in pending.glob("*.jsonl") if p.stat().st_mtime >= killed_at]
        server.start()  # same port, same database
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        server.kill()
    assert proc.returncode == 0, out[-4000:]
    # Training went on while the server was down.
    assert sum(map(len, during.values())) > sum(map(len, before.values())), (before, during)
    assert all(len(rows) < epochs for rows in before.values())
    assert buffered and min(buffered) >= 1  # the unsent epochs waited on disk

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")  # the server's own database, read directly
    exp = client.get_experiment_by_name("outage")
    runs = client.search_runs([exp.experiment_id], max_results=100)
    trials = [r for r in runs if r.data.tags.get("lasegseg.role") == "trial"]
    assert len(trials) == 2 and len({t.data.tags["lasegseg.trial_id"] for t in trials}) == 2
    for t in trials:
        assert t.info.status == "FINISHED" and "test_dice_mean" in t.data.metrics
        for key in epoch_metrics():
            steps = sorted(m.step for m in client.get_metric_history(t.info.run_id, key))
            assert steps == list(range(epochs)), (key, steps)  # no gap, no duplicate
    for t in trials:  # every buffered metric was sent
        assert not pending_path(exp.experiment_id, t.data.tags["lasegseg.trial_id"]).exists()
