"""Real Ray clusters on this machine, started and stopped with ``cluster/local.sh`` exactly as a user would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import MlflowServer, free_port, sweep_env
from tests.helpers import port_free as _port_free
from tests.object_store import S3Server

ROOT = Path(__file__).resolve().parents[2]
LOCAL_SH = ROOT / "cluster" / "local.sh"
# Ray notices a killed node after health_check_failure_threshold missed checks; seconds instead of half a minute.
FAST_FAILURE_DETECTION = {
    "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3", "RAY_health_check_initial_delay_ms": "1000",
}  # fmt: skip


def _port_block() -> int:
    """A base port whose GCS, dashboard and per-node agent ports (see cluster/local.sh) are all free."""
    for base in range(21000 + (os.getpid() % 20) * 1000, 60000, 1000):
        used = [base, base + 50, base + 51] + [base + 100 * i + k for i in (1, 2, 3) for k in range(1, 7)]
        if all(_port_free(p) for p in used):
            return base
    raise RuntimeError("no free port block for a local Ray cluster")


class LocalCluster:
    """``cluster/local.sh`` with its own HOME (Ray token), ports, node cache folders and environment."""

    def __init__(self, root: Path, extra_env: dict[str, str]) -> None:
        self.root = root
        self.home, self.state, self.head_cache = root / "home", root / "cluster", root / "head-cache"
        self.home.mkdir(parents=True, exist_ok=True)
        self.gcs = _port_block()
        self.dash = self.gcs + 50
        self.env = {**sweep_env(), **FAST_FAILURE_DETECTION, **extra_env, "HOME": str(self.home),
                    "RAY_GCS_PORT": str(self.gcs), "RAY_DASHBOARD_PORT": str(self.dash),
                    "RAY_DASHBOARD_AGENT_PORT": str(self.gcs + 51),
                    "LASEGSEG_CLUSTER_DIR": str(self.state), "LASEGSEG_CACHE": str(self.head_cache),
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip

    def start(self, *args: str) -> str:
        """``cluster/local.sh start ARGS``; returns the line it printed for ``ray job submit``."""
        proc = subprocess.run(["bash", str(LOCAL_SH), "start", *args], env=self.env, capture_output=True, text=True,
                              timeout=300, cwd=ROOT)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert f"RAY_ADDRESS=http://127.0.0.1:{self.dash}" in proc.stderr
        return proc.stdout.strip()

    def shell(self, line: str, env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
        """Run a printed command line verbatim through bash, from the project root."""
        return subprocess.run(["bash", "-c", line], env=env or self.env, capture_output=True, text=True,
                              timeout=timeout, cwd=ROOT)  # fmt: skip

    def driver_env(self, **extra: str) -> dict[str, str]:
        """The environment of a sweep driver started on this machine against the cluster (not a submitted job)."""
        # The nodes are on 127.0.0.1 (cluster/ray_loopback.py): so is a driver of this machine, as local.sh says.
        return {**self.env, "RAY_ADDRESS": f"127.0.0.1:{self.gcs}", "RAY_AUTH_MODE": "token",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **extra}  # fmt: skip

    def node_cache(self, i: int) -> Path:
        return self.state / f"node-{i}" / "cache"

    def nodes(self) -> dict[str, dict]:
        """Alive Ray nodes by id: ``{"index": 0 (head) or the worker number, "cpus", "gpus"}``."""
        code = (
            "import json, ray; ray.init(address='auto', logging_level='ERROR', log_to_driver=False); "
            "print(json.dumps([n for n in ray.nodes() if n['Alive']]))"
        )
        proc = subprocess.run([sys.executable, "-c", code], env=self.driver_env(), capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        ports = {self.gcs + 100 * i + 1: i for i in (1, 2, 3)}
        out = {}
        for node in json.loads(proc.stdout.strip().splitlines()[-1]):
            res = node["Resources"]
            index = ports.get(node["NodeManagerPort"], 0)
            out[node["NodeID"]] = {"index": index, "cpus": res.get("CPU", 0), "gpus": res.get("GPU", 0),
                                   "ip": node["NodeManagerAddress"]}  # fmt: skip
        return out

    def processes(self, cache: Path | None = None) -> list:
        """This cluster's processes (every one inherits LASEGSEG_CLUSTER_DIR or a node cache from local.sh)."""
        import psutil

        found = []
        for proc in psutil.process_iter():
            try:
                env = proc.environ()
            except (psutil.Error, OSError):
                continue
            if env.get("LASEGSEG_CLUSTER_DIR") == str(self.state) or env.get("HOME") == str(self.home):
                if cache is None or env.get("LASEGSEG_CACHE") == str(cache):
                    found.append(proc)
        return found

    def kill_node(self, i: int) -> int:
        """SIGKILL every process of worker node ``i`` (raylet, agents, workers): the machine is gone."""
        procs = self.processes(self.node_cache(i))
        for proc in procs:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return len(procs)

    def stop(self) -> None:
        subprocess.run(["bash", str(LOCAL_SH), "stop"], env=self.env, capture_output=True, timeout=180, cwd=ROOT)

    def assert_stopped(self) -> None:
        """``stop`` leaves no process of this cluster and no port it listened on."""
        deadline = time.time() + 30
        while self.processes() and time.time() < deadline:
            time.sleep(0.5)
        assert not self.processes(), [p.pid for p in self.processes()]
        assert _port_free(self.gcs) and _port_free(self.dash)


@pytest.fixture(scope="session")
def servers(tmp_path_factory):
    """An S3 API server and an MLflow tracking server, both on loopback, shared by the cluster tests."""
    s3 = S3Server(tmp_path_factory.mktemp("s3")).start()  # its folder holds its keys: apart from MLflow's files
    mlflow = MlflowServer(tmp_path_factory.mktemp("mlflow"), free_port())
    try:
        mlflow.start()
        yield s3, mlflow
    finally:
        try:
            mlflow.kill()
        finally:
            s3.stop()


def trial_runs(uri: str, experiment: str):
    from tests.helpers import sweep_runs

    return sweep_runs(uri, experiment)
