"""The token ids of a corpus side, held flat: every sentence's ids in one numpy array, and where
each sentence starts in a second one.

A Python list of lists costs about 36 bytes a token (a pointer and an int object each) and some
60 bytes a sentence; here a token costs 2 bytes (4 above 65,535 pieces) and a sentence 8, so the
encoded training pairs of a corpus take about a tenth of the memory they took as lists. Rows are
read back as lists of ints, so batching computes exactly what it computed from lists.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, overload

import numpy as np

__all__ = ["ENCODE_CHUNK", "TokenRows"]

#: sentences encoded (or rows gathered) at a time: the lists one call returns are freed before
#: the next, so building never holds a whole corpus side as lists
ENCODE_CHUNK = 50_000


def _smallest(ids: np.ndarray) -> np.ndarray:
    """``ids`` in the smallest unsigned or signed type that holds them all."""
    if ids.size == 0:
        return ids.astype(np.uint16)
    low, high = int(ids.min()), int(ids.max())
    if low >= 0 and high < 2**16:
        return ids.astype(np.uint16)
    if low >= -(2**31) and high < 2**31:
        return ids.astype(np.int32)
    return ids.astype(np.int64)


class TokenRows(Sequence[list[int]]):
    """Rows of token ids (one per sentence) in two flat arrays: ``ids`` (every row's ids, one
    after another) and ``offsets`` (``len(self) + 1`` positions: row ``i`` is
    ``ids[offsets[i]:offsets[i + 1]]``). ``rows[i]`` is a list of ints; ``rows[a:b]`` and
    ``rows + other`` are TokenRows; a TokenRows equals any sequence of the same rows."""

    __slots__ = ("ids", "offsets")

    def __init__(self, ids: np.ndarray, offsets: np.ndarray) -> None:
        if offsets.ndim != 1 or offsets.size == 0 or int(offsets[0]) != 0 or int(offsets[-1]) != ids.size:
            raise ValueError(f"offsets must run from 0 to the {ids.size} ids")
        self.ids = ids
        self.offsets = offsets

    # --- building -------------------------------------------------------------------------------

    @classmethod
    def _from_list(cls, rows: Sequence[Sequence[int]]) -> TokenRows:
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(offsets[-1]))
        return cls(_smallest(flat), offsets)

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[int]]) -> TokenRows:
        """Rows from any iterable of id sequences (read ``ENCODE_CHUNK`` rows at a time)."""
        if isinstance(rows, TokenRows):
            return rows
        iterator = iter(rows)
        parts = []
        while chunk := list(itertools.islice(iterator, ENCODE_CHUNK)):
            parts.append(cls._from_list(chunk))
        return cls.concat(parts)

    @classmethod
    def encode(cls, encode: Callable[[list[str]], list[list[int]]], texts: Sequence[str]) -> TokenRows:
        """``encode(texts)`` (a tokenizer's), called on ``ENCODE_CHUNK`` texts at a time."""
        return cls.concat(
            [cls._from_list(encode(list(texts[at : at + ENCODE_CHUNK]))) for at in range(0, len(texts), ENCODE_CHUNK)]
        )

    @classmethod
    def concat(cls, parts: Sequence[TokenRows]) -> TokenRows:
        """One TokenRows of ``parts``' rows, in order."""
        if not parts:
            return cls(np.zeros(0, dtype=np.uint16), np.zeros(1, dtype=np.int64))
        if len(parts) == 1:
            return parts[0]
        ids = np.concatenate([p.ids for p in parts])  # the widest type of the parts
        starts = np.cumsum([0] + [p.ids.size for p in parts])
        offsets = np.concatenate([p.offsets[:-1] + start for p, start in zip(parts, starts)] + [starts[-1:]])
        return cls(ids, offsets.astype(np.int64))

    # --- reading --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.offsets.size - 1

    @overload
    def __getitem__(self, index: int) -> list[int]: ...

    @overload
    def __getitem__(self, index: slice) -> TokenRows: ...

    def __getitem__(self, index: int | slice) -> list[int] | TokenRows:
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return TokenRows._from_list([self[i] for i in range(start, stop, step)])
            stop = max(start, stop)
            low, high = int(self.offsets[start]), int(self.offsets[stop])
            return TokenRows(self.ids[low:high], self.offsets[start : stop + 1] - low)
        position = range(len(self))[index]  # negative indices, and IndexError past the end
        return self.ids[self.offsets[position] : self.offsets[position + 1]].tolist()  # type: ignore[no-any-return]

    def __iter__(self) -> Iterator[list[int]]:
        ids, offsets = self.ids, self.offsets
        for i in range(len(self)):
            yield ids[offsets[i] : offsets[i + 1]].tolist()

    def lengths(self) -> np.ndarray:
        """The number of ids in each row."""
        return np.diff(self.offsets)

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.offsets.nbytes)

    def __add__(self, other: Iterable[Sequence[int]]) -> TokenRows:
        return TokenRows.concat([self, TokenRows.from_rows(other)])

    def __radd__(self, other: Iterable[Sequence[int]]) -> TokenRows:
        return TokenRows.concat([TokenRows.from_rows(other), self])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TokenRows):
            return bool(np.array_equal(self.offsets, other.offsets) and np.array_equal(self.ids, other.ids))
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)) or len(other) != len(self):
            return False
        return all(list(mine) == list(theirs) for mine, theirs in zip(self, other))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"TokenRows({len(self)} rows, {self.ids.size} ids of {self.ids.dtype}, {self.nbytes:,} bytes)"

    def __reduce__(self) -> tuple[Any, ...]:
        return (TokenRows, (np.asarray(self.ids), np.asarray(self.offsets)))

    # --- on disk --------------------------------------------------------------------------------

    @staticmethod
    def files(prefix: Path) -> tuple[Path, Path]:
        """The two ``.npy`` files of rows saved at ``prefix``: ids, then offsets."""
        return prefix.with_name(prefix.name + ".ids.npy"), prefix.with_name(prefix.name + ".offsets.npy")

    def save(self, prefix: Path) -> None:
        """Write the rows as two ``.npy`` files (numpy's own format), each atomically, each with
        its sha256 recorded and noted as checked (:mod:`cvmkd_nmt.cache`)."""
        from cvmkd_core.files import atomic_write
        from cvmkd_nmt.cache import mark_checked, record_digest

        for path, array in zip(self.files(prefix), (self.ids, self.offsets)):

            def write(handle: IO[bytes], array: np.ndarray = array) -> None:
                np.save(handle, np.asarray(array), allow_pickle=False)

            atomic_write(path, write)
            mark_checked(path, record_digest(path))

    @classmethod
    def load(cls, prefix: Path, what: str) -> TokenRows | None:
        """Rows saved at ``prefix``, memory-mapped (read-only); None when they are not all there
        with their records (a cut write: they are encoded again). Files that do not match their
        sha256 raise :class:`~cvmkd_nmt.cache.CacheError`; each is hashed the first time only."""
        from cvmkd_nmt.cache import CacheError, verified_once

        paths = cls.files(prefix)
        if not all(verified_once(path, what) for path in paths):
            return None
        try:
            ids, offsets = (np.load(path, mmap_mode="r", allow_pickle=False) for path in paths)
            return cls(ids, offsets)
        except (OSError, ValueError) as exc:
            raise CacheError(f"{what} {prefix} is unreadable ({exc}); delete it and it is rebuilt") from None
