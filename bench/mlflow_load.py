"""MLflow under sweep load: N trial-like processes log per-step metrics at once; then every point is counted.

    python bench/mlflow_load.py --store sqlite                 # `mlflow server` on loopback, sqlite backend
    python bench/mlflow_load.py --store postgresql --pg-uri postgresql://user@host/db   # server, PostgreSQL backend
    python bench/mlflow_load.py --store embedded               # no server: every client writes the sqlite file
    python bench/mlflow_load.py --store sqlite --clients 16 --seconds 180 --json out.json

Each client is its own process (as a Ray worker is), goes through ``TrialTracker`` exactly as a trial does
(create the run, one ``log_epoch`` of 4 metrics per step, a short sleep standing in for the training step,
``finish``), and the clients start logging together once all have their runs. Afterwards the store itself is
read: every (run, key, step) must be there exactly once. Prints points/s (all points over the time from the
common start to the last client's ``finish``), the drain time after logging stopped, the tracker's failed
attempts (each one retried later) and errors; exits 1 when a point is missing or doubled or a client failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import queue
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

KEYS = ("train_loss", "val_dice", "val_iou", "lr")
STORES = ("sqlite", "postgresql", "embedded")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve(backend_uri: str, workdir: Path, workers: int = 2, timeout: float = 120.0) -> Iterator[str]:
    """``mlflow server`` on a free loopback port for the duration of the block; yields its URL."""
    port = _free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    cmd = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
           "--artifacts-destination", str(workdir / "artifacts")]  # fmt: skip
    # The store URI may hold a password: it goes through the environment, never the command line.
    # As mlflow_server/start.sh: without MLflow 3's job runner (about ten ~250 MB consumer processes) by default.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ, "MLFLOW_BACKEND_STORE_URI": backend_uri}
    log_path = workdir / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{log_path.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()  # noqa: S310 - our loopback server
                break
            except OSError:
                time.sleep(0.3)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()


def _client(
    index: int, uri: str, experiment_id: str, parent_id: str, seconds: float, step_sleep: float, workdir: str,
    start_gate, results,
) -> None:  # fmt: skip
    """One trial-like process: create its run, wait for the common start, log a step at a time, finish."""
    out: dict[str, Any] = {"index": index, "steps": 0, "error": None}
    try:
        from lasegseg.tracking.tracker import TrialTracker

        tracker = TrialTracker(
            uri, experiment_id, parent_id, f"load-{index:02d}", f"load·{index:02d}", {"client": index},
            buffer_path=Path(workdir) / f"pending-{index:02d}.jsonl",
        )  # fmt: skip
        out["run_id"] = tracker.start()
        start_gate.wait()
        t0 = time.time()
        step = 0
        while time.time() - t0 < seconds:
            tracker.log_epoch(step, {k: 1.0 / (step + 1 + i) for i, k in enumerate(KEYS)})
            step += 1
            time.sleep(step_sleep)
        out["steps"] = step
        out["logged_at"] = time.time()
        tracker.finish({})
        out["finished_at"] = time.time()
        out.update(tracker.stats, last_failure=tracker.last_failure)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which decides
        out["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
    results.put(out)


def count(uri: str, run_steps: dict[str, int]) -> dict[str, int]:
    """Points of each run in the store vs the steps its client logged: missing, doubled, present."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    missing = doubled = present = 0
    for run_id, steps in run_steps.items():
        for key in KEYS:
            got = [m.step for m in client.get_metric_history(run_id, key)]
            present += len(got)
            doubled += len(got) - len(set(got))
            missing += len(set(range(steps)) - set(got))
    return {"missing": missing, "doubled": doubled, "present": present}


