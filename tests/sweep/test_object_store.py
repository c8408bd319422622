"""Object stores: which faults are waited out, uploads across an outage, a filesystem that pickles without secrets."""

from __future__ import annotations

import pickle
import threading
import time

import pytest

from lasegseg.sweep.object_store import is_transient, with_retries
from lasegseg.sweep.storage import parse_storage


def test_the_filesystem_pickles_without_credentials(s3_env):
    fs = parse_storage(f"s3://{s3_env.bucket}/runs").filesystem()
    blob = pickle.dumps(fs)
    assert s3_env.secret_key.encode() not in blob and s3_env.access_key.encode() not in blob
    clone = pickle.loads(blob)
    with clone.open_output_stream(f"{s3_env.bucket}/runs/p.txt") as out:
        out.write(b"pickled")
    assert s3_env.read("runs/p.txt") == b"pickled"


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
