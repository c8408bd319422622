"""The one registry class: unknown names list the valid ones, a name is registered once, declared names all exist."""

from __future__ import annotations

import pytest

from lasegseg.errors import ConfigError, ModelError
from lasegseg.registry import Registry


def test_unknown_names_raise_the_registrys_error_listing_the_valid_ones():
    reg: Registry[int] = Registry("widget", "widgets", ModelError)
    reg.add("b", 2)
    reg.register("a")(1)
    assert reg.names() == ["a", "b"] and reg.get("b") == 2 and "a" in reg and "c" not in reg
    with pytest.raises(ModelError, match=r"^unknown widget 'c' \(valid widgets: a, b\)$"):
        reg.get("c")


def test_a_name_is_registered_once_and_must_be_declared():
    reg: Registry[int] = Registry("loss", "losses", ConfigError, declared=("x", "y"), declared_in="config.X")
    reg.add("x", 1)
    with pytest.raises(ValueError, match="'x' is already registered"):
        reg.add("x", 2)
    with pytest.raises(ValueError, match="'z' is not declared in config.X"):
        reg.add("z", 3)
    with pytest.raises(RuntimeError, match="losses declared in config.X but never registered: y"):
        reg.check_complete()
    reg.add("y", 4)
    reg.check_complete()


def test_an_entry_can_be_removed_again():
    reg: Registry[int] = Registry("thing", "things", ConfigError)
    reg.add("a", 1)
    assert reg.remove("a") == 1 and "a" not in reg
    with pytest.raises(ConfigError, match="unknown thing 'a'"):
        reg.remove("a")
