"""Crash-safe file writing: temporary file, fsync, rename, so a reader never sees half a file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(fileobj)``; on any error the old file is left untouched.
    An operating-system error (a full disk, a read-only folder) is raised as a
    :class:`~cvmkd_core.errors.WriteError` that names ``path``, not the temporary file."""
    from cvmkd_core.errors import WriteError

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except WriteError:
        raise
    except OSError as exc:
        raise WriteError(path, exc) from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise WriteError(path, exc) from exc
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    def write(handle: IO[bytes]) -> None:
        handle.write(data)

    atomic_write(path, write)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def append_jsonl(handle: IO[str], obj: Any) -> None:
    """One JSON object per line, flushed so ``cvmkd monitor`` sees it at once."""
    handle.write(json.dumps(obj, default=str) + "\n")
    handle.flush()


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
    from cvmkd_core.errors import CacheError

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
