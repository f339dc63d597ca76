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


def open_jsonl(path: Path) -> IO[str]:
    """Open a JSON-lines file to append to. A last line without its newline is the torn record
    of a process killed while writing it: it is cut off first (it never was a record), so that
    the next record starts a line of its own instead of damaging that one for every reader."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "rb+") as handle:
            end = handle.seek(0, os.SEEK_END)
            keep = end
            while keep > 0:
                start = max(0, keep - 65536)
                handle.seek(start)
                block = handle.read(keep - start)
                if end == keep and block.endswith(b"\n"):
                    break  # whole: nothing to cut
                newline = block.rfind(b"\n")
                if newline >= 0:
                    keep = start + newline + 1
                    break
                keep = start
            if keep < end:
                handle.truncate(keep)
    except FileNotFoundError:
        pass
    return open(path, "a", encoding="utf-8")


def append_jsonl(handle: IO[str], obj: Any) -> None:
    """One JSON object per line, flushed so ``cvmkd monitor`` sees it at once."""
    handle.write(json.dumps(obj, default=str) + "\n")
    handle.flush()
