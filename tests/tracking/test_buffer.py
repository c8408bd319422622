"""The metric buffer's file: one line per logging call, read back by the trial's next attempt."""

from __future__ import annotations

import json

from mlflow.entities import Metric

from lasegseg.tracking.buffer import MetricBuffer, pending_path


def test_the_metric_buffer_file_keeps_one_line_per_call_of_its_own_run(tmp_path):
    path = tmp_path / "deep" / "pending.jsonl"
    buf = MetricBuffer(path)
    buf.extend("r1", [Metric("train_loss", 0.5, 1000, 0), Metric("lr", 0.1, 1000, 0)])
    buf.extend("r1", [Metric("train_loss", 0.4, 2000, 1)])
    buf.extend("r1", [Metric("test_dice_mean", 0.7, 3000, 0)], kind="final")
    buf.extend("r1", [])  # nothing to log: no line
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["run_id"], r["kind"], len(r["metrics"])) for r in rows] == [("r1", "epoch", 2), ("r1", "epoch", 1),
                                                                          ("r1", "final", 1)]  # fmt: skip
    assert rows[0]["metrics"][0] == ["train_loss", 0.5, 1000, 0]

    again = MetricBuffer(path)
    assert again.load("r2") == [] and not path.exists()  # another run's leftovers are dropped
    buf2 = MetricBuffer(path)
    for r in rows:
        buf2.extend(r["run_id"], [Metric(*m) for m in r["metrics"]], kind=r["kind"])
    restored = MetricBuffer(path).load("r1")  # epochs only, by default
    assert [(m.key, m.value, m.timestamp, m.step) for m in restored] == [
        ("train_loss", 0.5, 1000, 0), ("lr", 0.1, 1000, 0), ("train_loss", 0.4, 2000, 1)]  # fmt: skip
    assert [json.loads(line)["kind"] for line in path.read_text().splitlines()] == ["epoch"]


def test_pending_metrics_wait_in_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("LASEGSEG_CACHE", str(tmp_path))
    assert pending_path("7", "abc_00001") == tmp_path / "mlflow-pending" / "7-abc_00001.jsonl"
