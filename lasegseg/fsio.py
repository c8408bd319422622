"""Durable-file helpers shared by the slice cache, the feature cache and checkpoints.

Content hashes, fsync of files and folders, discarding a damaged folder without readers ever seeing it
half-deleted, and telling whether the process that left a temporary folder is still alive.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

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
    """Whether a process with this id exists on this machine (another user's counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
