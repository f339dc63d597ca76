"""Read parallel corpora (TSV, two line-aligned files, JSONL) into sentence pairs, filter and split
them; read source-language text alone (those formats, or one sentence per line). A file whose
name ends in ``.gz`` is read through gzip, ``.zst`` through zstd; files are streamed.

Every problem is reported as a :class:`~cvmkd_core.errors.CorpusError` naming the file and the line.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from cvmkd_nmt.errors import CorpusError

__all__ = [
    "Pair",
    "PairList",
    "filter_pairs",
    "read_jsonl",
    "read_parallel",
    "read_sources",
    "read_tsv",
    "split_pairs",
]

log = logging.getLogger("cvmkd")

PathLike = str | os.PathLike[str]


class Pair(NamedTuple):
    """One sentence pair. A NamedTuple: immutable and about as small as a Python record gets."""

    src: str
    tgt: str


class PairList(list[Pair]):
    """A plain ``list[Pair]`` that also remembers how many pairs the reader skipped (``skipped``)."""

    skipped: int

    def __init__(self, pairs: Iterable[Pair] = (), skipped: int = 0) -> None:
        super().__init__(pairs)
        self.skipped = skipped


def _open(path: PathLike) -> BinaryIO:
    """The file's bytes as a stream, decompressed when its name ends in ``.gz`` or ``.zst``."""
    p = Path(path)
    if p.name.endswith(".gz"):
        return gzip.open(p, "rb")  # type: ignore[return-value]
    if p.name.endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise CorpusError(
                f"{path}: reading .zst files needs the zstandard package: pip install zstandard"
            ) from None
        return io.BufferedReader(_ZstdStream(open(p, "rb"), zstandard), 1 << 20)  # type: ignore[return-value]
    return open(p, "rb")


class _ZstdStream(io.RawIOBase):
    """A .zst file's decompressed bytes, frame after frame; input that ends inside a frame is an
    ``EOFError`` (zstandard's own stream reader returns what it has, silently)."""

    def __init__(self, raw: BinaryIO, zstandard: Any) -> None:
        self._raw, self._zstandard = raw, zstandard
        self._frame = zstandard.ZstdDecompressor().decompressobj()
        self._pending = b""
        self._in_frame = False
        self._done = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending and not self._done:
            chunk = self._raw.read(1 << 20)
            if not chunk:
                if self._in_frame:
                    raise EOFError("the compressed data ends inside a frame")
                self._done = True
                break
            self._pending = self._frame.decompress(chunk)
            self._in_frame = not self._frame.eof
            while self._frame.eof and self._frame.unused_data:  # the next frame of a multi-frame file
                rest = self._frame.unused_data
                self._frame = self._zstandard.ZstdDecompressor().decompressobj()
                self._pending += self._frame.decompress(rest)
                self._in_frame = not self._frame.eof
            if self._frame.eof:  # a frame ended exactly at the chunk's end: the next starts afresh
                self._frame = self._zstandard.ZstdDecompressor().decompressobj()
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def close(self) -> None:
        self._raw.close()
        super().close()


