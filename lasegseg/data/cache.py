"""One memory-mapped Arrow slice cache per (dataset content, preprocessing parameters).

Layout of ``<cache_dir>/<key>/``::

    slices.arrow   one record batch, one row per axial slice (case order, then slice order):
                   case_id string, case_index int32, slice_index int32,
                   image fixed_size_list<float16>[S*S], label fixed_size_binary[S*S] (uint8 0/1), has_fg bool
    cases.arrow    one row per case: case_id, case_index, first_row, num_slices, native_shape int32[3],
                   spacing float64[3], affine float64[16] (canonical, row-major),
                   native_label large_binary (np.packbits of the C-ordered bool (X, Y, Z) label)
    manifest.json  version, key, params, case list, row count, and bytes + sha256 of both arrow files

The key comes from :mod:`lasegseg.data.fingerprint` (dataset content + preprocessing). Caches are written into a
temporary folder and renamed into place, so readers see a whole cache or none. Cases are read and preprocessed in
parallel by :func:`cache_workers` workers (``$LASEGSEG_CACHE_WORKERS``, else the usable cores; processes where
:func:`processes_are_safe`, else threads) and written in case order, so the files do not depend on the worker
count. Only numpy and pyarrow are imported: the cache is meant to be opened by many light processes that share the
page cache instead of copying slices per trial.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from lasegseg.data.fingerprint import CACHE_VERSION, cache_key, dataset_fingerprint
from lasegseg.data.preprocess import Preprocessing, preprocess_case
from lasegseg.data.types import Case, LoadedCase
from lasegseg.errors import ConfigError, DataError
from lasegseg.fsio import (
    atomic_write,
    builder_stamp,
    discard_dir,
    fsync_dir,
    fsync_file,
    plain_file_mode,
    sha256_file,
)
from lasegseg.paths import cache_root

if TYPE_CHECKING:
    from lasegseg.config import Config

logger = logging.getLogger(__name__)

SLICES_FILE = "slices.arrow"
CASES_FILE = "cases.arrow"
MANIFEST_FILE = "manifest.json"
_STALE_SECONDS = 24 * 3600
WORKERS_ENV = "LASEGSEG_CACHE_WORKERS"
# Cases submitted to the pool per worker, beyond the one each works on: keeps the workers busy while the parent
# writes, and bounds the preprocessed cases held in memory (about 55 MB each for 88 slices at 448 px).
_QUEUED_PER_WORKER = 1
# With the default worker count, a first case quicker than this is built inline with the rest (a small dataset is
# built before parallel reading would pay off).
_PARALLEL_AFTER_S = 0.5

ListCases = Callable[[Path, str], Sequence[Any]]
LoadCases = Callable[[Path, str], Iterable[LoadedCase | Case]]


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
    preprocessing: Preprocessing,
    *,
    meta: dict[str, Any] | None = None,
    workers: int | None = None,
) -> Path:
    """Preprocess cases into ``<cache_dir>/<key>/`` (see the module docstring for the files).

    Cases are read and preprocessed by ``workers`` workers (processes or threads) and written in case order, so the
    files are the same whatever the worker count. Memory holds one full-resolution case per worker and at most two
    preprocessed cases per worker waiting to be written (one case in all for a single worker). Slices are spilled to
    raw files and then written as a single record batch so that every column is one contiguous, memory-mappable
    buffer. The cache is assembled in a temporary folder and renamed into place; if another builder got there
    first, its cache is kept and this one discarded. A case that cannot be cached stops the writing, the remaining
    cases are still checked, and one :class:`DataError` names every bad case (its file where it has one).

    Args:
        cases: the cases, or a callable returning them (called once): :class:`LoadedCase` objects, or
            :class:`~lasegseg.data.types.Case` objects that the workers read with
            :func:`lasegseg.data.layouts.load_case` (so that reading runs in parallel too).
        cache_dir: parent folder of all caches.
        key: the cache folder name, usually :func:`~lasegseg.data.fingerprint.cache_key`.
        preprocessing: slice size and intensity percentiles; recorded in the manifest's ``params``.
        meta: extra JSON-serialisable parameters recorded in the manifest (fingerprint, layout, data root …).
        workers: worker processes or threads; 1 builds in the calling thread. By default (see
            :func:`cache_workers`) the first case is built in this process and, if it took long enough to be worth
            it, the rest in parallel.

    Returns:
        The final cache folder.
    """
    workers = _requested_workers(workers)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    _sweep_stale(cache_dir)
    final = cache_dir / key
    tmp = cache_dir / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        names, rows = _write_arrow_files(tmp, cases() if callable(cases) else cases, preprocessing, workers)
        manifest = {
            "version": CACHE_VERSION,
            "key": key,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "builder": builder_stamp(),
            # The preprocessing parameters win over same-named meta entries: open() trusts params["image_size"].
            "params": dict(meta or {}) | preprocessing.as_dict(),
            "cases": names,
            "rows": rows,
            "files": {
                SLICES_FILE: _file_record(tmp / SLICES_FILE, rows),
                CASES_FILE: _file_record(tmp / CASES_FILE, len(names)),
            },
        }
        atomic_write(tmp / MANIFEST_FILE, json.dumps(manifest, indent=1), durable=True, mode=plain_file_mode())
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


def cache_workers(workers: int | None = None) -> int:
    """How many workers build a slice cache: ``workers`` if given, else ``$LASEGSEG_CACHE_WORKERS``, else the
    cores this process may run on.

    With neither set, a build makes its first case in the calling process and starts this many workers for the
    rest only if that case took ``_PARALLEL_AFTER_S`` (0.5 s) or more. The workers are processes where that is
    safe and threads elsewhere (see :func:`processes_are_safe`).

    Args:
        workers: an explicit count (>= 1); 1 reads and preprocesses every case in the calling thread.

    Raises:
        ConfigError: ``workers`` or the environment variable is not a whole number >= 1 (the message names it).
    """
    return _requested_workers(workers) or _usable_cores()


def _requested_workers(workers: int | None) -> int | None:
    """The worker count asked for (keyword, else ``$LASEGSEG_CACHE_WORKERS``), validated; None when neither is set."""
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"cache workers must be a whole number >= 1, got {workers!r}")
        return workers
    text = os.environ.get(WORKERS_ENV, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{WORKERS_ENV} must be a whole number of workers >= 1, got '{text}'")
    return value


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass
class _Prepared:
    """One case as the cache stores it, made by :func:`_prepare_case` (in a worker thread or inline).

    ``images`` is None for a case that was only checked (the build had already failed).
    """

    case_id: str
    where: str
    images: np.ndarray | None = None
    labels: np.ndarray | None = None
    has_fg: np.ndarray | None = None
    native_shape: list[int] | None = None
    spacing: list[float] | None = None
    affine: list[float] | None = None
    native_label: bytes | None = None


def _write_arrow_files(
    folder: Path, cases: Iterable[LoadedCase | Case], preprocessing: Preprocessing, workers: int | None
) -> tuple[list[str], int]:
    """Write ``cases.arrow`` case by case and ``slices.arrow`` from raw spill files; returns (case ids, rows)."""
    image_spill, label_spill = folder / "images.spill", folder / "labels.spill"
    names: list[str] = []
    seen: set[str] = set()
    problems: list[str] = []
    codes: list[np.ndarray] = []
    slice_idx: list[np.ndarray] = []
    fg: list[np.ndarray] = []
    rows = 0
    with (
        open(image_spill, "wb") as fimg,
        open(label_spill, "wb") as flbl,
        ipc.new_file(str(folder / CASES_FILE), _CASES_SCHEMA) as cases_writer,
        # Closed on any error too, so the workers are done before the temporary folder goes.
        contextlib.closing(_prepared_cases(cases, preprocessing, workers, lambda: bool(problems))) as prepared,
    ):
        for prep in prepared:
            if isinstance(prep, str) or prep.case_id in seen:
                problems.append(prep if isinstance(prep, str) else f"{prep.where}: duplicate case id")
                continue
            seen.add(prep.case_id)
            if problems:
                continue  # the build has failed: the rest are only checked, so that every bad case is reported
            z = prep.images.shape[0]
            fimg.write(prep.images.data)
            flbl.write(prep.labels.data)
            codes.append(np.full(z, len(names), np.int32))
            slice_idx.append(np.arange(z, dtype=np.int32))
            fg.append(prep.has_fg)
            cases_writer.write_batch(_case_batch(prep, len(names), rows, z))
            names.append(prep.case_id)
            rows += z
    if problems:
        raise DataError(_problems_message(problems))
    if not names:
        raise DataError("no cases to cache: the dataset is empty")
    columns = (np.concatenate(codes), np.concatenate(slice_idx), np.concatenate(fg))
    _write_slices(folder, names, *columns, rows=rows, image_size=preprocessing.image_size)
    return names, rows


def _write_slices(
    folder: Path,
    names: list[str],
    code_arr: np.ndarray,
    slice_idx: np.ndarray,
    fg: np.ndarray,
    *,
    rows: int,
    image_size: int,
) -> None:
    """Write ``slices.arrow`` as one record batch over the spill files, then delete them."""
    image_spill, label_spill = folder / "images.spill", folder / "labels.spill"
    s2 = image_size * image_size
    with pa.memory_map(str(image_spill)) as img_map, pa.memory_map(str(label_spill)) as lbl_map:
        # Zero-copy buffers over the spill files: the IPC writer streams them to disk without a heap copy.
        image_values = pa.Array.from_buffers(pa.float16(), rows * s2, [None, img_map.read_buffer()])
        columns = [
            pa.array(np.asarray(names, dtype=object)[code_arr], pa.string()),
            pa.array(code_arr, pa.int32()),
            pa.array(slice_idx, pa.int32()),
            pa.FixedSizeListArray.from_arrays(image_values, type=_slices_schema(image_size).field("image").type),
            pa.Array.from_buffers(pa.binary(s2), rows, [None, lbl_map.read_buffer()]),
            pa.array(fg, pa.bool_()),
        ]
        batch = pa.record_batch(columns, schema=_slices_schema(image_size))
        # The float16 child array holds N*S*S values, past 2**31 for a few thousand 448² slices.
        options = ipc.IpcWriteOptions(allow_64bit=True)
        with ipc.new_file(str(folder / SLICES_FILE), batch.schema, options=options) as writer:
            writer.write_batch(batch)
        del batch, columns, image_values
    image_spill.unlink()
    label_spill.unlink()


def _problems_message(problems: list[str]) -> str:
    """One bad case: its own message; several: a count, then one indented line each (in case order)."""
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} cases cannot be cached\n" + "\n".join(f"  {p}" for p in problems)


def _prepared_cases(
    cases: Iterable[LoadedCase | Case],
    preprocessing: Preprocessing,
    workers: int | None,
    check_only: Callable[[], bool],
) -> Iterator[_Prepared | str]:
    """:func:`_prepare_case` of every case, in case order: inline for 1 worker, else in a thread pool.

    ``workers`` None (the default count): the first case is prepared inline and timed; the rest go to
    :func:`cache_workers` workers only if it took at least ``_PARALLEL_AFTER_S``. ``check_only()`` is asked as
    each case is handed out: once the build has failed, the rest are read and checked but not preprocessed.
    """
    cases = iter(cases)
    if workers is None:
        first = next(cases, None)
        if first is None:
            return
        t0 = time.perf_counter()
        prepared = _prepare_case(first, preprocessing, check_only())
        workers = _usable_cores() if time.perf_counter() - t0 >= _PARALLEL_AFTER_S else 1
        yield prepared
    if workers == 1:
        for case in cases:
            yield _prepare_case(case, preprocessing, check_only())
    else:
        yield from _prepared_in_pool(cases, preprocessing, workers, check_only)


def _prepared_in_pool(
    cases: Iterator[LoadedCase | Case], preprocessing: Preprocessing, workers: int, check_only: Callable[[], bool]
) -> Iterator[_Prepared | str]:
    """:func:`_prepared_cases` in ``workers`` processes (threads where processes are not safe, see
    :func:`processes_are_safe`); at most ``workers * (1 + _QUEUED_PER_WORKER)`` cases are in flight or waiting to be
    written, so memory stays bounded however many cases there are."""
    pool = _pool(workers)
    pending: deque[Future] = deque()
    try:
        for case in cases:
            pending.append(pool.submit(_prepare_case, case, preprocessing, check_only()))
            if len(pending) >= workers * (1 + _QUEUED_PER_WORKER):
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# Entry points whose code runs under `if __name__ == "__main__":` only, so a worker process may import them again.
_SAFE_MAIN_FILES = ("sweeps/fewshot.py", "bench/run.py", "bin/lasegseg")
_SAFE_MAIN_MODULES = ("lasegseg.cli",)


def processes_are_safe() -> bool:
    """Whether this process may start worker processes for a build.

    A ``spawn``/``forkserver`` worker runs the caller's main module again before it works. That is harmless for
    lasegseg's own entry points (``sweeps/fewshot.py``, the ``lasegseg`` command, ``python -m lasegseg.cli``,
    ``bench/run.py``) and
    for callers without a main file (``python -c``, a notebook, ``python -m pkg``'s ``__main__``), but a Ray
    worker's main (``default_worker.py``) or a user's script without the guard would run its top-level code again,
    so those builds use threads instead: ≈ 0.6–0.9× linear rather than ≈ 0.9× (24 full-size scans, 2 cores).
    """
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        return name in _SAFE_MAIN_MODULES or name == "__main__" or name.endswith(".__main__")
    path = getattr(main, "__file__", None)
    return path is None or Path(path).resolve().as_posix().endswith(_SAFE_MAIN_FILES)


def _pool(workers: int) -> Executor:
    """A pool of ``workers`` processes (``forkserver``, never ``fork``: the caller may have threads), or threads."""
    if not processes_are_safe():
        logger.info("building the slice cache in %d worker threads", workers)
        return ThreadPoolExecutor(workers, thread_name_prefix="slice-cache")
    import multiprocessing

    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    logger.info("building the slice cache in %d worker processes (%s)", workers, method)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_init_worker)


def _result(future: Future) -> _Prepared | str:
    try:
        return future.result()
    except BrokenProcessPool as err:
        raise DataError(
            f"a slice-cache worker process died (out of memory?); {WORKERS_ENV}=1 builds the cache in this process"
        ) from err


def _init_worker() -> None:
    """Set up a build process: one thread per library (torch too, if something imported it)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = "1"
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


def _prepare_case(case: LoadedCase | Case, preprocessing: Preprocessing, check_only: bool) -> _Prepared | str:
    """Read (a :class:`Case`), check and preprocess one case; a :class:`DataError` comes back as its message.

    Runs in a worker (process or thread): a :class:`DataError` comes back as its message (plain strings and arrays
    travel back by pickle whatever the error class), and the full-resolution volume is dropped before returning.
    """
    try:
        if isinstance(case, Case):
            from lasegseg.data import layouts

            case = layouts.load_case(case)
        where = _check_case(case)
    except DataError as err:
        return str(err)
    if check_only:
        return _Prepared(str(case.case_id), where)
    images, labels = preprocess_case(case, preprocessing)
    z = images.shape[0]
    label = np.asarray(case.label, dtype=bool)
    return _Prepared(
        case_id=str(case.case_id),
        where=where,
        images=np.ascontiguousarray(images),
        labels=np.ascontiguousarray(labels),
        has_fg=labels.reshape(z, -1).any(axis=1),
        native_shape=list(label.shape),
        spacing=[float(s) for s in case.spacing],
        affine=np.asarray(case.affine, np.float64).ravel().tolist(),
        native_label=np.packbits(label.ravel()).tobytes(),
    )


def _check_case(case: LoadedCase) -> str:
    """Check one case's arrays; returns how messages name it (``case 'id' (image file)``)."""
    where = f"case '{case.case_id}'" + (f" ({case.image_path})" if case.image_path else "")
    image, label = np.asarray(case.image), np.asarray(case.label)
    if image.ndim != 3 or image.shape != label.shape:
        raise DataError(f"{where}: image {image.shape} and label {label.shape} must be the same 3D shape")
    if min(image.shape) < 1:
        raise DataError(f"{where}: empty volume {image.shape}")
    if np.shape(case.affine) != (4, 4) or len(case.spacing) != 3:
        raise DataError(f"{where}: affine must be 4x4 and spacing 3 values")
    return where


def _case_batch(prep: _Prepared, index: int, first_row: int, num_slices: int) -> pa.RecordBatch:
    columns = [
        pa.array([prep.case_id], pa.string()),
        pa.array([index], pa.int32()),
        pa.array([first_row], pa.int64()),
        pa.array([num_slices], pa.int32()),
        pa.array([prep.native_shape], _CASES_SCHEMA.field("native_shape").type),
        pa.array([prep.spacing], _CASES_SCHEMA.field("spacing").type),
        pa.array([prep.affine], _CASES_SCHEMA.field("affine").type),
        pa.array([prep.native_label], pa.large_binary()),
    ]
    return pa.record_batch(columns, schema=_CASES_SCHEMA)


def _file_record(path: Path, rows: int) -> dict[str, Any]:
    fsync_file(path)
    return {"rows": rows, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


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
    layout: str,
    preprocessing: Preprocessing,
    cache_dir: str | os.PathLike | None = None,
    *,
    load_cases: LoadCases | None = None,
    list_cases: ListCases | None = None,
    verify: Literal["full", "size"] = "full",
    stats: dict[str, Any] | None = None,
    workers: int | None = None,
) -> SliceCache:
    """Open the cache for this dataset content and these parameters, building it on first use.

    The dataset is fingerprinted from its files (digests remembered by size and mtime, so a second run only
    ``stat``s them); a valid cache with that key is opened without reading any volume. A cache that fails
    verification is logged, discarded and rebuilt.

    Args:
        data_root: dataset folder.
        layout: dataset layout (``data.layout``).
        preprocessing: slice size and intensity percentiles (``data.*`` config keys).
        cache_dir: parent folder of the caches (default :func:`lasegseg.paths.cache_root`).
        load_cases: ``load_cases(root, layout)`` → the cases to build from, called only when building:
            :class:`LoadedCase` objects, or :class:`~lasegseg.data.types.Case` objects that the build's worker
            threads read (default :func:`lasegseg.data.layouts.list_cases`, so reading runs in parallel too).
        list_cases: ``list_cases(root, layout)`` → the cases (with ``image_path``/``label_path``) or files whose
            bytes define the dataset; cheap, called every time (default :func:`lasegseg.data.layouts.list_cases`,
            which reads no volume).
        verify: how an existing cache is checked (see :meth:`SliceCache.open`); trials started by a sweep whose
            driver already opened the cache can pass ``"size"`` to skip rehashing gigabytes.
        stats: gets ``built`` True when this call built the cache (for a sweep's per-node build counts).
        workers: threads that build the cache (see :func:`cache_workers`: default ``$LASEGSEG_CACHE_WORKERS``,
            else the usable cores).
    """
    root = Path(data_root)
    cache_dir = cache_root(cache_dir)
    list_cases, load_cases = _default_readers(list_cases, load_cases)
    fingerprint = dataset_fingerprint(list_cases(root, layout), layout, cache_dir=cache_dir)
    key = cache_key(fingerprint, preprocessing, layout)
    path = cache_dir / key
    if path.exists():
        try:
            return SliceCache.open(path, verify=verify)
        except DataError as err:
            logger.warning("rebuilding slice cache: %s", err)
            discard_dir(path)
    meta = {"layout": layout, "fingerprint": fingerprint, "data_root": str(root.absolute())}
    built = build_cache(lambda: load_cases(root, layout), cache_dir, key, preprocessing, meta=meta, workers=workers)
    if stats is not None:
        stats["built"] = True
    # Just written and hashed by build_cache (or by a concurrent builder), so a size check is enough here.
    return SliceCache.open(built, verify="size")


def open_cache(cfg: Config, stats: dict[str, Any] | None = None) -> SliceCache:
    """The slice cache for ``cfg.data`` (built on first use, reused afterwards).

    Args:
        cfg: the trial config; its ``data.path``, ``layout``, preprocessing and ``cache_dir`` are used.
        stats: gets ``built`` True when this call built the cache.
    """
    from lasegseg.data.layouts import detect_layout

    d = cfg.data
    # Resolve "auto" first so that auto-detected and explicitly named layouts share one cache.
    layout = detect_layout(d.path) if d.layout == "auto" else d.layout
    return get_or_build_cache(d.path, layout, Preprocessing.from_config(cfg), d.cache_dir, stats=stats)


def _default_readers(list_cases: ListCases | None, load_cases: LoadCases | None) -> tuple[ListCases, LoadCases]:
    """Fill in :func:`lasegseg.data.layouts.list_cases` for both: the build reads the listed cases itself.

    Imported here rather than at the top so that opening a cache never needs nibabel or pynrrd.
    """
    from lasegseg.data import layouts

    return list_cases or layouts.list_cases, load_cases or layouts.list_cases


def load_cases_streaming(root: str | os.PathLike, layout: str = "auto") -> Iterator[LoadedCase]:
    """Yield the dataset's cases one at a time (memory holds one case), then report every bad file at once.

    Unlike :func:`lasegseg.data.validate.load_dataset`, which holds all volumes, this suits building a cache from
    this process (the default ``load_cases`` of :func:`get_or_build_cache` lists the cases instead, so that the
    build's workers read them). A bad case is skipped while the rest are still checked; the generator then raises
    one :class:`DataError` listing them all, which aborts the cache build.

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
