"""User-facing errors: their kinds, and the one line a command prints of any exception."""

from __future__ import annotations

import pytest

from lasegseg.errors import ConfigError, DataError, LasegsegError, ModelError, first_line


@pytest.mark.parametrize("kind", [ConfigError, DataError, ModelError])
def test_every_user_error_is_a_lasegseg_error(kind):
    assert issubclass(kind, LasegsegError)


def test_a_config_error_is_also_a_value_error():
    with pytest.raises(ValueError, match="model.mode"):
        raise ConfigError("config key 'model.mode' must be one of frozen, finetune, lora")


def test_first_line_keeps_one_line_of_bounded_length():
    assert first_line(RuntimeError("store down\n  Traceback (most recent call last): …")) == "store down"
    assert first_line(RuntimeError("x" * 500)) == "x" * 300
    assert first_line(RuntimeError("abcdef"), limit=3) == "abc"


def test_first_line_of_an_empty_message_is_the_type_name():
    assert first_line(KeyError()) == "KeyError"
    assert first_line(OSError("   ")) == "OSError"


def test_first_line_prefers_a_message_attribute():
    exc = RuntimeError("RESOURCE_DOES_NOT_EXIST: long\nbody")
    exc.message = "run abc not found"
    assert first_line(exc) == "run abc not found"
