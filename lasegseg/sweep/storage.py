"""Where a sweep keeps what must outlive its processes: a local folder, ``s3://…`` or ``gs://…``, via pyarrow.

Tune's experiment state and trial checkpoints, and the sweep's own state, timings and summary, go to one storage
root that every node reaches. Each scheme is one entry of :data:`SCHEMES`, which builds the pyarrow filesystem Tune
and the sweep write through: S3 through boto3 (:class:`~lasegseg.sweep.object_store.S3Handler`), GCS through
pyarrow's own client, which retries for the same time (see :mod:`lasegseg.sweep.object_store`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pyarrow import fs as pafs

from lasegseg.environ import scoped_environ
from lasegseg.errors import ConfigError, first_line
from lasegseg.fsio import atomic_write
from lasegseg.registry import Registry
from lasegseg.sweep.object_store import RETRY_ENV, S3Handler, retry_seconds, s3_endpoint

LOCAL = "local"
# URI scheme → the pyarrow filesystem of a root of that scheme (None: the local disk, which Tune writes itself).
SCHEMES: Registry[Callable[[], Any]] = Registry("storage scheme", "schemes", ConfigError)


@SCHEMES.register(LOCAL)
def _local_filesystem() -> None:
    return None


@SCHEMES.register("s3")
def _s3_filesystem() -> pafs.FileSystem:
    """S3 through boto3, retrying transient faults (see :class:`~lasegseg.sweep.object_store.S3Handler`)."""
    return pafs.PyFileSystem(S3Handler(s3_endpoint()))


@SCHEMES.register("gs")
def _gcs_filesystem() -> pafs.FileSystem:
    """GCS through pyarrow's own client, which retries transient faults for as long as its ``retry_time_limit``."""
    return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=retry_seconds()))


def object_schemes() -> list[str]:
    """The URI schemes of object stores (every registered scheme but :data:`LOCAL`), sorted."""
    return [name for name in SCHEMES.names() if name != LOCAL]


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
        return SCHEMES.get(self.scheme or LOCAL)()

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
        bucket = self.path.split("/", 1)[0]
        fs = self.filesystem()
        probe = f"{self.path.rstrip('/')}/.lasegseg-write-check"
        try:
            with scoped_environ({RETRY_ENV: "8"}):  # a start-up check: a few seconds, not the run's patience
                if fs.get_file_info(bucket).type != pafs.FileType.Directory:
                    raise ConfigError(f"--storage-path {self.uri}: bucket '{bucket}' does not exist")
                with fs.open_output_stream(probe) as out:
                    out.write(b"ok")
                fs.delete_file(probe)
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - botocore and pyarrow raise many types for a refused request
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
            atomic_write(Path(self.path) / name, data)
            return
        with self.filesystem().open_output_stream(f"{self.path}/{name}") as out:
            out.write(data)


def parse_storage(text: str) -> Storage:
    """``--storage-path``: a local folder (made absolute), ``s3://bucket/prefix`` or ``gs://bucket/prefix``.

    Any other URI scheme, or an object-store URI without a bucket, is refused with one line.
    """
    parsed = urlparse(text)
    if len(parsed.scheme) > 1 or "://" in text:  # one letter is a Windows drive, not a scheme
        scheme = parsed.scheme.lower()
        if scheme == "file":
            return parse_storage(parsed.path)
        if scheme == LOCAL or scheme not in SCHEMES:
            shown = " or ".join(f"{s}://" for s in object_schemes())
            raise ConfigError(f"--storage-path {text}: unsupported scheme '{scheme}://' (use a folder, {shown})")
        if not parsed.netloc:
            raise ConfigError(f"--storage-path {text}: no bucket named (expected {scheme}://BUCKET/PREFIX)")
        path = f"{parsed.netloc}/{parsed.path.strip('/')}".rstrip("/")
        return Storage(f"{scheme}://{path}", scheme, path)
    local = str(Path(text).expanduser().resolve())
    return Storage(local, "", local)
