"""Errors that carry a one-line, user-facing message.

Every check on user input raises one of these with a message naming the file or config key at fault;
the CLI prints the message alone (no traceback) and exits non-zero.
"""

from __future__ import annotations


class LasegsegError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class ConfigError(LasegsegError, ValueError):
    """A config key is unknown, has the wrong type or an invalid value."""


class DataError(LasegsegError):
    """A dataset, volume or cache file is missing, corrupt or inconsistent."""


class ModelError(LasegsegError):
    """A model folder, backbone or checkpoint cannot be loaded."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), for one-line error reports."""
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
