"""Object stores behind pyarrow: the retry policy every storage call follows, and S3 through boto3.

A store that goes away for a while (a restart, a network blip) costs waiting, not a failed trial: every call is
retried with backoff for ``$LASEGSEG_STORAGE_RETRY_SECONDS`` (300), and writes are spooled to a local file first, so
a failed upload is sent again whole. The S3 endpoint comes from the standard ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``; credentials from each process's own environment (the usual AWS chain), never from anything
pickled, logged or stored.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa
from botocore.exceptions import BotoCoreError, ClientError
from pyarrow import fs as pafs

from lasegseg.errors import LasegsegError
from lasegseg.retry import call_with_retries, env_seconds

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ENV = "LASEGSEG_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 300.0
_MAX_WAIT_S = 8.0
_SPOOL_BYTES = 64 << 20
# Messages of pyarrow's OSErrors for faults worth waiting out: the store is unreachable, busy or restarting.
_TRANSIENT = (
    "NETWORK_CONNECTION", "curlCode", "Couldn't connect", "Connection refused", "connection reset", "timed out",
    "Timeout", "SLOW_DOWN", "SERVICE_UNAVAILABLE", "INTERNAL_FAILURE", "Broken pipe", "Unable to connect",
    "REQUEST_TIMEOUT", "Empty reply", "status code: 5",
)  # fmt: skip


def retry_seconds() -> float:
    """How long a storage call keeps retrying a transient fault (``$LASEGSEG_STORAGE_RETRY_SECONDS``, 300 s)."""
    return env_seconds(RETRY_ENV, DEFAULT_RETRY_SECONDS)


def is_transient(exc: BaseException) -> bool:
    """A storage fault that a retry may fix (not a missing object, a refused credential or a bad bucket)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    from boto3.exceptions import S3UploadFailedError  # deferred: heavy (boto3, ~0.2 s): an S3 upload's fault

    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or err.get("Code") in ("SlowDown", "RequestTimeout", "Throttling")
    if isinstance(exc, BotoCoreError):  # connection refused or reset, timeouts: never an answer from the store
        return "NoCredentials" not in type(exc).__name__ and "ParamValidation" not in type(exc).__name__
    if isinstance(exc, S3UploadFailedError):
        return not any(w in str(exc) for w in ("AccessDenied", "NoSuchBucket", "InvalidAccessKeyId"))
    return isinstance(exc, OSError) and _transient_words(str(exc))


def _transient_words(text: str) -> bool:
    return any(m.lower() in text.lower() for m in _TRANSIENT)


def with_retries(fn: Callable[[], T], what: str, seconds: float | None = None) -> T:
    """Call ``fn`` until it succeeds or a fault is not transient, backing off for at most ``seconds``."""
    budget = retry_seconds() if seconds is None else seconds
    return call_with_retries(fn, what, transient=is_transient, seconds=budget, first_wait=0.25,
                             max_wait=_MAX_WAIT_S, log=log, service="storage:")  # fmt: skip