def _read_lines(path: PathLike) -> Iterator[tuple[int, str]]:
    """Yield ``(line_number, text)`` for each line, decoded strictly as UTF-8, newline and CR removed.

    The file is streamed (a corpus of any size is never held whole in memory), through gzip or
    zstd when its name ends in ``.gz`` or ``.zst``. Splits on ``\\n`` bytes only:
    ``str.splitlines`` would also split on U+2028, U+0085 and form feeds, which would silently
    misalign the two sides of a parallel corpus.
    """
    try:
        handle = _open(path)
    except FileNotFoundError:
        raise CorpusError(f"no such corpus file: {path}") from None
    except IsADirectoryError:
        raise CorpusError(f"{path}: is a directory, not a corpus file") from None
    except OSError as e:
        raise CorpusError(f"{path}: cannot read ({e.strerror})") from None
    with handle:
        try:
            for number, raw in enumerate(handle, start=1):
                if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a BOM some Windows editors write
                    raw = raw[3:]
                if raw.endswith(b"\n"):
                    raw = raw[:-1]
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise CorpusError(
                        f"{path}: line {number}: invalid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                    ) from None
                yield number, text
        except (gzip.BadGzipFile, EOFError) as e:
            kind = "zstd" if str(path).endswith(".zst") else "gzip"
            raise CorpusError(f"{path}: not a complete {kind} file ({e})") from None
        except IsADirectoryError:
            raise CorpusError(f"{path}: is a directory, not a corpus file") from None
        except OSError as e:
            raise CorpusError(f"{path}: cannot read ({e.strerror or e})") from None
        except Exception as e:  # zstandard.ZstdError: a damaged or cut .zst file
            if type(e).__name__ != "ZstdError":
                raise
            raise CorpusError(f"{path}: not a complete zstd file ({e})") from None


def _finish(pairs: list[Pair], skipped: int, path: PathLike) -> PairList:
    if not pairs:
        what = "empty file" if skipped == 0 else f"all {skipped} lines have an empty side"
        raise CorpusError(f"{path}: no sentence pairs ({what})")
    if skipped:
        log.warning("%s: skipped %d pairs with an empty side", path, skipped)
    return PairList(pairs, skipped)


def _empty_side(src: str, tgt: str) -> str | None:
    if not src and not tgt:
        return "empty line"
    if not src:
        return "empty source side"
    if not tgt:
        return "empty target side"
    return None


def read_tsv(
    path: PathLike, src_col: int = 0, tgt_col: int = 1, skip_empty: bool = False, exact: bool = False
) -> PairList:
    """Read a tab-separated file, one pair per line, taking columns ``src_col`` and ``tgt_col`` (0-based).

    Lines may have more columns than needed (for example a score); fewer is an error. With
    ``exact``, a line must have exactly the columns needed: a stray tab inside a sentence would
    otherwise cut it short unseen.
    Each side is stripped of surrounding whitespace. A pair with an empty side is an error,
    or with ``skip_empty=True`` is skipped and counted in the result's ``skipped``.
    """
    need = max(src_col, tgt_col) + 1
    pairs: list[Pair] = []
    skipped = 0
    for number, line in _read_lines(path):
        if not line.strip():
            src = tgt = ""  # a blank line is a pair with two empty sides, not a field-count error
        else:
            fields = line.split("\t")
            if len(fields) < need or (exact and len(fields) > need):
                hint = " (a tab inside a sentence?)" if len(fields) > need else ""
                raise CorpusError(
                    f"{path}: line {number}: expected {need} tab-separated fields, got {len(fields)}{hint}"
                )
            src, tgt = fields[src_col].strip(), fields[tgt_col].strip()
        problem = _empty_side(src, tgt)
        if problem:
            if not skip_empty:
                raise CorpusError(f"{path}: line {number}: {problem}")
            skipped += 1
            continue
        pairs.append(Pair(src, tgt))
    return _finish(pairs, skipped, path)


def read_parallel(src_path: PathLike, tgt_path: PathLike, skip_empty: bool = False) -> PairList:
    """Read two line-aligned files (line *n* of one translates line *n* of the other).

    Different line counts are an error, reported before any empty-side problem since a
    misaligned corpus makes every later line wrong.
    """
    src_lines = [text for _, text in _read_lines(src_path)]
    tgt_lines = [text for _, text in _read_lines(tgt_path)]
    if len(src_lines) != len(tgt_lines):
        raise CorpusError(f"{src_path} has {len(src_lines)} lines but {tgt_path} has {len(tgt_lines)}")
    pairs: list[Pair] = []
    skipped = 0
    for number, (s, t) in enumerate(zip(src_lines, tgt_lines), start=1):
        src, tgt = s.strip(), t.strip()
        problem = _empty_side(src, tgt)
        if problem:
            if not skip_empty:
                if not src and not tgt:
                    raise CorpusError(f"{src_path} and {tgt_path}: line {number}: empty line in both files")
                where, side = (src_path, "source") if not src else (tgt_path, "target")
                raise CorpusError(f"{where}: line {number}: empty {side} side")
            skipped += 1
            continue
        pairs.append(Pair(src, tgt))
    if not pairs:
        what = "empty files" if skipped == 0 else f"all {skipped} lines have an empty side"
        raise CorpusError(f"{src_path}, {tgt_path}: no sentence pairs ({what})")
    if skipped:
        log.warning("%s, %s: skipped %d pairs with an empty side", src_path, tgt_path, skipped)
    return PairList(pairs, skipped)


def read_jsonl(path: PathLike, src_key: str = "src", tgt_key: str = "tgt", skip_empty: bool = False) -> PairList:
    """Read JSON Lines, one object per line with string values under ``src_key`` and ``tgt_key``.

    A blank line counts as a pair with empty sides (error, or skipped with ``skip_empty=True``).
    """
    pairs: list[Pair] = []
    skipped = 0
    for number, line in _read_lines(path):
        if not line.strip():
            if not skip_empty:
                raise CorpusError(f"{path}: line {number}: empty line")
            skipped += 1
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}: line {number}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise CorpusError(f"{path}: line {number}: expected a JSON object, got {type(obj).__name__}")
        sides = []
        for key in (src_key, tgt_key):
            if key not in obj:
                raise CorpusError(f'{path}: line {number}: missing key "{key}"')
            if not isinstance(obj[key], str):
                raise CorpusError(f'{path}: line {number}: key "{key}" must be a string, got {type(obj[key]).__name__}')
            sides.append(obj[key].strip())
        src, tgt = sides
        problem = _empty_side(src, tgt)
        if problem:
            if not skip_empty:
                raise CorpusError(f"{path}: line {number}: {problem}")
            skipped += 1
            continue
        pairs.append(Pair(src, tgt))
    return _finish(pairs, skipped, path)


