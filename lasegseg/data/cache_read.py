"""Reading a slice cache: a read-only, memory-mapped :class:`SliceCache`, checked against its manifest on opening.

The files are those of :mod:`lasegseg.data.cache_format`. Only numpy and pyarrow are imported: a cache is meant to
be opened by many light processes that share the page cache instead of copying slices per trial, and opening one
never needs nibabel or pynrrd. A damaged cache (a missing, truncated or altered file, a foreign manifest) is a
:class:`~lasegseg.errors.DataError` naming the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from lasegseg.data.cache_format import CASES_FILE, CASES_SCHEMA, MANIFEST_FILE, SLICES_FILE, slices_schema
from lasegseg.data.fingerprint import CACHE_VERSION
from lasegseg.errors import DataError
from lasegseg.fsio import sha256_file


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
        _check_table(path / SLICES_FILE, slices, slices_schema(image_size), files[SLICES_FILE]["rows"])
        _check_table(path / CASES_FILE, cases, CASES_SCHEMA, files[CASES_FILE]["rows"])
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
