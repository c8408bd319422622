"""Process environment variables: numbers read from them, and values set for a ``with`` block then put back."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

from lasegseg.errors import ConfigError

_KIND_WORDS = {int: "a whole number", float: "a number"}


def env_number(
    name: str, kind: type[int] | type[float], *, default: float | None = None, minimum: float = 0, unit: str = ""
) -> int | float | None:
    """A number from the environment variable ``name``: ``default`` when it is unset or blank, else its value as
    ``kind`` (``int`` or ``float``), at least ``minimum``; anything else is a ConfigError naming the variable.

    Args:
        name: the variable.
        kind: ``int`` or ``float``.
        default: the value when unset or blank.
        minimum: the smallest value accepted (NaN never is).
        unit: what the number counts, for the message (``seconds``, ``workers``).
    """
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    what = f"{_KIND_WORDS[kind]} of {unit}" if unit else _KIND_WORDS[kind]
    try:
        value = kind(text)
    except ValueError:
        raise ConfigError(f"{name} must be {what}, got '{text}'") from None
    if not value >= minimum:
        raise ConfigError(f"{name} must be >= {minimum:g}, got '{text}'")
    return value


@contextlib.contextmanager
def scoped_environ(values: Mapping[str, str], *, override: bool = True) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` inside the block; afterwards each key has its earlier value or is unset.

    Args:
        values: variables to set.
        override: replace variables that are already set (else only fill in the missing ones).
    """
    saved = {key: os.environ.get(key) for key in values}
    for key, value in values.items():
        if override or key not in os.environ:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
