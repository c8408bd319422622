"""Building one slice cache folder: the Arrow files, the manifest, and publishing the folder whole.

The files are those of :mod:`lasegseg.data.cache_format`. A cache is written into a temporary sibling folder and
published with :func:`lasegseg.fsio.publish_dir`, so readers see a whole cache or none and the first of several
concurrent builders wins; temporary folders that crashed builders left behind are deleted after a day. Cases come
from :func:`lasegseg.data.cache_workers.prepared_cases` in case order, so the files do not depend on the worker
count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from lasegseg.data.cache_format import CASES_FILE, CASES_SCHEMA, MANIFEST_FILE, SLICES_FILE, slices_schema
from lasegseg.data.cache_prepare import Prepared
from lasegseg.data.cache_workers import prepared_cases, requested_workers
from lasegseg.data.fingerprint import CACHE_VERSION
from lasegseg.data.preprocess import Preprocessing
from lasegseg.data.types import Case, LoadedCase
from lasegseg.errors import DataError
from lasegseg.fsio import (
    atomic_write,
    builder_stamp,
    fsync_dir,
    fsync_file,
    plain_file_mode,
    publish_dir,
    sha256_file,
)

logger = logging.getLogger(__name__)

_STALE_SECONDS = 24 * 3600


def build_cache(
    cases: Iterable[LoadedCase] | Callable[[], Iterable[LoadedCase]],
    cache_dir: str | os.PathLike,
    key: str,
    preprocessing: Preprocessing,
    *,
    meta: dict[str, Any] | None = None,
    workers: int | None = None,
) -> Path:
    """Preprocess cases into ``<cache_dir>/<key>/`` (see :mod:`lasegseg.data.cache_format` for the files).

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
            :func:`~lasegseg.data.cache_workers.cache_workers`) the first case is built in this process and, if it
            took long enough to be worth it, the rest in parallel.

    Returns:
        The final cache folder.
    """
    workers = requested_workers(workers)
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
        if publish_dir(tmp, final, complete=lambda folder: (folder / MANIFEST_FILE).exists()):
            fsync_dir(cache_dir)
        else:
            logger.info("slice cache %s was built concurrently; keeping that one", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


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
        ipc.new_file(str(folder / CASES_FILE), CASES_SCHEMA) as cases_writer,
        # Closed on any error too, so the workers are done before the temporary folder goes.
        contextlib.closing(prepared_cases(cases, preprocessing, workers, lambda: bool(problems))) as prepared,
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
            pa.FixedSizeListArray.from_arrays(image_values, type=slices_schema(image_size).field("image").type),
            pa.Array.from_buffers(pa.binary(s2), rows, [None, lbl_map.read_buffer()]),
            pa.array(fg, pa.bool_()),
        ]
        batch = pa.record_batch(columns, schema=slices_schema(image_size))
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


def _case_batch(prep: Prepared, index: int, first_row: int, num_slices: int) -> pa.RecordBatch:
    columns = [
        pa.array([prep.case_id], pa.string()),
        pa.array([index], pa.int32()),
        pa.array([first_row], pa.int64()),
        pa.array([num_slices], pa.int32()),
        pa.array([prep.native_shape], CASES_SCHEMA.field("native_shape").type),
        pa.array([prep.spacing], CASES_SCHEMA.field("spacing").type),
        pa.array([prep.affine], CASES_SCHEMA.field("affine").type),
        pa.array([prep.native_label], pa.large_binary()),
    ]
    return pa.record_batch(columns, schema=CASES_SCHEMA)


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
