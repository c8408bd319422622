"""``cluster/s3.sh``: SeaweedFS on loopback alone, refusing requests not signed with its keys, keeping objects across
a restart, and leaving no process, port or socket behind."""

from __future__ import annotations

import os
import socket
import stat
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import psutil
import pytest
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.helpers import listeners, off_loopback, port_free, process_tree
from tests.object_store import S3Server, free_s3_port, s3_ports, s3_sh

pytestmark = pytest.mark.cluster


def _status(url: str) -> int:
    try:
        return urllib.request.urlopen(url, timeout=10).status  # noqa: S310 - loopback
    except urllib.error.HTTPError as err:
        return err.code


def _client(endpoint: str, key: str, secret: str):
    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name="us-east-1")  # fmt: skip


def _refused(client) -> str:
    """The error code of reading the test's object with ``client``."""
    with pytest.raises(ClientError) as err:
        client.get_object(Bucket="lasegseg", Key="runs/a.bin")
    return err.value.response["Error"]["Code"]


def _assert_on_loopback_alone(s3: S3Server) -> list[int]:
    tree = process_tree(s3.pid)
    assert tree, "no server process"
    assert off_loopback(tree) == []
    # Every port the script names and no other (WebDAV, admin UI, catalogs, metrics are off), all on 127.0.0.1.
    assert listeners(tree) == sorted(("127.0.0.1", p) for p in s3_ports(s3.port).values())
    for pid in tree:  # nothing dialled out either (telemetry is off)
        remote = [c.raddr.ip for c in psutil.Process(pid).net_connections("inet") if c.raddr]
        assert set(remote) <= {"127.0.0.1"}, remote
    return tree


def test_the_server_listens_on_loopback_alone_demands_its_keys_and_stops_clean(tmp_path):
    s3 = S3Server(tmp_path, bucket="lasegseg").start()
    ports = s3_ports(s3.port)
    try:
        tree = _assert_on_loopback_alone(s3)
        payload = os.urandom(3 << 20)
        s3.client().put_object(Bucket="lasegseg", Key="runs/a.bin", Body=payload)
        assert s3.read("runs/a.bin") == payload and s3.keys("runs/") == ["runs/a.bin"]

        direct = f"http://127.0.0.1:{s3.port}"
        assert _status(f"{direct}/lasegseg/runs/a.bin") == 403  # a plain unsigned GET
        unsigned = boto3.client("s3", endpoint_url=direct, config=Config(signature_version=UNSIGNED))
        assert _refused(unsigned) == "AccessDenied"
        assert _refused(_client(direct, s3.access_key, s3.secret_key[::-1])) == "SignatureDoesNotMatch"
        # The documentation's example keys, which some servers ship as defaults.
        stranger = _client(direct, "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
        assert _refused(stranger) == "InvalidAccessKeyId"

        # The keys are the server's own, readable by the user alone, and `env` prints them again.
        assert stat.S_IMODE(s3.state.stat().st_mode) == 0o700
        assert stat.S_IMODE((s3.state / "s3.json").stat().st_mode) == 0o600
        again = s3_sh("env", env=s3.script_env)
        assert f"export AWS_SECRET_ACCESS_KEY={s3.secret_key}\n" in again.stdout
        assert "--storage-path s3://lasegseg/runs" in again.stdout
    finally:
        s3.stop()
    assert not any(process_tree(pid) for pid in tree)
    assert [p for p in ports.values() if not port_free(p)] == []
    numbers = {str(port) for port in ports.values()}  # SeaweedFS names its gRPC sockets by port
    assert not [p.name for p in Path("/tmp").glob("seaweedfs-*.sock") if p.stem.rsplit("-", 1)[-1] in numbers]
    assert not Path(f"/tmp/lasegseg-s3-{s3.port}").exists()

    # Started again from the same folder: the same keys, the objects kept.
    keys = (s3.access_key, s3.secret_key)
    s3.start()
    try:
        assert (s3.access_key, s3.secret_key) == keys and s3.read("runs/a.bin") == payload
    finally:
        s3.stop()


@pytest.mark.parametrize(
    "env,needle",
    [
        ({"LASEGSEG_S3_BUCKET": "Not_A_Bucket"}, "LASEGSEG_S3_BUCKET 'Not_A_Bucket' is not an S3 bucket name"),
        ({"LASEGSEG_S3_PORT": "80"}, "LASEGSEG_S3_PORT must be a port from 1024 to 55527"),
        ({"LASEGSEG_S3_START_TIMEOUT": "soon"}, "LASEGSEG_S3_START_TIMEOUT must be a whole number"),
    ],
)
def test_bad_settings_are_refused_in_one_line(tmp_path, env, needle):
    proc = s3_sh("start", env={"LASEGSEG_S3_DIR": str(tmp_path / "s3"), **env}, timeout=30)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr
    assert not (tmp_path / "s3").exists()


def test_a_port_in_use_is_named(tmp_path):
    base = free_s3_port()
    filer = s3_ports(base)["filer"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", filer))
        taken.listen()
        proc = s3_sh("start", env={"LASEGSEG_S3_DIR": str(tmp_path / "s3"), "LASEGSEG_S3_PORT": str(base)}, timeout=30)
    assert proc.returncode == 2 and f"port {filer} (filer) is in use" in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "s3" / "weed.pid").exists()
