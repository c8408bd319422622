"""Sweep storage roots: local folders, s3:// through a real S3 API server on loopback, refusals, outages."""

from __future__ import annotations

import time

import pytest
from pyarrow import fs as pafs

from lasegseg.errors import ConfigError
from lasegseg.sweep.storage import SCHEMES, parse_storage


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


def test_a_new_scheme_is_one_registry_entry(tmp_path):
    """Registering a scheme is all it takes for --storage-path to accept it and hand its filesystem to Tune."""
    local = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    SCHEMES.add("mem", lambda: local)
    try:
        root = parse_storage("mem://bucket/runs").join("demo")
        assert (root.scheme, root.path, root.remote, root.uri) == (
            "mem",
            "bucket/runs/demo",
            True,
            "mem://bucket/runs/demo",
        )
        assert root.filesystem() is local and root.tune_path() == "bucket/runs/demo"
        (tmp_path / "bucket/runs/demo").mkdir(parents=True)  # a local disk has folders, object stores do not
        root.write_bytes("state.json", b"{}")
        assert root.read_bytes("state.json") == b"{}" and (tmp_path / "bucket/runs/demo/state.json").is_file()
    finally:
        SCHEMES.remove("mem")
    with pytest.raises(ConfigError, match=r"unsupported scheme 'mem://' \(use a folder, gs:// or s3://\)"):
        parse_storage("mem://bucket/runs")
