"""Whole-dataset validation: every case is read and checked, and every problem is reported, one line each.

A user with 100 scans wants to hear about the 3 broken ones at once, not one per run.
"""

from __future__ import annotations

import os
from pathlib import Path

from lasegseg.data.io import VolumeError
from lasegseg.data.layouts import format_problems, load_case, scan_cases
from lasegseg.data.types import Case, LoadedCase
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
