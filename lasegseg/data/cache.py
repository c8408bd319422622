"""One memory-mapped Arrow slice cache per (dataset content, preprocessing parameters).

Layout of ``<cache_dir>/<key>/``::

    slices.arrow   one record batch, one row per axial slice (case order, then slice order):
                   case_id string, case_index int32, slice_index int32,
                   image fixed_size_list<float16>[S*S], label fixed_size_binary[S*S] (uint8 0/1), has_fg bool
    cases.arrow    one row per case: case_id, case_index, first_row, num_slices, native_shape int32[3],
                   spacing float64[3], affine float64[16] (canonical, row-major),
                   native_label large_binary (np.packbits of the C-ordered bool (X, Y, Z) label)
    manifest.json  version, key, params, case list, row count, and bytes + sha256 of both arrow files

``<cache_dir>/file_hashes.json`` remembers the sha256 of every dataset file keyed by (path, size, mtime_ns), so
the second run fingerprints a dataset from ``stat`` calls alone. Caches are written into a temporary folder and
renamed into place, so readers see a whole cache or none. Only numpy and pyarrow are imported: the cache is meant
to be opened by many light processes that share the page cache instead of copying slices per trial.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from lasegseg.data.preprocess import preprocess_case
from lasegseg.data.types import LoadedCase
from lasegseg.errors import DataError
from lasegseg.fsio import discard_dir, fsync_dir, fsync_file, sha256_file

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
SLICES_FILE = "slices.arrow"
CASES_FILE = "cases.arrow"
MANIFEST_FILE = "manifest.json"
FILE_HASHES_FILE = "file_hashes.json"
_STALE_SECONDS = 24 * 3600

ListCases = Callable[[Path, str], Sequence[Any]]
LoadCases = Callable[[Path, str], Iterable[LoadedCase]]


def default_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given (non-empty), else ``$LASEGSEG_CACHE``, else ``~/.cache/lasegseg``.

    Args:
        cache_dir: an explicit folder; ``None`` or ``""`` (the config default) falls through.
    """
    if cache_dir:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LASEGSEG_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lasegseg"


# ---------------------------------------------------------------------------------------------------------------
# Fingerprint and key


def dataset_fingerprint(
    cases_or_paths: Iterable[Any], layout: str = "", *, cache_dir: str | os.PathLike | None = None
) -> str:
    """A sha256 of the dataset's content, independent of where the dataset folder lives.

    Args:
        cases_or_paths: :class:`~lasegseg.data.types.Case` objects (or anything with ``case_id``, ``image_path``
            and ``label_path``), plain file paths (named relative to their common folder), or in-memory
            :class:`LoadedCase` objects without paths (their arrays are hashed).
        layout: the dataset layout; part of the fingerprint because it decides how labels are read.
        cache_dir: folder of ``file_hashes.json``, the per-file digest cache (default :func:`default_cache_dir`).

    Returns:
        64 hex characters. File bytes are hashed in chunks; a file whose (path, size, mtime_ns) matches the digest
        cache is not read again.
    """
    digests = _FileDigests(default_cache_dir(cache_dir) / FILE_HASHES_FILE)
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


