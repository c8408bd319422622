"""scoped_environ: variables set for a block, then restored (or unset) even when the block raises."""

from __future__ import annotations

import os

import pytest

from lasegseg.environ import scoped_environ


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
