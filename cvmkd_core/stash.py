"""Typed keys for what plugins share, as pytest's ``Stash``: a misspelt key is a NameError and a
wrong value type a mypy error, where a string-keyed dict would answer None."""

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


__all__ = ["Stash", "StashKey"]
