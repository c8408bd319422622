"""16 trial-like processes logging per-step metrics at once to one MLflow store; every point counted.

Stores: a loopback ``mlflow server`` on sqlite, the same on PostgreSQL (``LASEGSEG_TEST_PG_URI``; CI sets it),
and the embedded default (every process writes the sqlite file itself). ``LASEGSEG_LOAD_SECONDS`` sets the
logging time of each run (default 120 s: a few minutes of load in all, the file about 9 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import postgres_test_uri

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "mlflow_load.py"
CLIENTS = 16
SECONDS = float(os.environ.get("LASEGSEG_LOAD_SECONDS", "120"))

pytestmark = pytest.mark.load


@pytest.mark.parametrize("store", ["embedded", "sqlite", "postgresql"])
def test_16_clients_log_every_point_exactly_once(store, tmp_path, record_property):
    cmd = [sys.executable, str(BENCH), "--store", store, "--clients", str(CLIENTS), "--seconds", str(SECONDS),
           "--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "report.json")]  # fmt: skip
    if store == "postgresql":
        cmd += ["--pg-uri", postgres_test_uri()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=SECONDS + 600)
    summary = next((ln for ln in proc.stdout.splitlines() if ln.startswith(f"{store}: ")), "")
    assert (tmp_path / "report.json").is_file(), proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for key in ("points_per_s", "points", "failed_attempts", "drain_s_max"):
        record_property(key, report[key])
    print(summary)
    assert report["errors"] == [], summary
    assert report["missing"] == 0 and report["doubled"] == 0, summary
    assert report["present"] == report["points"], summary
    # Every client kept logging through the whole run (at least one step per second), and the buffers drained.
    assert report["points"] >= CLIENTS * len(("train_loss", "val_dice", "val_iou", "lr")) * SECONDS, summary
    assert report["drain_s_max"] < 60, summary
    assert proc.returncode == 0, summary + proc.stderr[-2000:]
