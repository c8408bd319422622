"""scoped_environ: variables set for a block, then restored (or unset) even when the block raises."""

from __future__ import annotations

import os

import pytest

from lasegseg.environ import env_number, scoped_environ
from lasegseg.errors import ConfigError


def test_override_sets_every_value_and_restores_afterwards(monkeypatch):
    monkeypatch.setenv("LASEGSEG_T_SET", "before")
    monkeypatch.delenv("LASEGSEG_T_UNSET", raising=False)
    with scoped_environ({"LASEGSEG_T_SET": "inside", "LASEGSEG_T_UNSET": "new"}):
        assert (os.environ["LASEGSEG_T_SET"], os.environ["LASEGSEG_T_UNSET"]) == ("inside", "new")
    assert os.environ["LASEGSEG_T_SET"] == "before" and "LASEGSEG_T_UNSET" not in os.environ


def test_without_override_only_missing_values_are_filled_in(monkeypatch):
    monkeypatch.setenv("LASEGSEG_T_SET", "user's")
    monkeypatch.delenv("LASEGSEG_T_UNSET", raising=False)
    with scoped_environ({"LASEGSEG_T_SET": "default", "LASEGSEG_T_UNSET": "default"}, override=False):
        assert (os.environ["LASEGSEG_T_SET"], os.environ["LASEGSEG_T_UNSET"]) == ("user's", "default")
    assert os.environ["LASEGSEG_T_SET"] == "user's" and "LASEGSEG_T_UNSET" not in os.environ


def test_environment_is_restored_when_the_block_raises(monkeypatch):
    monkeypatch.delenv("LASEGSEG_T_UNSET", raising=False)
    with pytest.raises(RuntimeError), scoped_environ({"LASEGSEG_T_UNSET": "x"}):
        raise RuntimeError("boom")
    assert "LASEGSEG_T_UNSET" not in os.environ


@pytest.mark.parametrize("text,kind,expected", [("", int, 3), (" ", float, 3), ("4", int, 4), ("0.5", float, 0.5)])
def test_env_number_reads_a_number_or_gives_the_default(monkeypatch, text, kind, expected):
    monkeypatch.setenv("LASEGSEG_T_N", text)
    value = env_number("LASEGSEG_T_N", kind, default=3)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "text,kind,words",
    [("two", int, "a whole number of workers, got 'two'"), ("1.5", int, "a whole number of workers"),
     ("0", int, ">= 1, got '0'"), ("nan", float, ">= 1, got 'nan'")],
)  # fmt: skip
def test_env_number_names_the_variable_when_it_refuses(monkeypatch, text, kind, words):
    monkeypatch.setenv("LASEGSEG_T_N", text)
    with pytest.raises(ConfigError, match=f"LASEGSEG_T_N must be {words}"):
        env_number("LASEGSEG_T_N", kind, minimum=1, unit="workers")
