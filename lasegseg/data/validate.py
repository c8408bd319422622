"""Whole-dataset validation: every case is read and checked, and every problem is reported, one line each.

A user with 100 scans wants to hear about the 3 broken ones at once, not one per run. :func:`validate_dataset`
returns the good cases and the problems, :func:`load_dataset` holds every volume or raises, and
:func:`load_cases_streaming` yields the cases one at a time and raises at the end.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from lasegseg.data.layouts import format_problems, list_cases, load_case, scan_cases
from lasegseg.data.types import Case, LoadedCase
from lasegseg.data.volume_checks import VolumeError
from lasegseg.errors import DataError


def _problem_line(err: DataError, root: Path) -> str:
    """``imagesTr/la_004.nii.gz: truncated or corrupt gzip``: the file relative to the dataset folder when inside."""
    if isinstance(err, VolumeError):
        try:
            where = err.path.relative_to(root).as_posix()
        except ValueError:
            where = str(err.path)
        return f"{where}: {err.reason}"
    return str(err)


def validate_dataset(root: str | os.PathLike, layout: str = "auto") -> tuple[list[Case], list[str]]:
    """Check every case of a dataset (it does not stop at the first bad one).

    Each case is fully read (so truncated files are found) and dropped before the next: memory holds one case.

    Args:
        root: dataset folder.
        layout: ``auto`` (detect) or a layout name.

    Returns:
        ``(good_cases, problems)``: the cases that load cleanly, sorted by ``case_id``, and one line per problem,
        each naming the file at fault (relative to ``root``) — missing partners, unreadable or inconsistent
        files, or the folder itself (missing, empty, no known layout).
    """
    root = Path(root)
    try:
        cases, problems = scan_cases(root, layout)
    except DataError as err:
        return [], [str(err)]
    good: list[Case] = []
    for case in cases:
        try:
            load_case(case)
        except DataError as err:
            problems.append(_problem_line(err, root))
        else:
            good.append(case)
    return good, problems


def load_dataset(root: str | os.PathLike, layout: str = "auto") -> list[LoadedCase]:
    """Load every case of a dataset, or raise one :class:`DataError` listing all problems.

    All volumes are held in memory at once; for large datasets call :func:`validate_dataset` and then
    :func:`~lasegseg.data.layouts.load_case` one case at a time.

    Args:
        root: dataset folder.
        layout: ``auto`` (detect) or a layout name.
    """
    root = Path(root)
    cases, problems = scan_cases(root, layout)
    loaded: list[LoadedCase] = []
    for case in cases:
        try:
            one = load_case(case)
        except DataError as err:
            problems.append(_problem_line(err, root))
            # The call will raise: stop holding volumes, but keep checking the rest.
            loaded.clear()
        else:
            if not problems:
                loaded.append(one)
    if problems:
        raise DataError(format_problems(root, problems))
    return loaded


def load_cases_streaming(root: str | os.PathLike, layout: str = "auto") -> Iterator[LoadedCase]:
    """Yield the dataset's cases one at a time (memory holds one case), then report every bad file at once.

    Unlike :func:`load_dataset`, which holds all volumes, this suits building a cache from this process (the
    default ``load_cases`` of :func:`lasegseg.data.cache.get_or_build_cache` lists the cases instead, so that the
    build's workers read them). A bad case is skipped while the rest are still checked; the generator then raises
    one :class:`DataError` listing them all, which aborts the cache build.

    Args:
        root: dataset folder.
        layout: ``auto`` (detect) or a layout name.
    """
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
