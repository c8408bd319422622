"""The rehearsal's setup, all on 127.0.0.1, as a cluster user has it: the S3 server (``cluster/s3.sh``), the MLflow
server (``mlflow_server/start.sh``: production on PostgreSQL when a URI is given, else local with its artifacts in
the bucket) and a 3-node Ray cluster (``cluster/local.sh``: a head that runs no trials, two workers with 8 logical
GPUs each), with ports and temp folders of its own.

:class:`Stack` starts them in that order and always stops them (also on Ctrl-C or a failed start). Every process it
starts carries ``$LASEGSEG_SCALE_STACK`` in its environment, so that it stops exactly these by their ids:
``cluster/local.sh stop`` runs ``ray stop --force``, which ends every Ray process of the machine, a developer's
own cluster included.
"""

from __future__ import annotations

import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, child_env

MARKER = "LASEGSEG_SCALE_STACK"
BUCKET = "lasegseg-scale"
WORKERS = 2
GPUS_PER_WORKER = 8
SLOTS = WORKERS * GPUS_PER_WORKER
# A trial's CPU request: 16 of them fit on the two workers' logical CPUs (the cores are shared anyway).
CPUS_PER_TRIAL = 0.25
POSTGRES_ENVS = ("LASEGSEG_SCALE_POSTGRES", "LASEGSEG_TEST_PG_URI")  # the second is what .ci/postgres exports
VENV_BIN = str(Path(sys.executable).parent)


