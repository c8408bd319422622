"""Which dataset content and which preprocessing → which slice-cache key.

A dataset is fingerprinted by the sha256 of its files (or of in-memory arrays), independent of where its folder
lives. ``<cache_dir>/file_hashes.json`` remembers the sha256 of every dataset file keyed by (path, size, mtime_ns),
so the second run fingerprints a dataset from ``stat`` calls alone. :func:`cache_key` combines the fingerprint,
the :class:`~lasegseg.data.preprocess.Preprocessing`, the layout and :data:`CACHE_VERSION` into a folder name.
Only numpy is imported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lasegseg.data.preprocess import Preprocessing
from lasegseg.data.types import LoadedCase
from lasegseg.errors import DataError
from lasegseg.fsio import atomic_write, plain_file_mode, sha256_file
from lasegseg.paths import cache_root

logger = logging.getLogger(__name__)

# The slice cache's format version: part of every key, so a format change never reuses an old cache.
CACHE_VERSION = 1
FILE_HASHES_FILE = "file_hashes.json"


def dataset_fingerprint(
    cases_or_paths: Iterable[Any], layout: str = "", *, cache_dir: str | os.PathLike | None = None
) -> str:
    """A sha256 of the dataset's content, independent of where the dataset folder lives.

    Args:
        cases_or_paths: :class:`~lasegseg.data.types.Case` objects (or anything with ``case_id``, ``image_path``
            and ``label_path``), plain file paths (named relative to their common folder), or in-memory
            :class:`LoadedCase` objects without paths (their arrays are hashed).
        layout: the dataset layout; part of the fingerprint because it decides how labels are read.
        cache_dir: folder of ``file_hashes.json``, the per-file digest cache (default
            :func:`lasegseg.paths.cache_root`).

    Returns:
        64 hex characters. File bytes are hashed in chunks; a file whose (path, size, mtime_ns) matches the digest
        cache is not read again.
    """
    digests = _FileDigests(cache_root(cache_dir) / FILE_HASHES_FILE)
    entries: dict[str, str] = {}
    paths: list[Path] = []

    def add(name: str, digest: str) -> None:
        if name in entries:
            raise DataError(f"dataset lists '{name}' twice (duplicate case id?)")
        entries[name] = digest

    for item in cases_or_paths:
        if isinstance(item, (str, os.PathLike)):
            paths.append(Path(item))
        elif getattr(item, "image_path", None) is not None and getattr(item, "label_path", None) is not None:
            add(f"{item.case_id}/image", digests.digest(Path(item.image_path)))
            add(f"{item.case_id}/label", digests.digest(Path(item.label_path)))
            if getattr(item, "layout", None):
                add(f"{item.case_id}/layout", str(item.layout))
        elif isinstance(item, LoadedCase):
            add(f"{item.case_id}/arrays", _arrays_digest(item))
        else:
            raise TypeError(f"cannot fingerprint {type(item).__name__}; pass Case, LoadedCase or a path")
    if paths:
        root = os.path.commonpath([str(p.absolute().parent) for p in paths])
        for p in paths:
            add(Path(os.path.relpath(p.absolute(), root)).as_posix(), digests.digest(p))
    digests.save()
    payload = json.dumps({"layout": layout, "files": sorted(entries.items())}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_key(fingerprint: str, preprocessing: Preprocessing, layout: str) -> str:
    """The cache folder name for a dataset fingerprint and preprocessing parameters.

    Args:
        fingerprint: from :func:`dataset_fingerprint`.
        preprocessing: slice size and intensity percentiles.
        layout: the dataset layout as configured.

    Returns:
        24 hex characters; :data:`CACHE_VERSION` is part of it, so a format change never reuses an old cache.
    """
    payload = {
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        **preprocessing.as_dict(),
        "layout": str(layout),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def dataset_files(root: str | os.PathLike, layout: str = "") -> list[Path]:
    """Every regular, non-hidden file under ``root``, sorted: the conservative content listing for fingerprints.

    Args:
        root: dataset folder.
        layout: unused; present so this fits the ``list_cases(root, layout)`` injection point.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"dataset folder '{root}' does not exist")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if not f.startswith("."))
    return out


def _arrays_digest(case: LoadedCase) -> str:
    h = hashlib.sha256()
    for arr in (np.asarray(case.image, np.float32), np.asarray(case.label, bool), np.asarray(case.affine, float)):
        h.update(f"{arr.dtype.str}{arr.shape}".encode())
        h.update(np.ascontiguousarray(arr).data)
    return h.hexdigest()


class _FileDigests:
    """sha256 per file remembered by (absolute path, size, mtime_ns) in a small JSON file.

    A rewrite that keeps both size and mtime_ns is not noticed; that is the usual make/rsync trade-off for not
    rereading gigabytes of NIfTI on every run.

    Args:
        json_path: the digest file (``<cache_dir>/file_hashes.json``).
    """

    def __init__(self, json_path: Path):
        self.json_path = json_path
        self.dirty = False
        self.entries: dict[str, dict[str, Any]] = {}
        try:
            data = json.loads(json_path.read_text())
            if data.get("version") == 1 and isinstance(data.get("files"), dict):
                self.entries = data["files"]
        except (OSError, ValueError, AttributeError):
            pass  # a missing or damaged digest cache only costs rehashing

    def digest(self, path: Path) -> str:
        name = str(path.absolute())
        try:
            st = os.stat(path)
        except OSError as err:
            raise DataError(f"dataset file '{path}' cannot be read: {err.strerror}") from None
        hit = self.entries.get(name)
        if hit and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
            return hit["sha256"]
        try:
            digest = sha256_file(path)
        except OSError as err:
            raise DataError(f"dataset file '{path}' cannot be read: {err.strerror}") from None
        self.entries[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        self.dirty = True
        return digest

    def save(self) -> None:
        if not self.dirty:
            return
        files = {k: v for k, v in self.entries.items() if os.path.exists(k)}
        try:
            # Concurrent runs each replace the whole file; the loser's new digests are merely recomputed later.
            atomic_write(self.json_path, json.dumps({"version": 1, "files": files}), mode=plain_file_mode())
        except OSError as err:
            logger.warning("could not save dataset file digests to %s: %s", self.json_path, err)
        self.dirty = False