def cache_key(fingerprint: str, image_size: int, clip_low: float, clip_high: float, layout: str) -> str:
    """The cache folder name for a dataset fingerprint and preprocessing parameters.

    Args:
        fingerprint: from :func:`dataset_fingerprint`.
        image_size, clip_low, clip_high: preprocessing parameters (``data.*`` config keys).
        layout: the dataset layout as configured.

    Returns:
        24 hex characters; :data:`CACHE_VERSION` is part of it, so a format change never reuses an old cache.
    """
    payload = {
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "image_size": int(image_size),
        "clip_low": float(clip_low),
        "clip_high": float(clip_high),
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
            self.json_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.json_path.with_name(f".{self.json_path.name}.{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps({"version": 1, "files": files}))
            # Concurrent runs each replace the whole file; the loser's new digests are merely recomputed later.
            os.replace(tmp, self.json_path)
        except OSError as err:
            logger.warning("could not save dataset file digests to %s: %s", self.json_path, err)
        self.dirty = False


# ---------------------------------------------------------------------------------------------------------------
# Building


def _slices_schema(image_size: int) -> pa.Schema:
    s2 = image_size * image_size
    return pa.schema(
        [
            pa.field("case_id", pa.string(), nullable=False),
            pa.field("case_index", pa.int32(), nullable=False),
            pa.field("slice_index", pa.int32(), nullable=False),
            pa.field("image", pa.list_(pa.field("item", pa.float16(), nullable=False), s2), nullable=False),
            pa.field("label", pa.binary(s2), nullable=False),
            pa.field("has_fg", pa.bool_(), nullable=False),
        ]
    )


_CASES_SCHEMA = pa.schema(
    [
        pa.field("case_id", pa.string(), nullable=False),
        pa.field("case_index", pa.int32(), nullable=False),
        pa.field("first_row", pa.int64(), nullable=False),
        pa.field("num_slices", pa.int32(), nullable=False),
        pa.field("native_shape", pa.list_(pa.int32(), 3), nullable=False),
        pa.field("spacing", pa.list_(pa.float64(), 3), nullable=False),
        pa.field("affine", pa.list_(pa.float64(), 16), nullable=False),
        pa.field("native_label", pa.large_binary(), nullable=False),
    ]
)


def build_cache(
    cases: Iterable[LoadedCase] | Callable[[], Iterable[LoadedCase]],
    cache_dir: str | os.PathLike,
    key: str,
    image_size: int,
    clip_low: float = 0.5,
    clip_high: float = 99.5,
    *,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Preprocess cases into ``<cache_dir>/<key>/`` (see the module docstring for the files).

    Cases are consumed one at a time (peak memory is about one case); slices are spilled to raw files and then
    written as a single record batch so that every column is one contiguous, memory-mappable buffer. The cache is
    assembled in a temporary folder and renamed into place; if another builder got there first, its cache is kept
    and this one discarded.

    Args:
        cases: the cases, or a callable returning them (called once).
        cache_dir: parent folder of all caches.
        key: the cache folder name, usually :func:`cache_key`.
        image_size: square in-plane size of the cached slices.
        clip_low, clip_high: intensity percentiles mapped to 0 and 1.
        meta: extra JSON-serialisable parameters recorded in the manifest (fingerprint, layout, data root …).

    Returns:
        The final cache folder.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _sweep_stale(cache_dir)
    final = cache_dir / key
    tmp = cache_dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        names, rows = _write_arrow_files(tmp, cases() if callable(cases) else cases, image_size, clip_low, clip_high)
        manifest = {
            "version": CACHE_VERSION,
            "key": key,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            # The preprocessing parameters win over same-named meta entries: open() trusts params["image_size"].
            "params": dict(meta or {})
            | {"image_size": int(image_size), "clip_low": float(clip_low), "clip_high": float(clip_high)},
            "cases": names,
            "rows": rows,
            "files": {
                SLICES_FILE: _file_record(tmp / SLICES_FILE, rows),
                CASES_FILE: _file_record(tmp / CASES_FILE, len(names)),
            },
        }
        _write_durable(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST_FILE).exists():
                raise
            logger.info("slice cache %s was built concurrently; keeping that one", final)
        else:
            fsync_dir(cache_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_arrow_files(
    folder: Path, cases: Iterable[LoadedCase], image_size: int, clip_low: float, clip_high: float
) -> tuple[list[str], int]:
    """Write ``cases.arrow`` case by case and ``slices.arrow`` from raw spill files; returns (case ids, rows)."""
    image_spill, label_spill = folder / "images.spill", folder / "labels.spill"
    names: list[str] = []
    codes: list[np.ndarray] = []
    slice_idx: list[np.ndarray] = []
    fg: list[np.ndarray] = []
    rows = 0
    with (
        open(image_spill, "wb") as fimg,
        open(label_spill, "wb") as flbl,
        ipc.new_file(str(folder / CASES_FILE), _CASES_SCHEMA) as cases_writer,
    ):
        for case in cases:
            _check_case(case, names)
            images, labels = preprocess_case(case, image_size, clip_low, clip_high)
            z = images.shape[0]
            fimg.write(np.ascontiguousarray(images).data)
            flbl.write(np.ascontiguousarray(labels).data)
            codes.append(np.full(z, len(names), np.int32))
            slice_idx.append(np.arange(z, dtype=np.int32))
            fg.append(labels.reshape(z, -1).any(axis=1))
            cases_writer.write_batch(_case_batch(case, len(names), rows, z))
            names.append(str(case.case_id))
            rows += z
    if not names:
        raise DataError("no cases to cache: the dataset is empty")
    s2 = image_size * image_size
    code_arr = np.concatenate(codes)
    with pa.memory_map(str(image_spill)) as img_map, pa.memory_map(str(label_spill)) as lbl_map:
        # Zero-copy buffers over the spill files: the IPC writer streams them to disk without a heap copy.
        image_values = pa.Array.from_buffers(pa.float16(), rows * s2, [None, img_map.read_buffer()])
        columns = [
            pa.array(np.asarray(names, dtype=object)[code_arr], pa.string()),
            pa.array(code_arr, pa.int32()),
            pa.array(np.concatenate(slice_idx), pa.int32()),
            pa.FixedSizeListArray.from_arrays(image_values, type=_slices_schema(image_size).field("image").type),
            pa.Array.from_buffers(pa.binary(s2), rows, [None, lbl_map.read_buffer()]),
            pa.array(np.concatenate(fg), pa.bool_()),
        ]
        batch = pa.record_batch(columns, schema=_slices_schema(image_size))
        # The float16 child array holds N*S*S values, past 2**31 for a few thousand 448² slices.
        options = ipc.IpcWriteOptions(allow_64bit=True)
        with ipc.new_file(str(folder / SLICES_FILE), batch.schema, options=options) as writer:
            writer.write_batch(batch)
        del batch, columns, image_values
    image_spill.unlink()
    label_spill.unlink()
    return names, rows


def _check_case(case: LoadedCase, seen: list[str]) -> None:
    where = f"case '{case.case_id}'" + (f" ({case.image_path})" if case.image_path else "")
    image, label = np.asarray(case.image), np.asarray(case.label)
    if image.ndim != 3 or image.shape != label.shape:
        raise DataError(f"{where}: image {image.shape} and label {label.shape} must be the same 3D shape")
    if min(image.shape) < 1:
        raise DataError(f"{where}: empty volume {image.shape}")
    if np.shape(case.affine) != (4, 4) or len(case.spacing) != 3:
        raise DataError(f"{where}: affine must be 4x4 and spacing 3 values")
    if str(case.case_id) in seen:
        raise DataError(f"{where}: duplicate case id")


def _case_batch(case: LoadedCase, index: int, first_row: int, num_slices: int) -> pa.RecordBatch:
    label = np.asarray(case.label, dtype=bool)
    columns = [
        pa.array([str(case.case_id)], pa.string()),
        pa.array([index], pa.int32()),
        pa.array([first_row], pa.int64()),
        pa.array([num_slices], pa.int32()),
        pa.array([list(label.shape)], _CASES_SCHEMA.field("native_shape").type),
        pa.array([[float(s) for s in case.spacing]], _CASES_SCHEMA.field("spacing").type),
        pa.array([np.asarray(case.affine, np.float64).ravel().tolist()], _CASES_SCHEMA.field("affine").type),
        pa.array([np.packbits(label.ravel()).tobytes()], pa.large_binary()),
    ]
    return pa.record_batch(columns, schema=_CASES_SCHEMA)


def _file_record(path: Path, rows: int) -> dict[str, Any]:
    fsync_file(path)
    return {"rows": rows, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _write_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sweep_stale(cache_dir: Path) -> None:
    """Delete temporary folders that crashed builders left behind more than a day ago."""
    now = time.time()
    for entry in cache_dir.glob(".t*-*"):
        if entry.name.startswith((".tmp-", ".trash-")) and entry.is_dir():
            try:
                if now - entry.stat().st_mtime > _STALE_SECONDS:
                    shutil.rmtree(entry, ignore_errors=True)
            except OSError:
                pass


# ---------------------------------------------------------------------------------------------------------------
# Reading


class SliceCache:
    """A read-only, memory-mapped view of one slice cache.

    Every large array is a zero-copy, read-only numpy view onto the memory-mapped ``slices.arrow``: processes that
    open the same cache share one copy in the page cache. Pickling reopens by path (with ``verify="size"``), so a
    cache can be handed to worker processes without copying its arrays.

    Args:
        path: the cache folder.
        manifest: its parsed ``manifest.json``.
        slices: the single record batch of ``slices.arrow``.
        cases: the table of ``cases.arrow``.

    Attributes:
        images: float16 ``(N, S, S)`` in ``[0, 1]``.
        labels: uint8 ``(N, S, S)`` in ``{0, 1}``.
        case_codes: int32 ``(N,)`` index into :attr:`case_names`.
        slice_index: int32 ``(N,)`` axial index ``k`` of each slice within its case.
        has_fg: bool ``(N,)``, whether the slice contains any left atrium (a small copy: Arrow packs bools).
        case_names: case ids in cache order.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], slices: pa.RecordBatch, cases: pa.Table):
        self.path = Path(path)
        self.manifest = manifest
        self._slices = slices
        self.image_size = int(manifest["params"]["image_size"])
        s = self.image_size
        n = slices.num_rows
        self.images = _view(slices.column("image").flatten(), np.float16).reshape(n, s, s)
        self.labels = _view(slices.column("label"), np.uint8, s * s).reshape(n, s, s)
        self.case_codes = _view(slices.column("case_index"), np.int32)
        self.slice_index = _view(slices.column("slice_index"), np.int32)
        self.has_fg = slices.column("has_fg").to_numpy(zero_copy_only=False)
        self.case_names: list[str] = cases.column("case_id").to_pylist()
        self._pos = {name: i for i, name in enumerate(self.case_names)}
        self._first_row = cases.column("first_row").to_pylist()
        self._num_slices = cases.column("num_slices").to_pylist()
        self._shape = [tuple(v) for v in cases.column("native_shape").to_pylist()]
        self._spacing = [tuple(v) for v in cases.column("spacing").to_pylist()]
        self._affine = cases.column("affine").to_pylist()
        self._native = cases.column("native_label")
        self._case_ids: np.ndarray | None = None

    @classmethod
    def open(cls, path: str | os.PathLike, *, verify: Literal["full", "size"] = "full") -> SliceCache:
        """Open and verify a cache folder; raises :class:`DataError` naming the damaged file.

        Args:
            path: the cache folder (``<cache_dir>/<key>``).
            verify: ``"full"`` rehashes both arrow files against the manifest (one sequential read, about a
                second per GB, so once per process is fine); ``"size"`` only checks sizes, schemas and row counts,
                which catches truncation but not a flipped byte — for workers opening a cache the driver already
                verified.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        files = manifest["files"]
        for name in (SLICES_FILE, CASES_FILE):
            _check_file(path / name, files[name], full=verify == "full")
        slices = _open_arrow(path / SLICES_FILE)
        cases = _open_arrow(path / CASES_FILE)
        image_size = int(manifest["params"]["image_size"])
        _check_table(path / SLICES_FILE, slices, _slices_schema(image_size), files[SLICES_FILE]["rows"])
        _check_table(path / CASES_FILE, cases, _CASES_SCHEMA, files[CASES_FILE]["rows"])
        if slices.num_record_batches != 1:
            raise DataError(f"cache file '{path / SLICES_FILE}' must hold one record batch")
        return cls(path, manifest, slices.get_batch(0), cases.read_all())

    @property
    def key(self) -> str:
        """The cache key (the folder name)."""
        return str(self.manifest["key"])

    @property
    def cases(self) -> list[str]:
        """Case ids in cache order."""
        return list(self.case_names)

    @property
    def case_ids(self) -> np.ndarray:
        """``(N,)`` case id string of every slice (built once from :attr:`case_codes`)."""
        if self._case_ids is None:
            self._case_ids = np.asarray(self.case_names)[self.case_codes]
        return self._case_ids

    def __len__(self) -> int:
        return len(self.case_codes)

    def __repr__(self) -> str:
        return (
            f"SliceCache({str(self.path)!r}, cases={len(self.case_names)}, slices={len(self)}, size={self.image_size})"
        )

    def __reduce__(self):
        return (_reopen, (str(self.path),))

    def rows_for(self, case_ids: Iterable[str] | str) -> np.ndarray:
        """Ascending int64 row indices of every slice of the given cases.

        Args:
            case_ids: case ids (a single id is accepted too); an id not in the cache is a :class:`DataError`.
        """
        ids = [case_ids] if isinstance(case_ids, str) else list(case_ids)
        positions = sorted({self._index(c) for c in ids})
        if not positions:
            return np.empty(0, np.int64)
        return np.concatenate(
            [np.arange(self._first_row[i], self._first_row[i] + self._num_slices[i], dtype=np.int64) for i in positions]
        )

    def native_label(self, case_id: str) -> np.ndarray:
        """The case's bool ``(X, Y, Z)`` label at native resolution, exactly as it was cached."""
        i = self._index(case_id)
        shape = self._shape[i]
        packed = np.frombuffer(self._native[i].as_buffer(), np.uint8)
        return np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).view(bool)

    def native_shape(self, case_id: str) -> tuple[int, int, int]:
        """Native ``(X, Y, Z)`` shape of a case."""
        return self._shape[self._index(case_id)]

    def spacing(self, case_id: str) -> tuple[float, float, float]:
        """Native voxel size in mm along ``(X, Y, Z)``."""
        return self._spacing[self._index(case_id)]

    def affine(self, case_id: str) -> np.ndarray:
        """The canonical 4x4 voxel → world matrix of a case."""
        return np.asarray(self._affine[self._index(case_id)], np.float64).reshape(4, 4)

    def _index(self, case_id: str) -> int:
        try:
            return self._pos[case_id]
        except KeyError:
            raise DataError(f"case '{case_id}' is not in slice cache {self.path}") from None


def _reopen(path: str) -> SliceCache:
    return SliceCache.open(path, verify="size")


def _view(arr: pa.Array, dtype: type, width: int = 1) -> np.ndarray:
    """Zero-copy numpy view of a primitive or fixed-size-binary Arrow array without nulls."""
    itemsize = np.dtype(dtype).itemsize * width
    return np.frombuffer(arr.buffers()[1], dtype, count=len(arr) * width, offset=arr.offset * itemsize)


def _read_manifest(path: Path) -> dict[str, Any]:
    mpath = path / MANIFEST_FILE
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        for name in (SLICES_FILE, CASES_FILE):
            int(files[name]["bytes"]), int(files[name]["rows"]), str(files[name]["sha256"])
        int(manifest["params"]["image_size"])
    except OSError as err:
        raise DataError(f"cache manifest '{mpath}' cannot be read: {err.strerror}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"cache manifest '{mpath}' is damaged ({type(err).__name__}: {err})") from None
    if manifest.get("version") != CACHE_VERSION:
        raise DataError(f"cache manifest '{mpath}' has version {manifest.get('version')}, expected {CACHE_VERSION}")
    if manifest.get("key") != path.name:
        raise DataError(f"cache manifest '{mpath}' is for key {manifest.get('key')!r}, not {path.name!r}")
    return manifest


def _check_file(path: Path, record: dict[str, Any], *, full: bool) -> None:
    try:
        size = path.stat().st_size
    except OSError:
        raise DataError(f"cache file '{path}' is missing") from None
    if size != record["bytes"]:
        raise DataError(f"cache file '{path}' is truncated or altered: {size} bytes, manifest says {record['bytes']}")
    if full and sha256_file(path) != record["sha256"]:
        raise DataError(f"cache file '{path}' is corrupt: its sha256 does not match the manifest")


def _open_arrow(path: Path) -> ipc.RecordBatchFileReader:
    try:
        return ipc.open_file(pa.memory_map(str(path)))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"cache file '{path}' is not a readable Arrow file: {err}") from None


def _check_table(path: Path, reader: ipc.RecordBatchFileReader, schema: pa.Schema, rows: int) -> None:
    if not reader.schema.equals(schema):
        raise DataError(f"cache file '{path}' has an unexpected schema")
    try:
        n = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    except (pa.ArrowException, OSError) as err:
        raise DataError(f"cache file '{path}' is not a readable Arrow file: {err}") from None
    if n != rows:
        raise DataError(f"cache file '{path}' has {n} rows, manifest says {rows}")


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def get_or_build_cache(
    data_root: str | os.PathLike,
    layout: str = "auto",
    image_size: int = 448,
    clip_low: float = 0.5,
    clip_high: float = 99.5,
    cache_dir: str | os.PathLike | None = None,
    *,
    load_cases: LoadCases | None = None,
    list_cases: ListCases | None = None,
    verify: Literal["full", "size"] = "full",
) -> SliceCache:
    """Open the cache for this dataset content and these parameters, building it on first use.

    The dataset is fingerprinted from its files (digests remembered by size and mtime, so a second run only
    ``stat``s them); a valid cache with that key is opened without reading any volume. A cache that fails
    verification is logged, discarded and rebuilt.

    Args:
        data_root: dataset folder.
        layout: dataset layout (``data.layout``).
        image_size, clip_low, clip_high: preprocessing parameters (``data.*`` config keys).
        cache_dir: parent folder of the caches (default :func:`default_cache_dir`).
        load_cases: ``load_cases(root, layout) -> Iterable[LoadedCase]``, called only when building (default
            :func:`load_cases_streaming`, over :func:`lasegseg.data.layouts.load_case`).
        list_cases: ``list_cases(root, layout)`` → the cases (with ``image_path``/``label_path``) or files whose
            bytes define the dataset; cheap, called every time (default :func:`lasegseg.data.layouts.list_cases`,
            which reads no volume).
        verify: how an existing cache is checked (see :meth:`SliceCache.open`); trials started by a sweep whose
            driver already opened the cache can pass ``"size"`` to skip rehashing gigabytes.
    """
    root = Path(data_root)
    cache_dir = default_cache_dir(cache_dir)
    list_cases, load_cases = _default_readers(list_cases, load_cases)
    fingerprint = dataset_fingerprint(list_cases(root, layout), layout, cache_dir=cache_dir)
    key = cache_key(fingerprint, image_size, clip_low, clip_high, layout)
    path = cache_dir / key
    if path.exists():
        try:
            return SliceCache.open(path, verify=verify)
        except DataError as err:
            logger.warning("rebuilding slice cache: %s", err)
            discard_dir(path)
    meta = {"layout": layout, "fingerprint": fingerprint, "data_root": str(root.absolute())}
    built = build_cache(lambda: load_cases(root, layout), cache_dir, key, image_size, clip_low, clip_high, meta=meta)
    # Just written and hashed by build_cache (or by a concurrent builder), so a size check is enough here.
    return SliceCache.open(built, verify="size")


def _default_readers(list_cases: ListCases | None, load_cases: LoadCases | None) -> tuple[ListCases, LoadCases]:
    """Fill in :func:`lasegseg.data.layouts.list_cases` and :func:`load_cases_streaming`.

    Imported here rather than at the top so that opening a cache never needs nibabel or pynrrd.
    """
    if list_cases is None:
        from lasegseg.data.layouts import list_cases
    return list_cases, load_cases or load_cases_streaming


def load_cases_streaming(root: str | os.PathLike, layout: str = "auto") -> Iterator[LoadedCase]:
    """Yield the dataset's cases one at a time (memory holds one case), then report every bad file at once.

    Unlike :func:`lasegseg.data.validate.load_dataset`, which holds all volumes, this suits building a cache.
    A bad case is skipped while the rest are still checked; the generator then raises one :class:`DataError`
    listing them all, which aborts the cache build.

    Args:
        root: dataset folder.
        layout: ``auto`` (detect) or a layout name.
    """
    from lasegseg.data.layouts import format_problems, list_cases, load_case

    problems = []
    for case in list_cases(root, layout):
        try:
            loaded = load_case(case)
        except DataError as err:
            problems.append(str(err))
        else:
            if not problems:
                yield loaded
    if problems:
        raise DataError(format_problems(Path(root), problems))