def s3_endpoint() -> str | None:
    """The S3 endpoint from the standard variables (``AWS_ENDPOINT_URL_S3`` first), or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


class _Spool:
    """A write-only file that uploads its bytes, with retries, when closed (a failed upload is sent again whole)."""

    def __init__(self, upload: Callable[[Any], None]) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
        self._upload = upload
        self.closed = False

    def write(self, data) -> int:
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def tell(self) -> int:
        return self._file.tell()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self._file.seek(0)
            self._upload(self._file)
        finally:
            self._file.close()


def _split(path: str) -> tuple[str, str]:
    bucket, _, key = path.strip("/").partition("/")
    return bucket, key


class S3Handler(pafs.FileSystemHandler):
    """An S3 bucket as a pyarrow filesystem, through boto3, retrying transient faults; pickles as the endpoint only.

    boto3 rather than pyarrow's own S3 client: Tune calls a filesystem from Arrow's I/O thread pool, and a Python
    handler that called pyarrow's S3 client (which runs on the same pool) from there deadlocks once the pool is
    busy. Each process builds its own client on first use from its own environment, so credentials never travel
    inside Ray's pickles. Folders are implicit (key prefixes), with ``key/`` markers as pyarrow writes them.
    """

    def __init__(self, endpoint: str | None) -> None:
        self.endpoint = endpoint
        self._client = None
        self._lock = threading.Lock()

    def __reduce__(self):
        return (S3Handler, (self.endpoint,))

    @property
    def s3(self):
        with self._lock:
            if self._client is None:
                # deferred: heavy (boto3, ~0.2 s): only a sweep on S3 builds a client
                import boto3
                from botocore.config import Config

                # Few quick retries inside botocore; with_retries waits out longer outages with backoff.
                cfg = Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60)
                self._client = boto3.session.Session().client("s3", endpoint_url=self.endpoint, config=cfg)
            return self._client

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return with_retries(fn, f"{what} (s3)")

    def get_type_name(self) -> str:
        return "lasegseg-s3"

    def normalize_path(self, path):
        return path.strip("/")

    def get_file_info(self, paths):
        return [self._info(p) for p in paths]

    def _info(self, path: str):
        bucket, key = _split(path)
        if not key:
            ok = self._call("head bucket", lambda: self._exists(lambda: self.s3.head_bucket(Bucket=bucket)))
            return pafs.FileInfo(path, pafs.FileType.Directory if ok else pafs.FileType.NotFound)
        head = self._call("stat", lambda: self._head(bucket, key))
        if head is not None:
            return pafs.FileInfo(path, pafs.FileType.File, size=head["ContentLength"], mtime=head["LastModified"])
        page = self._call("list", lambda: self.s3.list_objects_v2(Bucket=bucket, Prefix=key + "/", MaxKeys=1))
        return pafs.FileInfo(path, pafs.FileType.Directory if page.get("KeyCount") else pafs.FileType.NotFound)

    def _head(self, bucket: str, key: str):
        try:
            return self.s3.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise

    @staticmethod
    def _exists(fn: Callable[[], Any]) -> bool:
        try:
            fn()
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise

    def _keys(self, bucket: str, prefix: str) -> list[dict[str, Any]]:
        out, token = [], None
        while True:
            kwargs = {"Bucket": bucket, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = self._call("list", lambda kw=kwargs: self.s3.list_objects_v2(**kw))
            out += page.get("Contents", [])
            token = page.get("NextContinuationToken")
            if not token:
                return out

    def get_file_info_selector(self, selector):
        bucket, key = _split(selector.base_dir)
        prefix = f"{key}/" if key else ""
        objects = self._keys(bucket, prefix)
        if (
            not objects
            and not selector.allow_not_found
            and self._info(selector.base_dir).type != pafs.FileType.Directory
        ):
            raise FileNotFoundError(f"s3://{selector.base_dir}: no such folder")
        files, dirs = {}, set()
        for obj in objects:
            rel = obj["Key"][len(prefix) :]
            parts = [p for p in rel.split("/") if p]
            if not parts or (not selector.recursive and len(parts) > 1):
                if parts:
                    dirs.add(parts[0])
                continue
            for i in range(1, len(parts)):
                dirs.add("/".join(parts[:i]))
            if obj["Key"].endswith("/"):
                dirs.add("/".join(parts))
            else:
                files["/".join(parts)] = obj
        base = f"{bucket}/{prefix}"
        out = [pafs.FileInfo(base + d, pafs.FileType.Directory) for d in sorted(dirs)]
        out += [pafs.FileInfo(base + f, pafs.FileType.File, size=o["Size"], mtime=o["LastModified"])
                for f, o in sorted(files.items())]  # fmt: skip
        return out

    def create_dir(self, path, recursive):
        bucket, key = _split(path)
        if key:
            self._call("mkdir", lambda: self.s3.put_object(Bucket=bucket, Key=key + "/", Body=b""))

    def _delete_prefix(self, path: str, keep_marker: bool) -> None:
        bucket, key = _split(path)
        keys = [o["Key"] for o in self._keys(bucket, f"{key}/" if key else "")]
        if keep_marker:
            keys = [k for k in keys if k != f"{key}/"]
        for start in range(0, len(keys), 1000):
            batch = {"Objects": [{"Key": k} for k in keys[start : start + 1000]], "Quiet": True}
            self._call("delete", lambda b=batch: self.s3.delete_objects(Bucket=bucket, Delete=b))

    def delete_dir(self, path):
        self._delete_prefix(path, keep_marker=False)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._delete_prefix(path, keep_marker=True)

    def delete_root_dir_contents(self):
        raise LasegsegError("refusing to delete the whole bucket")

    def delete_file(self, path):
        bucket, key = _split(path)
        self._call("delete", lambda: self.s3.delete_object(Bucket=bucket, Key=key))

    def copy_file(self, src, dest):
        (sb, sk), (db, dk) = _split(src), _split(dest)
        self._call("copy", lambda: self.s3.copy_object(Bucket=db, Key=dk, CopySource={"Bucket": sb, "Key": sk}))

    def move(self, src, dest):
        if self._info(src).type == pafs.FileType.File:
            self.copy_file(src, dest)
            self.delete_file(src)
            return
        sb, sk = _split(src)
        for obj in self._keys(sb, sk + "/"):
            rel = obj["Key"][len(sk) + 1 :]
            self.copy_file(f"{sb}/{obj['Key']}", f"{dest.rstrip('/')}/{rel}")
        self.delete_dir(src)

    def open_input_stream(self, path):
        return self._download(path)

    def open_input_file(self, path):
        return self._download(path)

    def _download(self, path: str):
        bucket, key = _split(path)
        if self._call("stat", lambda: self._head(bucket, key)) is None:
            raise FileNotFoundError(f"s3://{path}: no such object")
        spooled = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)

        def fetch() -> None:
            spooled.seek(0)
            spooled.truncate()
            self.s3.download_fileobj(bucket, key, spooled)

        self._call(f"download s3://{path}", fetch)
        spooled.seek(0)
        return pa.PythonFile(spooled, mode="r")

    def open_output_stream(self, path, metadata):
        bucket, key = _split(path)

        def upload(spooled) -> None:
            def send() -> None:
                spooled.seek(0)
                self.s3.upload_fileobj(spooled, bucket, key)

            self._call(f"upload s3://{path}", send)

        return pa.PythonFile(_Spool(upload), mode="w")

    def open_append_stream(self, path, metadata):
        raise OSError(f"s3://{path}: object stores cannot append")