def run_load(
    store: str, workdir: Path, *, clients: int = 16, seconds: float = 60.0, step_sleep: float = 0.05,
    pg_uri: str | None = None, workers: int = 2,
) -> dict[str, Any]:  # fmt: skip
    """One load run; returns the report (also what ``--json`` writes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if store == "postgresql":
        if not pg_uri:
            raise SystemExit("mlflow_load.py: --store postgresql needs --pg-uri (or LASEGSEG_TEST_PG_URI)")
        backend = pg_uri
    else:
        backend = f"sqlite:///{workdir / 'mlflow.db'}"
    with contextlib.ExitStack() as stack:
        uri = backend if store == "embedded" else stack.enter_context(serve(backend, workdir, workers))
        report = _drive(uri, backend, workdir, clients, seconds, step_sleep)
    return {"store": store, "clients": clients, "seconds": seconds, "step_sleep": step_sleep,
            "server_workers": 0 if store == "embedded" else workers, **report}  # fmt: skip


def _drive(uri: str, backend: str, workdir: Path, clients: int, seconds: float, step_sleep: float) -> dict:
    from lasegseg.tracking.store import ensure_experiment, start_parent

    t_setup = time.time()
    # As the sweep driver does: the experiment and the parent run exist before any trial starts.
    experiment_id = ensure_experiment(uri, f"load-{int(time.time() * 1000)}")
    parent_id = start_parent(uri, experiment_id, "load", {"clients": clients}, {})
    # Processes forked from a server that imported mlflow once: trials are separate processes, and 16 cold
    # imports at once would only measure the 2 cores' import time.
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["mlflow", "mlflow.tracking", "lasegseg.tracking.tracker"])
    gate, results = ctx.Barrier(clients + 1), ctx.Queue()
    procs = [
        ctx.Process(
            target=_client, args=(i, uri, experiment_id, parent_id, seconds, step_sleep, str(workdir), gate, results)
        )  # fmt: skip
        for i in range(clients)
    ]
    for p in procs:
        p.start()
    gate.wait(timeout=600)
    t0 = time.time()
    rows: list[dict] = []
    deadline = t0 + seconds + 900
    while len(rows) < clients and time.time() < deadline:
        with contextlib.suppress(queue.Empty):
            rows.append(results.get(timeout=5))
    for p in procs:
        p.join(timeout=30)
    errors = [r["error"] for r in rows if r["error"]] + ["no answer"] * (clients - len(rows))
    done = [r for r in rows if not r["error"]]
    end = max((r["finished_at"] for r in done), default=time.time())
    t_count = time.time()
    counted = count(backend, {r["run_id"]: r["steps"] for r in done})
    points = sum(r["steps"] for r in done) * len(KEYS)
    return {
        "points": points,
        "points_per_s": round(points / (end - t0), 1),
        "elapsed_s": round(end - t0, 1),
        "drain_s_max": round(max((r["finished_at"] - r["logged_at"] for r in done), default=0.0), 2),
        "batches": sum(r.get("batches", 0) for r in done),
        "failed_attempts": sum(r.get("failed_attempts", 0) for r in done),
        "errors": errors,
        "failures_seen": sorted({r["last_failure"] for r in done if r.get("last_failure")}),
        "setup_s": round(t0 - t_setup, 1),
        "count_s": round(time.time() - t_count, 1),
        **counted,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mlflow_load.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--store", choices=STORES, required=True)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=60.0, help="logging time of each client")
    p.add_argument("--step-sleep", type=float, default=0.05, help="seconds between two logged steps of a client")
    p.add_argument("--workers", type=int, default=2, help="mlflow server worker processes")
    p.add_argument("--pg-uri", default=os.environ.get("LASEGSEG_TEST_PG_URI"), help="PostgreSQL backend store")
    p.add_argument("--workdir", default=None, help="databases, buffers and the server log (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mlflow-load-"))
    report = run_load(
        args.store, workdir, clients=args.clients, seconds=args.seconds, step_sleep=args.step_sleep,
        pg_uri=args.pg_uri, workers=args.workers,
    )  # fmt: skip
    print(
        f"{report['store']}: {report['clients']} clients × {report['seconds']:.0f} s: {report['points']} points in "
        f"{report['elapsed_s']} s = {report['points_per_s']} points/s; drain ≤ {report['drain_s_max']} s; "
        f"{report['batches']} batches, {report['failed_attempts']} failed attempts (retried"
        f"{': ' + ' | '.join(report['failures_seen']) if report['failures_seen'] else ''}); "
        f"missing {report['missing']}, doubled {report['doubled']}; errors: {report['errors'] or 'none'}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    ok = not report["errors"] and not report["missing"] and not report["doubled"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