def port_free(port: int) -> bool:
    """Nothing listens on the loopback port."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_ports(gcs: int, workers: int = WORKERS) -> list[int]:
    """Every fixed port ``cluster/local.sh`` gives a cluster on ``gcs``: GCS, dashboard, the head's agent, and six per
    worker node."""
    return [gcs, gcs + 50, gcs + 51] + [gcs + 100 * i + k for i in range(1, workers + 1) for k in range(1, 7)]


def s3_ports(base: int) -> list[int]:
    """The ports ``cluster/s3.sh`` gives a server on ``base`` (its own ``ports`` command says which)."""
    out = subprocess.run(["bash", str(ROOT / "cluster" / "s3.sh"), "ports"], env=_env(LASEGSEG_S3_PORT=str(base)),
                         capture_output=True, text=True, check=True, timeout=30)  # fmt: skip
    return [int(line.split("=")[1]) for line in out.stdout.split()]


def _free_block(ports_of, low: int, high: int, step: int = 1) -> int:
    for _ in range(200):
        base = random.randrange(low, high, step)
        if all(port_free(p) for p in ports_of(base)):
            return base
    raise RuntimeError(f"no free block of ports in [{low}, {high})")


def _env(**extra: str) -> dict[str, str]:
    """This process's environment without a developer's own cluster, tracking server or bucket, plus ``extra``."""
    env = child_env()
    for key in list(env):
        if key in ("RAY_ADDRESS", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3") or key.startswith(
            ("MLFLOW_", "AWS_ACCESS", "AWS_SECRET")
        ):
            del env[key]
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


def marked_pids(marker: str, root: Path | None = None) -> list[int]:
    """Live processes whose environment holds ``$LASEGSEG_SCALE_STACK=marker``, or names a node cache or cluster
    folder under ``root`` (Ray restarts a node's agents with an environment of their own); zombies excluded."""
    needles = {f"{MARKER}={marker}".encode()}
    prefixes = tuple(f"{key}={root}/".encode() for key in ("LASEGSEG_CACHE", "LASEGSEG_CLUSTER_DIR")) if root else ()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            if not (needles.intersection(env) or (prefixes and any(v.startswith(prefixes) for v in env))):
                continue
            if Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except OSError:
            continue
        found.append(int(entry))
    return found


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class Stack:
    """S3, MLflow and a 3-node Ray cluster on loopback, under ``root``; a context manager that always stops them.

    Args:
        root: the stack's folder (server state, node caches, logs).
        postgres: a PostgreSQL URI for the production MLflow server (its schema is wiped first, so the database's
            name must contain ``ci``, ``test`` or ``scale``); None: the local server (sqlite).
    """

    def __init__(self, root: Path, postgres: str | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.postgres = postgres
        self.marker = f"{self.root}:{secrets.token_hex(4)}"
        self.cluster_dir, self.head_cache = self.root / "cluster", self.root / "cache"
        self.s3_port = self.gcs = self.mlflow_port = 0
        self.s3_env: dict[str, str] = {}
        self.mlflow_env: dict[str, str] = {}
        self.auth: tuple[str, str] | None = None
        # Ray's head puts its Unix sockets under here (a socket path has at most 107 bytes: keep it short).
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="lsgs-", dir="/tmp"))
        self.started: list[str] = []

    # -- environment -----------------------------------------------------------------------------------------------

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def mlflow_log(self) -> Path:
        return self.root / "mlflow" / "mlflow.log"

    def base_env(self, **extra: str) -> dict[str, str]:
        """What every process of the stack gets: its marker, Ray's temp folder, one thread per op."""
        return _env(**{MARKER: self.marker, "RAY_TMPDIR": str(self.ray_tmp), "PYTHONUNBUFFERED": "1", **extra})

    def client_env(self, **extra: str) -> dict[str, str]:
        """A client's environment: the bucket's endpoint and keys, the tracking server (and its credentials)."""
        env = self.base_env(**self.s3_env, MLFLOW_TRACKING_URI=self.tracking_uri, **extra)
        if self.auth:
            env.update(MLFLOW_TRACKING_USERNAME=self.auth[0], MLFLOW_TRACKING_PASSWORD=self.auth[1])
        return env

    def driver_env(self, **extra: str) -> dict[str, str]:
        """A sweep driver on this machine joined to the cluster (as ``cluster/local.sh`` says to start one)."""
        return self.client_env(RAY_ADDRESS=f"127.0.0.1:{self.gcs}", RAY_AUTH_MODE="token",
                               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", LASEGSEG_CACHE=str(self.head_cache),
                               **extra)  # fmt: skip

    # -- start / stop ----------------------------------------------------------------------------------------------

    def __enter__(self) -> Stack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        t0 = time.perf_counter()
        self._start_s3()
        self._start_mlflow()
        self._start_ray()
        print(f"    (stack up in {time.perf_counter() - t0:.0f} s: S3 :{self.s3_port}, MLflow {self.tracking_uri} "
              f"({'PostgreSQL' if self.postgres else 'sqlite'}), Ray 127.0.0.1:{self.gcs} with {WORKERS} workers × "
              f"{GPUS_PER_WORKER} GPUs)", flush=True)  # fmt: skip

    def _run(self, args: list[str], env: dict[str, str], what: str, timeout: float = 300) -> str:
        proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        if proc.returncode != 0:
            raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
        return proc.stdout

    def _start_s3(self, tries: int = 2) -> None:
        """``cluster/s3.sh start`` on a free block of ports; once more on another block if it does not answer (on a
        loaded machine SeaweedFS's first start sometimes never serves a signed request)."""
        for attempt in range(tries):
            self.s3_port = _free_block(s3_ports, 20000, 30000)
            env = self._s3_script_env()
            self.started.append("s3")
            try:
                out = self._run(["bash", "cluster/s3.sh", "start"], env, "cluster/s3.sh start", timeout=180)
                break
            except RuntimeError:
                if attempt == tries - 1:
                    raise
                self._run(["bash", "cluster/s3.sh", "stop"], env, "cluster/s3.sh stop")
                shutil.rmtree(self.root / "s3", ignore_errors=True)
        self.s3_env = dict(re.findall(r"^export (\w+)=(\S+)$", out, flags=re.M))
        self.s3_env["AWS_EC2_METADATA_DISABLED"] = "true"

    def _s3_script_env(self) -> dict[str, str]:
        return self.base_env(LASEGSEG_S3_DIR=str(self.root / "s3"), LASEGSEG_S3_PORT=str(self.s3_port),
                             LASEGSEG_S3_BUCKET=BUCKET)  # fmt: skip

    def _start_mlflow(self) -> None:
        self.mlflow_port = _free_block(lambda p: [p], 30000, 40000)
        env = self.base_env(**self.s3_env, MLFLOW_STATE_DIR=str(self.root / "mlflow"),
                            MLFLOW_PORT=str(self.mlflow_port),
                            MLFLOW_ARTIFACTS_DESTINATION=f"s3://{BUCKET}/mlartifacts")  # fmt: skip
        mode = "local"
        if self.postgres:
            from bench.scale_probe import reset_postgres  # deferred: heavy (sqlalchemy), PostgreSQL runs only

            reset_postgres(self.postgres)
            self.auth = ("admin", secrets.token_urlsafe(18))
            env.update(MLFLOW_BACKEND_STORE_URI=self.postgres, MLFLOW_AUTH_ADMIN_PASSWORD=self.auth[1])
            mode = "production"
        self.mlflow_env = env
        self.started.append("mlflow")
        self._run(["bash", "mlflow_server/start.sh", mode], env, f"mlflow_server/start.sh {mode}", timeout=240)

    def _start_ray(self) -> None:
        self.gcs = _free_block(ray_ports, 41000, 49000, step=1000)
        env = self.client_env(
            RAY_GCS_PORT=str(self.gcs), RAY_DASHBOARD_PORT=str(self.gcs + 50),
            RAY_DASHBOARD_AGENT_PORT=str(self.gcs + 51),
            LASEGSEG_CLUSTER_DIR=str(self.cluster_dir), LASEGSEG_CACHE=str(self.head_cache),
        )  # fmt: skip
        cpus = max(1, round(GPUS_PER_WORKER * CPUS_PER_TRIAL))
        self.started.append("ray")
        self._run(["bash", "cluster/local.sh", "start", "--workers", str(WORKERS), "--gpus-per-worker",
                   str(GPUS_PER_WORKER), "--cpus-per-worker", str(cpus)], env, "cluster/local.sh start")  # fmt: skip

    def stop(self) -> None:
        """Stop Ray's nodes, the MLflow server and the S3 server, then anything else carrying the marker."""
        if "ray" in self.started:
            self._stop_marked(exclude=self._server_pids(), grace=15)
        if "mlflow" in self.started:
            subprocess.run(["bash", "mlflow_server/stop.sh"], env=self.mlflow_env, capture_output=True, timeout=120,
                           cwd=ROOT)  # fmt: skip
        if "s3" in self.started:
            env = self._s3_script_env()
            subprocess.run(["bash", "cluster/s3.sh", "stop"], env=env, capture_output=True, timeout=120, cwd=ROOT)
        self._stop_marked(exclude=set(), grace=5)
        self.started.clear()
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        if self.gcs:
            shutil.rmtree(Path(os.environ.get("TMPDIR", "/tmp")) / f"lasegseg-ray-{self.gcs}", ignore_errors=True)

    def _server_pids(self) -> set[int]:
        """The MLflow and S3 servers' processes (stopped by their own scripts, after Ray)."""
        import psutil

        out: set[int] = set()
        for pidfile in (self.root / "mlflow" / "mlflow.pid", self.root / "s3" / "weed.pid"):
            try:
                root = psutil.Process(int(pidfile.read_text()))
                out |= {root.pid, *(c.pid for c in root.children(recursive=True))}
            except (OSError, ValueError, psutil.Error):
                continue
        return out

    def _stop_marked(self, exclude: set[int], grace: float) -> None:
        pids = [p for p in marked_pids(self.marker, self.root) if p not in exclude]
        _signal_all(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline:
            time.sleep(0.2)
            pids = [p for p in marked_pids(self.marker, self.root) if p not in exclude]
        _signal_all(pids, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while [p for p in marked_pids(self.marker, self.root) if p not in exclude] and time.monotonic() < deadline:
            time.sleep(0.2)

    # -- what it runs ----------------------------------------------------------------------------------------------

    def pids(self) -> list[int]:
        """Every live process of the stack (servers, Ray nodes and their workers, drivers)."""
        return marked_pids(self.marker, self.root)

    def ports(self) -> list[int]:
        """The fixed ports the stack's servers and nodes listen on."""
        ports = [self.mlflow_port] if self.mlflow_port else []
        if self.s3_port:
            ports += s3_ports(self.s3_port)
        if self.gcs:
            ports += ray_ports(self.gcs)
        return ports
