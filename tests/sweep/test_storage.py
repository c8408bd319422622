"""Sweep storage roots: local folders, s3:// through a real S3 API server on loopback, refusals, outages."""

from __future__ import annotations

import pickle
import threading
import time

import pytest

from lasegseg.errors import ConfigError
from lasegseg.sweep.storage import is_transient, parse_storage, with_retries
from tests.object_store import S3Server


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3, monkeypatch):
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    return s3


@pytest.mark.parametrize(
    "text,scheme,path",
    [("s3://bucket/runs/", "s3", "bucket/runs"), ("gs://b", "gs", "b"), ("S3://b/x/y", "s3", "b/x/y")],
)
def test_object_store_uris_keep_their_scheme(text, scheme, path):
    root = parse_storage(text)
    assert (root.scheme, root.path, root.remote) == (scheme, path, True)
    assert root.join("sweep", "tune").uri == f"{scheme}://{path}/sweep/tune"


def test_local_paths_are_absolute_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = parse_storage("runs")
    assert not root.remote and root.path == str(tmp_path / "runs") and root.filesystem() is None
    assert parse_storage(f"file://{tmp_path}/x").path == str(tmp_path / "x")


@pytest.mark.parametrize("text,words", [("ftp://host/x", "unsupported scheme"), ("s3://", "no bucket"),
                                        ("hdfs://nn/x", "unsupported scheme")])  # fmt: skip
def test_bad_uris_are_refused_in_one_line(text, words):
    with pytest.raises(ConfigError, match=words) as err:
        parse_storage(text)
    assert "\n" not in str(err.value) and text in str(err.value)


def test_files_round_trip_through_s3_and_no_local_s3_folder(s3_env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = parse_storage(f"s3://{s3_env.bucket}/runs").join("demo")
    root.check()
    root.write_bytes("sweep_state.json", b'{"status": "running"}')
    assert root.read_bytes("sweep_state.json") == b'{"status": "running"}'
    assert root.read_bytes("missing.json") is None
    files = [k for k in s3_env.keys() if not k.endswith("/")]  # pyarrow also writes folder markers
    assert "runs/demo/sweep_state.json" in files and not any("write-check" in k for k in files)
    assert not (tmp_path / "s3:").exists() and list(tmp_path.iterdir()) == []


def test_the_filesystem_pickles_without_credentials(s3_env):
    fs = parse_storage(f"s3://{s3_env.bucket}/runs").filesystem()
    blob = pickle.dumps(fs)
    assert s3_env.secret_key.encode() not in blob and s3_env.access_key.encode() not in blob
    clone = pickle.loads(blob)
    with clone.open_output_stream(f"{s3_env.bucket}/runs/p.txt") as out:
        out.write(b"pickled")
    assert s3_env.read("runs/p.txt") == b"pickled"


def test_a_missing_bucket_is_refused_in_one_line(s3_env):
    with pytest.raises(ConfigError, match="bucket 'no-such-bucket' does not exist"):
        parse_storage("s3://no-such-bucket/runs").check()


def test_an_unreachable_endpoint_is_refused_in_one_line(monkeypatch, s3_env):
    from tests.helpers import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match="unreachable or refused") as err:
        parse_storage("s3://bucket/runs").check()
    assert "\n" not in str(err.value) and time.monotonic() - t0 < 60


def test_an_upload_waits_out_an_outage_and_arrives_whole(s3_env, monkeypatch):
    """The store goes away for 3 s in the middle of a write: the write is sent again once it is back."""
    monkeypatch.setenv("LASEGSEG_STORAGE_RETRY_SECONDS", "60")
    fs = parse_storage(f"s3://{s3_env.bucket}/runs").filesystem()
    payload = bytes(range(256)) * 40_000  # 10 MB
    s3_env.proxy.outage()
    threading.Timer(3.0, s3_env.proxy.restore).start()
    t0 = time.monotonic()
    with fs.open_output_stream(f"{s3_env.bucket}/runs/big.bin") as out:
        out.write(payload)
    assert time.monotonic() - t0 >= 2.5
    assert s3_env.read("runs/big.bin") == payload


def test_only_transient_faults_are_retried():
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("no such key")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, "read", seconds=10)
    assert len(calls) == 1
    assert is_transient(OSError("AWS Error NETWORK_CONNECTION during PutObject: curlCode: 7, Couldn't connect"))
    assert not is_transient(OSError("AWS Error ACCESS_DENIED during PutObject"))
    assert not is_transient(PermissionError("denied"))
