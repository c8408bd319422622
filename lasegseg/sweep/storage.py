"""Where a sweep keeps what must outlive its processes: a local folder, ``s3://…`` or ``gs://…``, via pyarrow.

Tune's experiment state and trial checkpoints, and the sweep's own state, timings and summary, go to one storage
root that every node reaches. Object stores are reached through pyarrow's filesystems, wrapped so that a store
that goes away for a while (a restart, a network blip) costs waiting, not a failed trial: every call is retried
with backoff for ``$LASEGSEG_STORAGE_RETRY_SECONDS`` (300), and writes are spooled to a local file first, so a
failed upload is sent again whole. S3's endpoint comes from the standard ``AWS_ENDPOINT_URL_S3`` /
``AWS_ENDPOINT_URL``; credentials come from each process's own environment (the usual AWS chain) and are never put
into anything that is pickled, logged or stored.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

from pyarrow import fs as pafs

from lasegseg.errors import ConfigError, LasegsegError, first_line

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ENV = "LASEGSEG_STORAGE_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 300.0
OBJECT_SCHEMES = ("s3", "gs")
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
    text = os.environ.get(RETRY_ENV, "").strip()
    if not text:
        return DEFAULT_RETRY_SECONDS
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{RETRY_ENV} must be a number of seconds, got '{text}'") from None
    if not value >= 0:
        raise ConfigError(f"{RETRY_ENV} must be >= 0, got '{text}'")
    return value


def is_transient(exc: BaseException) -> bool:
    """A storage fault that a retry may fix (not a missing file, a refused credential or a bad bucket)."""
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return isinstance(exc, OSError) and any(m.lower() in str(exc).lower() for m in _TRANSIENT)


def with_retries(fn: Callable[[], T], what: str, seconds: float | None = None) -> T:
    """Call ``fn`` until it succeeds or a fault is not transient, backing off for at most ``seconds``."""
    deadline = time.monotonic() + (retry_seconds() if seconds is None else seconds)
    wait = 0.25
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or time.monotonic() + wait > deadline:
                raise
            log.warning("storage: %s failed (%s); retrying in %.1fs", what, first_line(exc), wait)
            time.sleep(wait)
            wait = min(wait * 2, _MAX_WAIT_S)


def s3_endpoint() -> str | None:
    """The S3 endpoint from the standard variables (``AWS_ENDPOINT_URL_S3`` first), or None for AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _object_filesystem(scheme: str, endpoint: str | None):
    """pyarrow's own filesystem for ``scheme``; credentials from this process's environment, never passed in."""
    from pyarrow import fs as pafs

    if scheme == "gs":
        return pafs.GcsFileSystem(retry_time_limit=timedelta_seconds(30))
    options: dict[str, Any] = {"connect_timeout": 5.0, "request_timeout": 60.0}
    if endpoint:
        parsed = urlparse(endpoint)
        options |= {"endpoint_override": parsed.netloc or parsed.path, "scheme": parsed.scheme or "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    return pafs.S3FileSystem(retry_strategy=pafs.AwsDefaultS3RetryStrategy(max_attempts=3), **options)


def timedelta_seconds(seconds: float):
    from datetime import timedelta

    return timedelta(seconds=seconds)


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
            self._upload(self._file)
        finally:
            self._file.close()


class RetryingHandler(pafs.FileSystemHandler):
    """Delegates to pyarrow's S3/GCS filesystem, retrying transient faults; pickles as (scheme, endpoint) only.

    Each process builds its own inner filesystem on first use, from its own environment, so neither the retry
    settings (which pyarrow does not pickle) nor credentials travel inside Ray's pickles.
    """

    def __init__(self, scheme: str, endpoint: str | None) -> None:
        self.scheme, self.endpoint = scheme, endpoint
        self._fs = None

    def __reduce__(self):
        return (_rebuild_handler, (self.scheme, self.endpoint))

    @property
    def fs(self):
        if self._fs is None:
            self._fs = _object_filesystem(self.scheme, self.endpoint)
        return self._fs

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        return with_retries(fn, f"{what} ({self.scheme}://)")

    def get_type_name(self) -> str:
        return f"lasegseg-retrying-{self.scheme}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._call("stat", lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._call("list", lambda: self.fs.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._call("mkdir", lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._call("rmdir", lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._call("rmdir", lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        raise LasegsegError("refusing to delete the whole bucket")

    def delete_file(self, path):
        self._call("delete", lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        self._call("move", lambda: self.fs.move(src, dest))

    def copy_file(self, src, dest):
        self._call("copy", lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):
        return self._download(path)

    def open_input_file(self, path):
        return self._download(path)

    def open_output_stream(self, path, metadata):
        import pyarrow as pa

        def upload(spooled) -> None:
            def send() -> None:
                spooled.seek(0)
                with self.fs.open_output_stream(path, metadata=metadata) as out:
                    shutil.copyfileobj(spooled, out, 8 << 20)

            self._call(f"upload {path}", send)

        return pa.PythonFile(_Spool(upload), mode="w")

    def open_append_stream(self, path, metadata):
        raise OSError(f"{self.scheme}://{path}: object stores cannot append")

    def _download(self, path):
        import pyarrow as pa

        spooled = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)

        def fetch() -> None:
            spooled.seek(0)
            spooled.truncate()
            with self.fs.open_input_stream(path) as src:
                shutil.copyfileobj(src, spooled, 8 << 20)

        self._call(f"download {path}", fetch)
        spooled.seek(0)
        return pa.PythonFile(spooled, mode="r")


def _rebuild_handler(scheme: str, endpoint: str | None) -> RetryingHandler:
    return RetryingHandler(scheme, endpoint)


def retrying_filesystem(scheme: str, endpoint: str | None = None):
    """A pyarrow filesystem for ``s3`` or ``gs`` that waits out transient faults (see the module docstring)."""
    from pyarrow import fs as pafs

    return pafs.PyFileSystem(_rebuild_handler(scheme, endpoint))


@dataclass(frozen=True)
class Storage:
    """A sweep's storage root: a local folder, or a bucket prefix behind a retrying pyarrow filesystem.

    Args:
        uri: what the user gave (a local path or ``s3://bucket/prefix``), made absolute for local folders.
        scheme: ``""`` for a local folder, else ``s3`` or ``gs``.
        path: the root as the filesystem names it (``bucket/prefix`` for object stores).
    """

    uri: str
    scheme: str
    path: str

    @property
    def remote(self) -> bool:
        return bool(self.scheme)

    def filesystem(self):
        """The pyarrow filesystem Tune and the sweep write through (None lets Tune use the local disk)."""
        return retrying_filesystem(self.scheme, s3_endpoint() if self.scheme == "s3" else None) if self.remote else None

    def join(self, *parts: str) -> Storage:
        path = "/".join([self.path.rstrip("/"), *parts])
        uri = "/".join([self.uri.rstrip("/"), *parts])
        return Storage(uri, self.scheme, path)

    def tune_path(self) -> str:
        """``storage_path`` for Tune's RunConfig (prefix-stripped when a filesystem is passed along)."""
        return self.path if self.remote else self.uri

    def check(self) -> None:
        """Refuse, in one line, a root that cannot be reached or written (a missing bucket, bad credentials)."""
        if not self.remote:
            try:
                Path(self.path).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"--storage-path {self.uri}: cannot create the folder ({exc.strerror})") from None
            return
        from pyarrow import fs as pafs

        bucket = self.path.split("/", 1)[0]
        raw = _object_filesystem(self.scheme, s3_endpoint() if self.scheme == "s3" else None)
        try:
            info = with_retries(lambda: raw.get_file_info(bucket), f"check {self.uri}", seconds=15)
            if info.type != pafs.FileType.Directory:
                raise ConfigError(f"--storage-path {self.uri}: bucket '{bucket}' does not exist")
            probe = f"{self.path.rstrip('/')}/.lasegseg-write-check"
            with raw.open_output_stream(probe) as out:
                out.write(b"ok")
            raw.delete_file(probe)
        except ConfigError:
            raise
        except OSError as exc:
            raise ConfigError(f"--storage-path {self.uri}: unreachable or refused ({first_line(exc)})") from None

    # Small files of the sweep's own (state, timings, summary), read and written whole.
    def read_bytes(self, name: str) -> bytes | None:
        if not self.remote:
            path = Path(self.path) / name
            return path.read_bytes() if path.is_file() else None
        fs = self.filesystem()
        try:
            with fs.open_input_stream(f"{self.path}/{name}") as src:
                return src.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, name: str, data: bytes) -> None:
        if not self.remote:
            from lasegseg.fsio import atomic_write

            atomic_write(Path(self.path) / name, data)
            return
        with self.filesystem().open_output_stream(f"{self.path}/{name}") as out:
            out.write(data)

    def upload(self, local: Path, name: str) -> None:
        """Copy a local file or folder to ``<root>/<name>`` (object stores only; a local root is written in place)."""
        if not self.remote:
            return
        from pyarrow import fs as pafs

        pafs.copy_files(str(local), f"{self.path}/{name}", source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.filesystem())  # fmt: skip


def parse_storage(text: str) -> Storage:
    """``--storage-path``: a local folder (made absolute), ``s3://bucket/prefix`` or ``gs://bucket/prefix``.

    Any other URI scheme, or an object-store URI without a bucket, is refused with one line.
    """
    parsed = urlparse(text)
    if len(parsed.scheme) > 1 or "://" in text:  # one letter is a Windows drive, not a scheme
        scheme = parsed.scheme.lower()
        if scheme == "file":
            return parse_storage(parsed.path)
        if scheme not in OBJECT_SCHEMES:
            raise ConfigError(f"--storage-path {text}: unsupported scheme '{scheme}://' (use a folder, s3:// or gs://)")
        if not parsed.netloc:
            raise ConfigError(f"--storage-path {text}: no bucket named (expected {scheme}://BUCKET/PREFIX)")
        path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        return Storage(f"{scheme}://{path}", scheme, path)
    local = str(Path(text).expanduser().resolve())
    return Storage(local, "", local)
