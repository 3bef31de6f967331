"""One small registry for everything cltunnel finds by name: models, datasets, strategies, protocols, analyses
and sweep reports.

A :class:`Registry` maps names to things, in registration order. ``register`` adds one (directly or as a
decorator); ``get`` (or ``registry[name]``) returns it or raises a one-line error naming the kind, the closest
valid name (difflib) and every valid name; ``list`` gives the names. It reads like a mapping (``in``, ``len``,
iteration, ``items``), so a registry replaces a plain dict without changing its readers.

This module imports nothing of cltunnel's but the errors, so every layer can own a registry; the owner passes
the error class its users expect (the config layer's ``ConfigError`` for names a scenario gives).
"""
from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

from cltunnel.errors import CltunnelError

T = TypeVar("T")


class UnknownName(CltunnelError, LookupError):
    """A name no registry entry has (the default error of :meth:`Registry.get`)."""


def did_you_mean(name: str, valid: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or ``""``."""
    match = difflib.get_close_matches(str(name), valid, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


class Registry(Mapping[str, T], Generic[T]):
    """Names -> things of one kind (``kind``: "model", "analysis", ...), in registration order."""

    def __init__(self, kind: str, error: type[Exception] = UnknownName, entries: Mapping[str, T] | None = None,
                 replace: bool = True) -> None:
        self.kind, self.error, self.replace = kind, error, replace
        self._entries: dict[str, T] = dict(entries or {})

    def register(self, name: str, item: Any = None) -> Any:
        """``register(name, item)`` adds ``item``; ``@register(name)`` adds the decorated object. With
        ``replace=False`` a name registered twice is refused."""
        if item is None:
            def decorate(obj: T) -> T:
                self.register(name, obj)
                return obj
            return decorate
        if not self.replace and name in self._entries:
            raise ValueError(f"{self.kind} '{name}' is registered twice")
        self._entries[name] = item
        return item

    def get(self, name: str, where: str = "") -> T:  # type: ignore[override]
        """The entry of ``name``, or an error naming ``where`` (a config key), the closest name and all names."""
        if name in self._entries:
            return self._entries[name]
        prefix = f"{where}: " if where else ""
        raise self.error(f"{prefix}unknown {self.kind} '{name}'{did_you_mean(name, self.list())}; valid: "
                         f"{', '.join(self.list())}")

    def list(self) -> list[str]:
        return list(self._entries)

    def sort(self, key) -> None:
        """Put the entries in the order of ``key(entry)`` (stable), the order ``list`` and error messages show."""
        self._entries = dict(sorted(self._entries.items(), key=lambda item: key(item[1])))

    def unregister(self, name: str) -> None:
        self._entries.pop(name, None)

    def __delitem__(self, name: str) -> None:
        del self._entries[name]

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __setitem__(self, name: str, item: T) -> None:
        self.register(name, item)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

