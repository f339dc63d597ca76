"""Caches of the translation stack (tokenizers, teacher outputs, teacher translations) and the
record of what each cached file held when it was written: ``<file>.sha256`` beside it."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from cvmkd_core.errors import CvmkdError
from cvmkd_core.files import atomic_write_text, sha256_file

log = logging.getLogger("cvmkd")


class CacheError(CvmkdError):
    """A cached artifact (tokenizer, teacher outputs or translations) no longer matches the
    sha256 recorded when it was written; deleting it rebuilds it."""


#: beside every cached file: the sha256 of its content, written when the file was
DIGEST_SUFFIX = ".sha256"


def digest_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + DIGEST_SUFFIX)


def record_digest(path: str | Path) -> str:
    """Record the sha256 of ``path`` beside it (``<name>.sha256``), after ``path`` was written."""
    digest = sha256_file(path)
    atomic_write_text(digest_path(path), digest + "\n")
    return digest


def verified_cache_file(path: str | Path, what: str) -> bool:
    """Whether a cached file can be used: True when it exists and matches the sha256 recorded when
    it was written; False when there is no entry to use (no file, or a file without a recorded
    sha256, written by an older cvmkd or cut short before it: the caller rebuilds it). A file that
    does not match its record raises :class:`CacheError`, which names it: it was edited or damaged,
    and using it would silently change the run's results."""
    path = Path(path)
    record = digest_path(path)
    if not path.is_file() or not record.is_file():
        return False
    try:
        expected = record.read_text(encoding="utf-8").strip()
        found = sha256_file(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise CacheError(f"{what} {path} is unreadable ({exc}); delete it and it is rebuilt") from None
    if found != expected:
        raise CacheError(
            f"{what} {path} does not match the sha256 recorded when it was written (edited or damaged); "
            "delete it and it is rebuilt"
        )
    return True


#: beside a large cached file: its size, modification time, inode and sha256 when its content was
#: last checked against its record, so that a file checked once is not hashed again at every start
CHECKED_SUFFIX = ".checked"


def _identity(path: Path, digest: str) -> str:
    stat = path.stat()
    return f"{stat.st_size} {stat.st_mtime_ns} {stat.st_ino} {digest}\n"


def mark_checked(path: str | Path, digest: str) -> None:
    """Note that ``path`` holds the content its record names (it was just written, or hashed)."""
    path = Path(path)
    try:
        atomic_write_text(path.with_name(path.name + CHECKED_SUFFIX), _identity(path, digest))
    except OSError as exc:  # a full disk, a read-only cache: the file is hashed again next time, no more
        log.warning("%s; %s is hashed again when it is next read", exc, path.name)


def verified_once(path: str | Path, what: str) -> bool:
    """:func:`verified_cache_file` for files of gigabytes: the content is hashed when the file is
    written and the first time it is read; afterwards the file is trusted while its size,
    modification time and inode are those it had then (anything that rewrites it changes them)."""
    path = Path(path)
    record, checked = digest_path(path), path.with_name(path.name + CHECKED_SUFFIX)
    if path.is_file() and record.is_file() and checked.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            expected = record.read_text(encoding="utf-8").strip()
            if checked.read_text(encoding="utf-8") == _identity(path, expected):
                return True
    if not verified_cache_file(path, what):
        return False
    mark_checked(path, record.read_text(encoding="utf-8").strip())
    return True
