"""What a rehearsal measures while its stack is still up: the MLflow runs (each FINISHED once?), the server's request
log and database, the bucket (bytes, Tune's experiment state, training state left behind, the summary), the saves of
Tune's experiment state, the end-of-sweep commands against the HTTP server, and the MLflow UI in headless Chromium.

The pure parts (counting, grouping, parsing) live in :mod:`bench.scale_metrics`.
"""

from __future__ import annotations

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import scale_metrics as sm
from bench.common import ROOT
from bench.scale_stack import BUCKET, Stack
from bench.scale_ui import time_ui

ROLE, CONFIG = "lasegseg.role", "lasegseg.config"  # lasegseg/tracking/store.py's tag names
REQUEST = re.compile(r'"(GET|POST|PUT|PATCH|DELETE|HEAD) (\S+) HTTP/[\d.]+"')


def reset_postgres(uri: str) -> None:
    """An empty schema in the rehearsal's PostgreSQL database (each rehearsal starts from no runs); refused unless the
    database's name says it is for this (``ci``, ``test`` or ``scale`` in it)."""
    import sqlalchemy as sa  # deferred: heavy (sqlalchemy), PostgreSQL runs only

    if not re.search(r"/\w*(ci|test|scale)\w*$", uri):
        raise SystemExit(f"{uri}: the rehearsal wipes this database, so its name must contain 'ci', 'test' or 'scale'")
    engine = sa.create_engine(uri)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()


def runs(stack: Stack, experiment: str) -> list[dict[str, Any]]:
    """Every run of the experiment (all pages): id, name, status, start and end (ms), role and config-hash tags."""
    from mlflow.tracking import MlflowClient  # deferred: heavy (mlflow, ~2 s)

    os.environ.update({k: v for k, v in stack.client_env().items() if k.startswith("MLFLOW_TRACKING_")})
    client = MlflowClient(stack.tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return []
    out, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], max_results=1000, page_token=token)
        for run in page:
            tags = run.data.tags
            out.append({"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
                        "start": run.info.start_time, "end": run.info.end_time, "role": tags.get(ROLE, ""),
                        "config": tags.get(CONFIG, ""), "experiment_id": exp.experiment_id})  # fmt: skip
        token = page.token
        if not token:
            return out


def resume_checks(before: list[dict[str, Any]], after: list[dict[str, Any]], first) -> dict[str, Any]:
    """Trials rerun (FINISHED before the kill, trained again since) and what the kill left."""
    rerun = sm.rerun(before, after)
    return {"resume_finished_before": sum(1 for r in before if r["status"] == "FINISHED" and r["role"] != "sweep"),
            "resume_rerun": len(rerun), "resume_rerun_names": [r["name"] for r in rerun][:10],
            "resume_killed_at_s": first.wall_s}  # fmt: skip


def measure_all(stack: Stack, r, prefix: str, state_log: Path, work: Path, light: bool = False) -> None:
    """Every measurement of a finished rehearsal into ``r.values`` (see :mod:`bench.bench_scale` for the table);
    ``light``: the runs, the bucket and the report only."""
    v = r.values
    found = runs(stack, "la-dinov2-fewshot")
    v.update(sm.run_checks(found))
    parents = [x for x in found if x["role"] == "sweep"]
    parent = max(parents, key=lambda x: x["start"])["run_id"] if parents else None
    v["experiment_id"] = found[0]["experiment_id"] if found else None
    v["requests"] = sm.count_requests(stack.mlflow_log.read_text(errors="replace"))
    v.update(database(stack))
    objects = bucket_objects(stack)
    v.update(sm.bucket_summary(objects, f"{prefix}/la-dinov2-fewshot"))
    v.update(sm.state_saves(state_log.read_text() if state_log.is_file() else ""))
    if parent is not None:
        v.update(end_commands(stack, parent, work, only=("report",) if light else None))
        if not light:
            v.update(time_ui(stack, v["experiment_id"], work / "mlflow-ui.png", rows=len(found)))


def database(stack: Stack) -> dict[str, Any]:
    """The tracking database's size in bytes and its rows of runs, metrics, params and tags."""
    tables = ("runs", "metrics", "latest_metrics", "params", "tags")
    if stack.postgres:
        import sqlalchemy as sa  # deferred: heavy (sqlalchemy), PostgreSQL runs only

        engine = sa.create_engine(stack.postgres)
        with engine.connect() as conn:
            size = conn.execute(sa.text("SELECT pg_database_size(current_database())")).scalar()
            rows = {t: conn.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar() for t in tables}  # noqa: S608
        engine.dispose()
    else:
        path = stack.root / "mlflow" / "mlflow.db"
        size = sum(p.stat().st_size for p in path.parent.glob("mlflow.db*"))  # the WAL too
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            rows = {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables}  # noqa: S608
    return {"db_bytes": int(size), "db_rows": rows}


def bucket_objects(stack: Stack) -> list[tuple[str, int]]:
    """Every object of the bucket as (key, bytes)."""
    import boto3  # deferred: heavy (boto3), only once the sweep is over

    env = stack.s3_env
    s3 = boto3.client(
        "s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"],
    )  # fmt: skip
    out, token = [], None
    while True:
        page = s3.list_objects_v2(Bucket=BUCKET, **({"ContinuationToken": token} if token else {}))
        out += [(o["Key"], int(o["Size"])) for o in page.get("Contents", [])]
        token = page.get("NextContinuationToken")
        if not token:
            return out


def _timed(cmd: list[str], env: dict[str, str], timeout: float = 900) -> tuple[float | None, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return None, (proc.stdout + proc.stderr)[-1500:]
    return seconds, ""


def end_commands(stack: Stack, parent: str, work: Path, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``lasegseg aggregate``, ``compare``, ``report`` and ``export`` timed against the HTTP server (artifacts in the
    bucket), each a fresh process as a user runs it; nothing is logged back to the parent run."""
    env = stack.client_env()
    lsg = [sys.executable, "-m", "lasegseg.cli"]
    common = ["--experiment", "la-dinov2-fewshot", "--tracking-uri", stack.tracking_uri, "--parent-run", parent]
    out: dict[str, Any] = {}
    steps = {
        "aggregate": [*lsg, "aggregate", *common, "--out", str(work / "end" / "summary"), "--no-log"],
        "compare": [*lsg, "compare", *common, "--out", str(work / "end" / "summary"), "--no-log"],
        "report": [*lsg, "report", *common, "--out", str(work / "end" / "report.html"), "--no-log"],
        "export": [*lsg, "export", *common, "--out", str(work / "end" / "best")],
    }
    for name, cmd in steps.items():
        if only is not None and name not in only:
            continue
        out[f"{name}_s"], error = _timed(cmd, env)
        if error:
            out[f"{name}_error"] = error
    out["report_html"] = str(work / "end" / "report.html")
    out["export_dir"] = str(work / "end" / "best")
    return out
