"""mlflow_server/start.sh and stop.sh: real servers on loopback, a tiny sweep logging to them over HTTP."""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.helpers import free_port as _free_port
from tests.helpers import port_free as _port_free
from tests.helpers import postgres_test_uri, process_tree
from tests.sweep.test_sweep_e2e import _one_trial_yaml

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "mlflow_server" / "start.sh"
STOP = ROOT / "mlflow_server" / "stop.sh"
FEWSHOT = ROOT / "sweeps" / "fewshot.py"

pytestmark = pytest.mark.slow


def _env(state: Path, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(MLFLOW_STATE_DIR=str(state), MLFLOW_PORT=str(port), MLFLOW_WORKERS="1", OMP_NUM_THREADS="1")
    env.update(extra)
    return env


class Server:
    """A server started by start.sh; ``stop()`` runs stop.sh and checks that nothing is left behind."""

    def __init__(self, env: dict[str, str], *args: str):
        self.env = env
        self.port = int(env["MLFLOW_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        proc = subprocess.run([str(START), *args], env=env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"export MLFLOW_TRACKING_URI={self.url}" in proc.stdout
        self.pid = int((Path(env["MLFLOW_STATE_DIR"]) / "mlflow.pid").read_text())

    def stop(self) -> None:
        proc = subprocess.run([str(STOP)], env=self.env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        with pytest.raises(ProcessLookupError):
            os.kill(self.pid, 0)
        with pytest.raises(ProcessLookupError):
            os.killpg(self.pid, 0)  # no worker of its process group survives either
        assert _port_free(self.port)


def _request(url: str, body: dict | None = None, auth: tuple[str, str] | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(":".join(auth).encode()).decode())
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - our own loopback server
        return json.loads(resp.read() or b"{}")


def _runs_via_rest(url: str, experiment: str, auth: tuple[str, str] | None = None) -> list[dict]:
    exp = _request(f"{url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={experiment}", auth=auth)
    found = _request(
        f"{url}/api/2.0/mlflow/runs/search",
        {"experiment_ids": [exp["experiment"]["experiment_id"]], "max_results": 100},
        auth=auth,
    )
    return found.get("runs", [])


def _tiny_sweep(phantom: Path, tmp: Path, env: dict[str, str], url: str) -> None:
    cmd = [sys.executable, str(FEWSHOT), "--config", str(_one_trial_yaml(tmp, 1)), "--data", str(phantom),
           "--tracking-uri", url, "--storage-path", str(tmp / "runs")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _assert_sweep_runs(runs: list[dict]) -> None:
    roles = sorted(next(t["value"] for t in r["data"]["tags"] if t["key"] == "lasegseg.role") for r in runs)
    assert roles == ["sweep", "trial"]
    trial = next(r for r in runs if {"key": "lasegseg.role", "value": "trial"} in r["data"]["tags"])
    assert trial["info"]["status"] == "FINISHED"
    assert any(m["key"] == "test_dice_mean" for m in trial["data"]["metrics"])


def test_local_server_takes_a_sweep_over_http_and_stops_cleanly(phantom_dir, tmp_path):
    env = _env(tmp_path / "state", _free_port())
    server = Server(env, "local")
    try:
        assert server.url.startswith("http://127.0.0.1:")
        # The server alone (uvicorn and its worker): none of MLflow's job-runner consumers (~250 MB each).
        commands = [" ".join(psutil.Process(p).cmdline()) for p in process_tree(server.pid)]
        assert commands and not [c for c in commands if "huey" in c], commands
        _tiny_sweep(phantom_dir, tmp_path, env, server.url)
        _assert_sweep_runs(_runs_via_rest(server.url, "fault"))
        assert any((tmp_path / "state" / "mlartifacts").rglob("model.safetensors"))  # proxied artifact upload
    finally:
        server.stop()


def test_local_server_sends_artifacts_to_the_bucket_named_by_mlflow_artifacts_destination(phantom_dir, tmp_path):
    """Local mode (sqlite) with MLFLOW_ARTIFACTS_DESTINATION=s3://…: the artifacts go to the bucket through the
    server, whose endpoint comes from AWS_ENDPOINT_URL as in production; the sweep needs no bucket keys."""
    from tests.object_store import S3Server

    s3 = S3Server(tmp_path).start()
    env = _env(tmp_path / "state", _free_port(), MLFLOW_ARTIFACTS_DESTINATION=f"s3://{s3.bucket}/mlartifacts",
               **s3.env)  # fmt: skip
    server = Server(env, "local")
    try:
        no_keys = {k: v for k, v in env.items() if not k.startswith("AWS_")}
        _tiny_sweep(phantom_dir, tmp_path, no_keys, server.url)
        _assert_sweep_runs(_runs_via_rest(server.url, "fault"))
        assert any(k.startswith("mlartifacts/") and k.endswith("model/model.safetensors") for k in s3.keys())
        assert not (tmp_path / "state" / "mlartifacts").exists()  # nothing kept beside the sqlite store
    finally:
        try:
            server.stop()
        finally:
            s3.stop()  # even when the MLflow server's stop fails its checks


def test_basic_auth_rejects_a_wrong_password_and_logs_with_the_right_one(tmp_path):
    pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (Flask-WTF)")
    password = secrets.token_urlsafe(16)
    env = _env(tmp_path / "state", _free_port(), MLFLOW_AUTH_ADMIN_PASSWORD=password)
    server = Server(env, "local", "--auth")
    try:
        search = f"{server.url}/api/2.0/mlflow/experiments/search"
        for auth in (None, ("admin", password + "x")):
            with pytest.raises(urllib.error.HTTPError) as err:
                _request(search, {"max_results": 10}, auth=auth)
            assert err.value.code == 401
        from mlflow.tracking import MlflowClient

        os.environ.update(MLFLOW_TRACKING_USERNAME="admin", MLFLOW_TRACKING_PASSWORD=password)
        try:
            client = MlflowClient(server.url)
            exp = client.create_experiment("auth-check")
            run = client.create_run(exp)
            client.log_metric(run.info.run_id, "dice", 0.9)
        finally:
            os.environ.pop("MLFLOW_TRACKING_USERNAME")
            os.environ.pop("MLFLOW_TRACKING_PASSWORD")
        runs = _request(f"{server.url}/api/2.0/mlflow/runs/search", {"experiment_ids": [exp]}, auth=("admin", password))
        assert [r["data"]["metrics"][0]["value"] for r in runs["runs"]] == [0.9]
    finally:
        server.stop()


@pytest.mark.parametrize(
    "args,extra,needle",
    [
        (["production"], {"MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"}, "default or placeholder"),
        (["production"], {"MLFLOW_AUTH_ADMIN_PASSWORD": "CHANGE_ME"}, "default or placeholder"),
        (["production"], {}, "MLFLOW_AUTH_ADMIN_PASSWORD is not set"),
        (["production"], {"MLFLOW_AUTH_ADMIN_PASSWORD": "short"}, "at least 12 characters"),
        (["local"], {"MLFLOW_HOST": "0.0.0.0"}, "refusing to bind 0.0.0.0 without authentication"),
        (
            ["local", "--auth"],
            {"MLFLOW_HOST": "0.0.0.0", "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-enough-pass"},
            "MLFLOW_ALLOWED_HOSTS is not set",
        ),
        (["production"], {"MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db"}, "must be a PostgreSQL URI"),
        (["staging"], {}, "usage"),
    ],
)
def test_unsafe_starts_are_refused_with_a_clear_message(tmp_path, args, extra, needle):
    port = _free_port()
    base = {"MLFLOW_BACKEND_STORE_URI": "postgresql://u@127.0.0.1:1/db", "MLFLOW_ARTIFACTS_DESTINATION": "s3://b/p"}
    env = _env(tmp_path / "state", port, **{**(base if args[0] == "production" else {}), **extra})
    proc = subprocess.run([str(START), *args], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert not (tmp_path / "state" / "mlflow.pid").exists() and _port_free(port)


def _postgres_uri() -> str:
    uri = postgres_test_uri()
    pytest.importorskip("flask_wtf", reason="the basic-auth app needs mlflow[auth] (Flask-WTF)")
    return uri


def test_production_server_on_postgresql_takes_a_sweep_with_credentials(phantom_dir, tmp_path):
    """PostgreSQL for runs, an S3 API server (on loopback, reached through AWS_ENDPOINT_URL as the sweeps' storage
    is) for artifacts, basic auth."""
    from tests.object_store import S3Server

    uri = _postgres_uri()
    import sqlalchemy as sa

    engine = sa.create_engine(uri)
    with engine.begin() as conn:  # a clean schema per run: the CI database is reused between jobs
        conn.execute(sa.text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    password = secrets.token_urlsafe(16)
    s3 = S3Server(tmp_path).start()
    env = _env(
        tmp_path / "state", _free_port(), MLFLOW_BACKEND_STORE_URI=uri, MLFLOW_AUTH_ADMIN_PASSWORD=password,
        MLFLOW_ARTIFACTS_DESTINATION=f"s3://{s3.bucket}/mlflow", MLFLOW_WORKERS="2", **s3.env,
    )  # fmt: skip
    server = Server(env, "production")
    try:
        no_keys = {k: v for k, v in env.items() if not k.startswith("AWS_")}
        sweep_env = {**no_keys, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": password}
        _tiny_sweep(phantom_dir, tmp_path, sweep_env, server.url)
        _assert_sweep_runs(_runs_via_rest(server.url, "fault", auth=("admin", password)))
        with engine.connect() as conn:  # the runs live in PostgreSQL itself
            assert conn.execute(sa.text("SELECT count(*) FROM runs")).scalar() == 2
        engine.dispose()
        # …and the artifacts in the bucket, sent through the server (the sweep needed no bucket credentials)
        assert any(k.startswith("mlflow/") and k.endswith("model/model.safetensors") for k in s3.keys())
    finally:
        try:
            server.stop()
        finally:
            s3.stop()  # even when the MLflow server's stop fails its checks
