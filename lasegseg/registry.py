"""Names → components: one registry class for decoders, losses, augmentations and backbone families."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """The entries of one kind of component, chosen by a string in the config.

    Args:
        kind: what an entry is, for messages (``decoder``, ``backbone family``).
        plural: its plural in the "valid …" list of an unknown-name error (``decoders``, ``families``).
        error: the exception an unknown name raises (a ConfigError for config values, a ModelError for models).
        declared: where the names are also listed for cheap checks (``config_checks.LOSS_CHOICES``): every registered
            name must be there, and :meth:`check_complete` that every listed one was registered.
        declared_in: that list's dotted name, for messages.
    """

    def __init__(self, kind: str, plural: str, error: type[Exception], declared: Collection[str] | None = None,
                 declared_in: str = "") -> None:  # fmt: skip
        self.kind, self.plural, self.error = kind, plural, error
        self.declared, self.declared_in = declared, declared_in
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        """Register ``entry`` under ``name``; a second entry for a name, or an undeclared name, is an error."""
        if name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is already registered")
        if self.declared is not None and name not in self.declared:
            raise ValueError(f"{self.kind} '{name}' is not declared in {self.declared_in}")
        self._entries[name] = entry
        return entry

    def remove(self, name: str) -> T:
        """Take ``name``'s entry out again (a plugin unloaded, a test's throwaway entry); returns it."""
        if name not in self._entries:
            raise self.error(f"unknown {self.kind} '{name}' (valid {self.plural}: {', '.join(self.names())})")
        return self._entries.pop(name)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry)

    def get(self, name: str) -> T:
        """The entry of ``name``; an unknown name raises ``error`` listing the valid ones."""
        if name not in self._entries:
            raise self.error(f"unknown {self.kind} '{name}' (valid {self.plural}: {', '.join(self.names())})")
        return self._entries[name]

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def values(self) -> Iterator[T]:
        return iter(self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def check_complete(self) -> None:
        """Every declared name has an entry (call once the module that registers them has run)."""
        missing = [n for n in self.declared or () if n not in self._entries]
        if missing:
            raise RuntimeError(
                f"{self.plural} declared in {self.declared_in} but never registered: {', '.join(missing)}"
            )
