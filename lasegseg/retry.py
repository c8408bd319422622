"""Waiting out a service that is away for a while: one backoff loop and one way to read its time budget."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from lasegseg.environ import env_number
from lasegseg.errors import first_line

T = TypeVar("T")


def env_seconds(name: str, default: float) -> float:
    """A number of seconds >= 0 from the environment variable ``name`` (``default`` when unset or empty)."""
    return env_number(name, float, default=default, unit="seconds")


def call_with_retries(
    fn: Callable[[], T], what: str, *, transient: Callable[[BaseException], bool], seconds: float,
    first_wait: float, max_wait: float, log: logging.Logger, service: str,
) -> T:  # fmt: skip
    """Call ``fn`` until it succeeds, backing off exponentially for at most ``seconds``; a fault that ``transient``
    does not accept is raised at once, and so is the last one when the time is up.

    Args:
        what: the call, for the one warning line per failure (``"{service} {what} failed (…); retrying in …"``).
        transient: whether a fault is worth waiting out.
        seconds: the time budget.
        first_wait, max_wait: the first pause and the longest.
        log: where the warnings go.
        service: who failed, for the warnings (``MLflow``, ``storage:``).
    """
    deadline = time.monotonic() + seconds
    wait = first_wait
    while True:
        try:
            return fn()
        except Exception as exc:
            if not transient(exc) or time.monotonic() + wait > deadline:
                raise
            log.warning("%s %s failed (%s); retrying in %.1fs", service, what, first_line(exc), wait)
            time.sleep(wait)
            wait = min(wait * 2, max_wait)
