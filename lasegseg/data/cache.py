"""The slice cache of a dataset: one memory-mapped Arrow cache per (dataset content, preprocessing parameters),
opened when it exists and valid, built on first use.

What lives where:

- :mod:`lasegseg.data.cache_format`: the files of a cache folder and their Arrow schemas.
- :mod:`lasegseg.data.cache_write`: building and publishing a cache folder (:func:`build_cache`).
- :mod:`lasegseg.data.cache_workers` and :mod:`lasegseg.data.cache_prepare`: the workers that read and preprocess
  the cases of a build (``$LASEGSEG_CACHE_WORKERS``).
- :mod:`lasegseg.data.cache_read`: :class:`SliceCache`, the verified read-only view.
- here: :func:`get_or_build_cache` and :func:`open_cache`, which fingerprint the dataset
  (:mod:`lasegseg.data.fingerprint`), open the cache with that key or build it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lasegseg.data import layouts
from lasegseg.data.cache_read import SliceCache
from lasegseg.data.cache_write import build_cache
from lasegseg.data.fingerprint import cache_key, dataset_fingerprint
from lasegseg.data.preprocess import Preprocessing
from lasegseg.data.types import Case, LoadedCase
from lasegseg.errors import DataError
from lasegseg.fsio import discard_dir
from lasegseg.paths import cache_root

if TYPE_CHECKING:
    from lasegseg.config import Config

logger = logging.getLogger(__name__)

ListCases = Callable[[Path, str], Sequence[Any]]
LoadCases = Callable[[Path, str], Iterable[LoadedCase | Case]]


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
        workers: threads that build the cache (see :func:`~lasegseg.data.cache_workers.cache_workers`: default
            ``$LASEGSEG_CACHE_WORKERS``, else the usable cores).
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
    d = cfg.data
    # Resolve "auto" first so that auto-detected and explicitly named layouts share one cache.
    layout = layouts.detect_layout(d.path) if d.layout == "auto" else d.layout
    return get_or_build_cache(d.path, layout, Preprocessing.from_config(cfg), d.cache_dir, stats=stats)


def _default_readers(list_cases: ListCases | None, load_cases: LoadCases | None) -> tuple[ListCases, LoadCases]:
    """Fill in :func:`lasegseg.data.layouts.list_cases` for both: the build reads the listed cases itself."""
    return list_cases or layouts.list_cases, load_cases or layouts.list_cases
