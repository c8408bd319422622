"""The workers that read and preprocess the cases of a slice-cache build, and how many there are.

Cases are prepared (:func:`lasegseg.data.cache_prepare.prepare_case`) by :func:`cache_workers` workers
(``$LASEGSEG_CACHE_WORKERS``, else the usable cores; processes where :func:`processes_are_safe`, else threads) and
handed back in case order, so the cache's files do not depend on the worker count. A bounded number of cases is in
flight at once, so memory stays bounded however many cases a dataset has.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from lasegseg.data.cache_prepare import Prepared, prepare_case
from lasegseg.data.preprocess import Preprocessing
from lasegseg.data.types import Case, LoadedCase
from lasegseg.environ import env_number
from lasegseg.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

WORKERS_ENV = "LASEGSEG_CACHE_WORKERS"
# Cases submitted to the pool per worker, beyond the one each works on: keeps the workers busy while the parent
# writes, and bounds the preprocessed cases held in memory (about 55 MB each for 88 slices at 448 px).
_QUEUED_PER_WORKER = 1
# With the default worker count, a first case quicker than this is built inline with the rest (a small dataset is
# built before parallel reading would pay off).
_PARALLEL_AFTER_S = 0.5
# Entry points whose code runs under `if __name__ == "__main__":` only, so a worker process may import them again.
_SAFE_MAIN_FILES = ("sweeps/fewshot.py", "bench/run.py", "bin/lasegseg")
_SAFE_MAIN_MODULES = ("lasegseg.cli",)


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
    return requested_workers(workers) or _usable_cores()


def requested_workers(workers: int | None) -> int | None:
    """The worker count asked for (keyword, else ``$LASEGSEG_CACHE_WORKERS``), validated; None when neither is set.

    Raises:
        ConfigError: ``workers`` or the environment variable is not a whole number >= 1 (the message names it).
    """
    if workers is not None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ConfigError(f"cache workers must be a whole number >= 1, got {workers!r}")
        return workers
    return env_number(WORKERS_ENV, int, minimum=1, unit="workers")


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def prepared_cases(
    cases: Iterable[LoadedCase | Case],
    preprocessing: Preprocessing,
    workers: int | None,
    check_only: Callable[[], bool],
) -> Iterator[Prepared | str]:
    """:func:`~lasegseg.data.cache_prepare.prepare_case` of every case, in case order: inline for 1 worker, else
    in a pool.

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
        prepared = prepare_case(first, preprocessing, check_only())
        workers = _usable_cores() if time.perf_counter() - t0 >= _PARALLEL_AFTER_S else 1
        yield prepared
    if workers == 1:
        for case in cases:
            yield prepare_case(case, preprocessing, check_only())
    else:
        yield from _prepared_in_pool(cases, preprocessing, workers, check_only)


def _prepared_in_pool(
    cases: Iterator[LoadedCase | Case], preprocessing: Preprocessing, workers: int, check_only: Callable[[], bool]
) -> Iterator[Prepared | str]:
    """:func:`prepared_cases` in ``workers`` processes (threads where processes are not safe, see
    :func:`processes_are_safe`); at most ``workers * (1 + _QUEUED_PER_WORKER)`` cases are in flight or waiting to be
    written, so memory stays bounded however many cases there are."""
    pool = _pool(workers)
    pending: deque[Future] = deque()
    try:
        for case in cases:
            pending.append(pool.submit(prepare_case, case, preprocessing, check_only()))
            if len(pending) >= workers * (1 + _QUEUED_PER_WORKER):
                yield _result(pending.popleft())
        while pending:
            yield _result(pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


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
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    logger.info("building the slice cache in %d worker processes (%s)", workers, method)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=_init_worker)


def _result(future: Future) -> Prepared | str:
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
