"""How a command-line process ends: one line and a status for a user's error, then every exit handler runs and the
interpreter's module teardown is skipped.

After a sweep the interpreter spends ~1.5 s (2 cores) tearing down torch, Ray, MLflow and their threads' modules
before the process is gone, on every run. :func:`end_quickly` registers, first, an exit handler that therefore runs
*last* (handlers run in reverse order): by then Ray is shut down, MLflow runs are closed and every library's own
handler has run, so nothing is left to lose; it flushes stdout/stderr and ends the process with the status that
:func:`exit_with` was given. A process that ends any other way (an uncaught exception) ends as usual.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Callable
from typing import NoReturn

from lasegseg.errors import LasegsegError

_STATUS: list[int] = []


def run_command(body: Callable[[], int], prog: str, *, interrupted: str = "interrupted") -> int:
    """A command's exit status: ``body()``'s, else 2 with one line ``{prog}: error: …`` for a user's error (a
    :class:`LasegsegError`) or a full memory, else 130 with ``{prog}: {interrupted}`` on Ctrl-C. A bug's traceback
    is not hidden. Both command lines (``lasegseg`` and ``sweeps/fewshot.py``) end through it.

    Args:
        body: the command; returns its status.
        prog: the command's name, at the start of each line.
        interrupted: what to say on Ctrl-C (how to go on, where there is a way).
    """
    try:
        return int(body() or 0)
    except LasegsegError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"{prog}: error: out of memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
    finally:
        sys.stdout.flush()


def end_quickly() -> None:
    """Call first thing in a command-line entry point (before torch, Ray or MLflow are imported)."""
    atexit.register(_end)


def exit_with(status: int) -> NoReturn:
    """``sys.exit(status)``; with :func:`end_quickly` registered, the process ends right after the exit handlers."""
    _STATUS.append(int(status))
    sys.exit(status)


def _end() -> None:
    if not _STATUS:
        return
    logging.shutdown()  # its own exit handler may have been registered before this one
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it anyway
            pass
    os._exit(_STATUS[-1])
