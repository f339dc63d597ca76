"""Typed keys for what plugins share, as pytest's ``Stash``: a misspelt key is a NameError and a
wrong value type a mypy error, where a string-keyed dict would answer None.

:class:`Stash` lives in memory (``state.stash``); :class:`NamedStash` is written to a file under
its keys' names and read back by the same keys (the summary's entries, a checkpoint's payload)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, cast

T = TypeVar("T")
D = TypeVar("D")


class StashKey(Generic[T]):
    """One entry of a :class:`Stash`. ``name`` names it in errors and, for a run summary's
    entries, in ``summary.json``; ``default`` makes the entry when it is first read."""

    __slots__ = ("name", "default")

    def __init__(self, name: str, default: Callable[[], T] | None = None) -> None:
        self.name = name
        self.default = default

    def __repr__(self) -> str:
        return f"StashKey({self.name!r})"


class Stash:
    """A mapping from :class:`StashKey` objects to values of the key's type."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[StashKey[Any], Any] = {}

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._items[key] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        if key not in self._items:
            if key.default is None:
                raise KeyError(f"nothing stored under {key.name!r} yet")
            self._items[key] = key.default()
        return cast(T, self._items[key])

    def get(self, key: StashKey[T], default: D) -> T | D:
        return cast(T, self._items[key]) if key in self._items else default

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return cast(T, self._items.setdefault(key, default))

    def __delitem__(self, key: StashKey[Any]) -> None:
        del self._items[key]

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> Iterator[tuple[StashKey[Any], Any]]:
        return iter(self._items.items())


class NamedStash:
    """Entries stored under their keys' names, for a file: ``to_dict()`` writes them in the order
    they were first set, ``from_dict()`` reads a file's back and the same keys find them. A string
    is not a key (``TypeError``), and two different keys may not share a name (``KeyError``)."""

    __slots__ = ("_items", "_keys")

    def __init__(self, items: dict[str, Any] | None = None) -> None:
        self._items: dict[str, Any] = dict(items or {})
        self._keys: dict[str, StashKey[Any]] = {}

    @classmethod
    def from_dict(cls, items: dict[str, Any]) -> NamedStash:
        return cls(items)

    def _name(self, key: StashKey[Any]) -> str:
        if not isinstance(key, StashKey):
            raise TypeError(f"entries are set and read by StashKey objects, not {type(key).__name__} {key!r}")
        known = self._keys.setdefault(key.name, key)
        if known is not key:
            raise KeyError(f"two different keys are named {key.name!r}: choose a name of your own")
        return key.name

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self._items[self._name(key)] = value

    def __getitem__(self, key: StashKey[T]) -> T:
        name = self._name(key)
        if name not in self._items:
            if key.default is None:
                raise KeyError(f"nothing stored under {name!r}")
            self._items[name] = key.default()
        return cast(T, self._items[name])

    def get(self, key: StashKey[T], default: D) -> T | D:
        name = self._name(key)
        return cast(T, self._items[name]) if name in self._items else default

    def setdefault(self, key: StashKey[T], default: T) -> T:
        return cast(T, self._items.setdefault(self._name(key), default))

    def __delitem__(self, key: StashKey[Any]) -> None:
        del self._items[self._name(key)]

    def __contains__(self, key: object) -> bool:
        return isinstance(key, StashKey) and self._name(key) in self._items

    def __len__(self) -> int:
        return len(self._items)

    def to_dict(self) -> dict[str, Any]:
        """``{name: value}`` in the order the entries were first set."""
        return dict(self._items)


__all__ = ["NamedStash", "Stash", "StashKey"]
