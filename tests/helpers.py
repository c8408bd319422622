"""Helpers shared by the tests that run whole sweeps in subprocesses."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def sweep_env() -> dict[str, str]:
    """The test process's environment for a sweep subprocess: its own local Ray and MLflow, one thread per op."""
    env = dict(os.environ)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def sweep_runs(uri: str, experiment: str):
    """(client, experiment, sweep parent runs, trial child runs) of an experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("lasegseg.role") == "sweep"]
    trials = [r for r in runs if r.data.tags.get("lasegseg.role") == "trial"]
    return client, exp, parents, trials


def postgres_test_uri() -> str:
    """``$LASEGSEG_TEST_PG_URI`` (a database named for tests, as `.ci/postgres` makes it), else skip the test."""
    import re

    import pytest

    uri = os.environ.get("LASEGSEG_TEST_PG_URI")
    if not uri:
        pytest.skip('no PostgreSQL for the tests: run `eval "$(.ci/postgres)"` (CI does) to set LASEGSEG_TEST_PG_URI')
    if not re.search(r"/\w*(ci|test)\w*$", uri):
        pytest.skip(f"{uri}: tests write to and wipe this database, so its name must contain 'ci' or 'test'")
    pytest.importorskip("psycopg", reason="the PostgreSQL driver (psycopg) is not installed")
    return uri


def port_free(port: int) -> bool:
    """Nothing listens on the loopback port (TIME_WAIT leftovers of closed connections are no process)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def ray_listeners_off_loopback() -> list[str]:
    """Listening TCP sockets of this machine's Ray processes (GCS, raylet, agents, workers) on any address but a
    loopback one (127.0.0.0/8, ::1, or IPv4 loopback mapped into IPv6), as ``"name pid address:port"``."""
    import ipaddress

    import psutil

    def loopback(ip: str) -> bool:
        addr = ipaddress.ip_address(ip.split("%")[0])
        mapped = getattr(addr, "ipv4_mapped", None)
        return (mapped or addr).is_loopback

    off = []
    for conn in psutil.net_connections(kind="tcp"):
        if conn.status != psutil.CONN_LISTEN or conn.pid is None or loopback(conn.laddr.ip):
            continue
        try:
            proc = psutil.Process(conn.pid)
            name, cmdline = proc.name(), " ".join(proc.cmdline())
        except psutil.Error:
            continue
        if name in ("gcs_server", "raylet") or name.startswith("ray::") or "/ray/" in cmdline:
            off.append(f"{name} {conn.pid} {conn.laddr.ip}:{conn.laddr.port}")
    return off


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on loopback with a sqlite store, as a process group that can be killed and restarted."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> None:
        mlflow = Path(sys.executable).parent / "mlflow"
        cmd = [str(mlflow), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", str(self.root / "artifacts")]  # fmt: skip
        log = open(self.root / "server.log", "a")  # noqa: SIM115 - owned by the server process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2).read()  # noqa: S310 - loopback
                return
            except OSError:
                time.sleep(0.3)
        raise AssertionError("mlflow server did not start:\n" + (self.root / "server.log").read_text()[-3000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers, no clean shutdown
            self.proc.wait(timeout=30)


def chromium() -> str:
    """Debian's Chromium (``.ci/run`` installs it); skip the test where it is absent, fail in CI."""
    import shutil

    import pytest

    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is not installed (.ci/run installs Debian's package)")
        pytest.skip("chromium is not installed")
    return found


def headless_chromium(page: Path, tmp: Path, *, screenshot: Path | None = None, width: int = 1280,
                      height: int = 2400) -> str:  # fmt: skip
    """Open a local HTML file in headless Chromium with no network; return the DOM it built, and optionally save a
    screenshot. The flags keep Chromium from reaching out (this machine's network refuses it anyway)."""
    args = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", f"--user-data-dir={tmp / 'chromium-profile'}", f"--window-size={width},{height}",
        "--hide-scrollbars",
    ]  # fmt: skip
    url = page.resolve().as_uri()
    if screenshot is not None:
        subprocess.run([*args, f"--screenshot={screenshot}", url], check=True, capture_output=True, timeout=120)
    done = subprocess.run([*args, "--dump-dom", url], check=True, capture_output=True, text=True, timeout=120)
    return done.stdout


DEMO_YAML = Path(__file__).resolve().parents[1] / "sweeps" / "configs" / "demo.yaml"


def quick_demo_yaml(folder: Path, *, epochs: int = 1, image_size: int = 28, dinov3_image_size: int = 32) -> Path:
    """demo.yaml at test sizes, DINOv3 cell included: its DINOv2 cells at ``image_size`` (a multiple of 14), its
    DINOv3 cell at ``dinov3_image_size`` (a multiple of 16), ``epochs`` epochs. A ``--set data.image_size`` cannot
    do this: it sets one size for every cell."""
    import yaml

    spec = yaml.safe_load(DEMO_YAML.read_text())
    spec["base"].update({"data.image_size": image_size, "train.epochs": epochs})
    for cell in spec["baselines"]:
        if str(cell.get("model.backbone", "")).endswith("dinov3"):
            cell["data.image_size"] = dinov3_image_size
    path = Path(folder) / "demo-quick.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    return path


def dinov2_demo(image_size: int = 28) -> list[str]:
    """``--set`` flags that cut demo.yaml to its DINOv2 cells at ``image_size``: with the backbone and the image size
    pinned, the DINOv3 cell becomes a copy of a DINOv2 cell, which the sweep runs once."""
    return ["--set", "model.backbone=tiny", "--set", f"data.image_size={image_size}"]


def _proc_net_address(text: str) -> tuple[str, int]:
    """``0100007F:1F90`` (or IPv6's 32 hex digits), as the kernel prints it in /proc/net, to ``("127.0.0.1", 8080)``:
    each 32-bit word of the address is in the host's byte order."""
    import ipaddress

    addr, port = text.split(":")
    raw = b"".join(int(addr[i : i + 8], 16).to_bytes(4, sys.byteorder) for i in range(0, len(addr), 8))
    return str(ipaddress.ip_address(raw)), int(port, 16)


def listeners(pids) -> list[tuple[str, int]]:
    """Sorted (ip, port) of the listening sockets the processes ``pids`` hold open: TCP in LISTEN, and UDP sockets
    bound but not connected. Read from /proc/<pid>/fd (socket inodes) and each process's /proc/<pid>/net tables."""
    found: set[tuple[str, int]] = set()
    for pid in pids:
        inodes = set()
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue  # gone, or not ours to read
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue  # closed meanwhile
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
        for proto, listening in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
            try:
                rows = Path(f"/proc/{pid}/net/{proto}").read_text().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                cols = row.split()
                if cols[3] == listening and cols[9] in inodes:
                    found.add(_proc_net_address(cols[1]))
    return sorted(found)


def off_loopback(pids) -> list[tuple[str, int]]:
    """The listeners of ``pids`` on any address but 127.0.0.1 or ::1 (0.0.0.0 and :: are every interface)."""
    return [(ip, port) for ip, port in listeners(pids) if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]


def process_tree(pid: int) -> list[int]:
    """``pid`` and every live descendant (zombies, killed but not yet reaped, are not alive)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
    alive = []
    for proc in procs:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc.pid)
        except psutil.Error:
            pass
    return alive
