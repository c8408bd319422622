"""A real S3 server on loopback for the tests: SeaweedFS, started and stopped by ``cluster/s3.sh`` as a user would,
behind a proxy that can take it away.

Clients talk to the proxy's port; ``outage()`` closes the proxy's listening socket and every open connection, so
clients see a refused connection, as when the server is stopped, while the store keeps its objects, and
``restore()`` listens on the same port again. The server itself is untouched, so the fault works on any real server.
"""

from __future__ import annotations

import os
import random
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path

from tests.helpers import free_port, port_free

ROOT = Path(__file__).resolve().parents[1]
S3_SH = ROOT / "cluster" / "s3.sh"


class TcpProxy:
    """Forwards 127.0.0.1:``port`` to 127.0.0.1:``target``, one thread pair per connection."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def outage(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown() first: a bare close() leaves the socket listening until the accept() blocked on it returns,
            # so one more connection would get through.
            _close(listener)
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            _close(conn)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by outage()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                _close(client)
                continue
            with self._lock:
                self._conns |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src)
            _close(dst)
            with self._lock:
                self._conns -= {src, dst}


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


def s3_sh(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    """``cluster/s3.sh ARGS`` from the project root, with this venv's ``weed`` and python first on PATH."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return subprocess.run(["bash", str(S3_SH), *args], env={**os.environ, **env, "PATH": path}, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)  # fmt: skip


def s3_ports(base: int) -> dict[str, int]:
    """Every port ``cluster/s3.sh`` gives a server whose S3 endpoint is ``base``, by name (``s3``, ``filer``, …)."""
    proc = s3_sh("ports", env={"LASEGSEG_S3_PORT": str(base)}, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return {name: int(port) for name, port in (line.split("=") for line in proc.stdout.split())}


def free_s3_port() -> int:
    """An S3 port whose server's ports are all free now (above Ray's worker ports, 10002-19999)."""
    for _ in range(100):
        base = random.randrange(20000, 30000)
        if all(port_free(p) for p in s3_ports(base).values()):
            return base
    raise RuntimeError("no free block of ports for an S3 server")


class S3Server:
    """SeaweedFS on loopback (``cluster/s3.sh``) with one bucket and random keys of its own, which it demands of
    every request; ``env`` is what a client process needs to reach it through the proxy."""

    def __init__(self, root: Path, bucket: str = "lasegseg-test") -> None:
        self.root, self.bucket = root, bucket
        self.state = root / "s3"
        self.port = free_s3_port()
        self.proxy = TcpProxy(self.port)
        self.access_key = self.secret_key = ""  # made by the server's first start

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.proxy.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }  # fmt: skip

    @property
    def script_env(self) -> dict[str, str]:
        """The settings ``cluster/s3.sh`` reads for this server."""
        return {"LASEGSEG_S3_DIR": str(self.state), "LASEGSEG_S3_PORT": str(self.port),
                "LASEGSEG_S3_BUCKET": self.bucket}  # fmt: skip

    @property
    def pid(self) -> int | None:
        """The server's process id while ``cluster/s3.sh`` knows it as running."""
        pidfile = self.state / "weed.pid"
        return int(pidfile.read_text()) if pidfile.exists() else None

    def start(self, timeout: float = 60.0) -> S3Server:
        env = {**self.script_env, "LASEGSEG_S3_START_TIMEOUT": str(int(timeout))}
        proc = s3_sh("start", env=env, timeout=timeout + 60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        exports = dict(re.findall(r"^export (\w+)=(\S+)$", proc.stdout, flags=re.M))
        assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{self.port}", proc.stdout
        self.access_key, self.secret_key = exports["AWS_ACCESS_KEY_ID"], exports["AWS_SECRET_ACCESS_KEY"]
        self.proxy.restore()
        return self

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
        )  # fmt: skip

    def keys(self, prefix: str = "") -> list[str]:
        out, token = [], None
        while True:
            kwargs = {"Bucket": self.bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self.client().list_objects_v2(**kwargs)
            out += [o["Key"] for o in page.get("Contents", [])]
            token = page.get("NextContinuationToken")
            if not token:
                return out

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()

    def stop(self) -> None:
        self.proxy.outage()
        proc = s3_sh("stop", env=self.script_env, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