def read_sources(path: PathLike) -> list[str]:
    """Source-language sentences without references, from a file in any format the ``files``
    corpus reads, told by its name (``.gz`` or ``.zst`` after it is decompressed): ``.tsv`` (the first
    column), ``.jsonl`` (the ``src`` key), or anything else: plain text, one sentence per line.
    Blank lines are skipped; an empty result is an error naming the file."""
    name = Path(path).name.removesuffix(".gz").removesuffix(".zst")
    sentences: list[str] = []
    for number, line in _read_lines(path):
        text = line
        if name.endswith(".tsv"):
            text = line.split("\t", 1)[0]
        elif name.endswith(".jsonl") and line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}: line {number}: invalid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("src"), str):
                raise CorpusError(f'{path}: line {number}: expected a JSON object with a string under "src"')
            text = obj["src"]
        if text.strip():
            sentences.append(text.strip())
    if not sentences:
        raise CorpusError(f"{path}: no source sentences (an empty file)")
    return sentences


def filter_pairs(
    pairs: Iterable[Pair],
    min_len: int = 1,
    max_len: int | None = 250,
    max_ratio: float | None = 3.0,
) -> tuple[list[Pair], int]:
    """Keep pairs whose sides are ``min_len``..``max_len`` whitespace-separated words long and whose
    longer side is at most ``max_ratio`` times the shorter one; ``None`` turns a limit off.

    Lengths are counted in whitespace tokens, before subword tokenisation, so they are cheap and
    independent of the tokenizer (scripts without spaces, such as Chinese, need a character limit
    instead). Returns ``(kept, number_dropped)``; the order of kept pairs is preserved.
    """
    if min_len < 0 or (max_len is not None and max_len < min_len):
        raise ValueError(f"filter_pairs: need 0 <= min_len <= max_len, got {min_len} and {max_len}")
    if max_ratio is not None and max_ratio < 1:
        raise ValueError(f"filter_pairs: max_ratio must be at least 1, got {max_ratio}")
    kept: list[Pair] = []
    dropped = 0
    for pair in pairs:
        ls, lt = len(pair.src.split()), len(pair.tgt.split())
        short, long_ = (ls, lt) if ls <= lt else (lt, ls)
        if (
            short < min_len
            or (max_len is not None and long_ > max_len)
            or (max_ratio is not None and long_ > max_ratio * max(short, 1))
        ):
            dropped += 1
            continue
        kept.append(pair)
    return kept, dropped


def split_pairs(
    pairs: Sequence[Pair], valid_size: int, test_size: int, seed: int = 1234
) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """Split pairs at random into ``(train, valid, test)`` with exactly ``valid_size`` and ``test_size`` pairs.

    The choice depends only on ``len(pairs)`` and ``seed``; each part keeps the input order,
    so the same corpus and seed always give identical parts.
    """
    n = len(pairs)
    if valid_size < 0 or test_size < 0:
        raise CorpusError(f"split sizes must not be negative (valid_size={valid_size}, test_size={test_size})")
    if valid_size + test_size >= n:
        raise CorpusError(
            f"corpus has {n} pairs: valid_size={valid_size} + test_size={test_size} leaves no training data"
        )
    # A string seed is hashed with SHA-512 by `random`, so it is stable across runs and Python versions.
    order = list(range(n))
    random.Random(f"cvmkd-split:{seed}").shuffle(order)
    valid_idx = sorted(order[:valid_size])
    test_idx = sorted(order[valid_size : valid_size + test_size])
    held_out = set(valid_idx) | set(test_idx)
    train = [p for i, p in enumerate(pairs) if i not in held_out]
    return train, [pairs[i] for i in valid_idx], [pairs[i] for i in test_idx]
