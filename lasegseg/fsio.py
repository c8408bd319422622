"""Durable-file helpers shared by the caches, checkpoints, exports and every file the project writes.

Atomic writes of files (temp file + rename) and folders (temp folder + two renames, recoverable), content hashes,
fsync of files and folders, discarding a damaged folder without readers ever seeing it half-deleted, and telling
whether the process that left a temporary folder is still alive; publishing a write-once folder (first writer wins).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

_CHUNK = 8 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in large chunks into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a written file to disk: without it a power cut after a rename could expose pages never written."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the file system supports it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # not every file system supports fsync on a folder
    finally:
        os.close(fd)


def discard_dir(path: Path) -> None:
    """Move a folder aside (atomic, so readers never see it half-deleted), then delete it."""
    trash = path.with_name(f".trash-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, trash)
    except FileNotFoundError:
        return  # another process discarded it first
    shutil.rmtree(trash, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (another user's counts as alive; a zombie, killed but not
    yet reaped by its parent, does not: a SIGKILLed Ray worker stays one for a while, and its folders are orphans)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]  # the name in parentheses may hold spaces
    except (OSError, IndexError):
        return False  # no /proc (macOS): only a missing process counts as dead
    return state == "Z"


def atomic_write(
    path: str | os.PathLike,
    data: bytes | str | Callable[[Path], Any],
    *,
    durable: bool = False,
    mode: int | None = None,
    suffix: str = ".tmp",
    exclusive: bool = False,
) -> Path:
    """Write a file so that readers see the old content or the new, never a part: a temporary file beside ``path``
    is written, then renamed over it. On any error (a full disk, a serialiser that raises) nothing changes.

    Args:
        path: the file.
        data: its content (``str`` is written as UTF-8), or a function that writes the temporary path it is given
            (``lambda p: frame.to_parquet(p)``).
        durable: fsync the file before the rename, so it also survives a power cut.
        mode: permission bits set before the rename (e.g. ``0o600`` for a secret: never readable by others);
            ``None`` keeps the temporary file's private ``0o600``, :func:`plain_file_mode` gives what ``open()`` would.
        suffix: ending of the temporary file's name, for writers that pick a format by extension (``".nii.gz"``).
        exclusive: create ``path`` only if it does not exist yet: the first of several concurrent writers wins and
            the others leave its content in place (a hard link, which never overwrites, instead of a rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    tmp = Path(name)
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        if durable:
            fsync_file(tmp)
        if exclusive:
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
            tmp.unlink()
        else:
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def plain_file_mode() -> int:
    """The permission bits ``open()`` gives a new file: ``0o666`` less the process umask.

    For :func:`atomic_write` of files that others should read like any other file (volumes, a shared cache), since
    its temporary file starts private.
    """
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_json_atomic(path: str | os.PathLike, payload: Any, *, durable: bool = True) -> Path:
    """``payload`` as indented JSON via :func:`atomic_write` (numpy scalars and paths become plain values)."""
    return atomic_write(path, json.dumps(payload, indent=2, default=_json_default) + "\n", durable=durable)


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_figure(fig: Any, path: str | os.PathLike, *, dpi: int = 128, compress_level: int = 6) -> Path:
    """Save a matplotlib figure as PNG through :func:`atomic_write`.

    Args:
        fig: the figure.
        path: the PNG.
        dpi: pixels per inch.
        compress_level: zlib level of the PNG, 0–9 (6 is Pillow's default; 1 encodes several times faster).
    """
    return atomic_write(
        path,
        lambda tmp: fig.savefig(
            tmp, format="png", dpi=dpi, facecolor=fig.get_facecolor(), pil_kwargs={"compress_level": compress_level}
        ),
    )


def publish_dir(tmp: Path, final: Path, *, complete: Callable[[Path], bool]) -> bool:
    """Rename the finished folder ``tmp`` to ``final`` unless another writer got there first: the first writer wins.

    For write-once folders named by their content (a cache key, a model's name): concurrent builders each write a
    temporary sibling, and the one whose rename lands first is kept. A loser's rename fails (a folder is never
    renamed over a non-empty one) and, when ``final`` is a complete folder, its own copy is removed and the winner's
    kept; ``tmp`` is always gone afterwards.

    Args:
        tmp: the completed temporary folder, a sibling of ``final``.
        final: where it goes.
        complete: whether a folder already at ``final`` is whole (e.g. its manifest exists); when it is not, the
            rename's error is raised.

    Returns:
        True when this call published ``tmp``; False when another writer's folder was kept.
    """
    try:
        os.rename(tmp, final)
    except OSError:
        if not complete(Path(final)):
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


def atomic_dir(final: Path) -> Path:
    """A fresh temporary folder beside ``final``; pass it to :func:`commit_dir` once complete."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(final)
    _remove_orphans(final)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp{os.getpid()}-", dir=final.parent))


def _remove_orphans(final: Path) -> None:
    """Delete temporary folders of earlier writers of ``final`` that died before committing."""
    for tmp in final.parent.glob(f".{final.name}.tmp*-*"):
        pid = tmp.name[len(f".{final.name}.tmp") :].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _previous(final: Path) -> Path:
    return final.with_name(f".{final.name}.previous")


def commit_dir(tmp: Path, final: Path, *, durable: bool = True) -> None:
    """Replace ``final`` with the completed ``tmp`` so a reader never sees a half-written folder.

    A folder cannot be renamed over a non-empty one, so the old version is first moved aside to
    ``.<name>.previous``. A process killed between the two renames leaves no ``final`` but a complete
    ``.previous``, which :func:`recover_dir` (called by every reader and writer of such folders) puts back.

    Args:
        tmp: the completed folder.
        final: where it goes.
        durable: fsync the files and folders, so the commit also survives a power cut (off for scratch copies
            that another component persists, e.g. a trial's training state that Tune copies to its storage).
    """
    final = Path(final)
    if durable:
        for path in Path(tmp).iterdir():
            if path.is_file():
                fsync_file(path)
        fsync_dir(Path(tmp))
    previous = _previous(final)
    if final.exists():
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(tmp, final)
    if durable:
        fsync_dir(final.parent)
    shutil.rmtree(previous, ignore_errors=True)


def recover_dir(final: Path) -> Path:
    """Put back the last committed version of ``final`` if a commit was interrupted between its renames."""
    final = Path(final)
    previous = _previous(final)
    if not final.exists() and previous.is_dir():
        try:
            os.replace(previous, final)
        except OSError:
            return previous  # a read-only location: read the complete previous version where it is
    return final


def builder_stamp() -> dict[str, Any]:
    """Who wrote a cache (host and process), kept in its manifest as provenance."""
    return {"host": socket.gethostname(), "pid": os.getpid()}
