"""Runs the ``cvmkd`` command with one fault injected at one write: the harness of
tests/test_faults.py (``python tests/fault_injector.py run RECIPE ...``).

Set by the environment:

- ``CVMKD_FAULT_ROOT``: only writes under this folder count (the test's folder).
- ``CVMKD_FAULT``: ``trace``, ``kill``, ``full`` or ``readonly``.
- ``CVMKD_FAULT_AT``: the write that fails, counted from 1 (``kill`` and ``full`` count every
  write; ``readonly`` counts the opens, folder creations and renames only).
- ``CVMKD_FAULT_TRACE``: with ``trace``, the file each write is appended to, one JSON line each.

A write is: opening a file for writing, creating a folder, a rename (``os.replace``,
``os.rename``), or one ``write`` call on a file opened for writing. At the chosen write,
``kill`` writes half of a ``write`` call's data to the disk and sends the process SIGKILL, with
no clean-up of any kind; ``full`` writes half and fails with ENOSPC, as a full disk does; and
``readonly`` fails the open, folder creation or rename with EROFS, as a read-only folder does.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import signal
import sys
from typing import Any

ROOT = os.path.realpath(os.environ.get("CVMKD_FAULT_ROOT", os.getcwd()))
MODE = os.environ.get("CVMKD_FAULT", "trace")
AT = int(os.environ.get("CVMKD_FAULT_AT", "0"))
TRACE = os.environ.get("CVMKD_FAULT_TRACE", "")

_open = builtins.open
_os_open = os.open
_replace = os.replace
_rename = os.rename
_mkdir = os.mkdir
_fd_paths: dict[int, str] = {}
_writes = 0  # every write
_structural = 0  # opens, folder creations, renames


def _under_root(path: Any) -> str | None:
    if isinstance(path, int):
        return _fd_paths.get(path)
    try:
        full = os.path.realpath(os.fspath(path))
    except TypeError:
        return None
    if full == ROOT or full.startswith(ROOT + os.sep):
        return os.path.relpath(full, ROOT)
    return None


def _fail(error: int, path: str) -> None:
    raise OSError(error, os.strerror(error), os.path.join(ROOT, path))


def _event(op: str, path: str | None, partial: Any = None) -> None:
    """Counts one write under the root; at the chosen one, the fault."""
    global _writes, _structural
    if path is None:
        return
    _writes += 1
    if op != "write":
        _structural += 1
    if MODE == "trace":
        if TRACE:
            with _open(TRACE, "a", encoding="utf-8") as handle:
                handle.write(
                    json.dumps({"n": _writes, "s": _structural if op != "write" else 0, "op": op, "path": path}) + "\n"
                )
        return
    if MODE == "readonly":
        if op != "write" and _structural == AT:
            _fail(errno.EROFS, path)
        return
    if _writes != AT:
        return
    if partial is not None:
        partial()
    if MODE == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if MODE == "full":
        _fail(errno.ENOSPC, path)


class _Counted:
    """A file opened for writing whose every ``write`` call counts."""

    def __init__(self, handle: Any, path: str) -> None:
        self.__dict__["_handle"] = handle
        self.__dict__["_path"] = path

    def write(self, data: Any) -> int:
        def half() -> None:
            self._handle.write(data[: len(data) // 2])
            try:
                self._handle.flush()
            except (OSError, ValueError):
                pass

        _event("write", self._path, half if len(data) > 1 else None)
        return self._handle.write(data)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._handle, name, value)

    def __enter__(self) -> _Counted:
        self._handle.__enter__()
        return self

    def __exit__(self, *exc: Any) -> Any:
        return self._handle.__exit__(*exc)

    def __iter__(self) -> Any:
        return iter(self._handle)


def _writing(mode: str) -> bool:
    return any(c in mode for c in "wax+")


def _patched_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
    path = _under_root(file)
    if path is None or not _writing(mode):
        return _open(file, mode, *args, **kwargs)
    if not isinstance(file, int):  # an fd's open was counted by os.open
        _event("open", path)
    return _Counted(_open(file, mode, *args, **kwargs), path)


def _patched_os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
    relative = _under_root(path)
    writing = flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC)
    if relative is not None and writing:
        _event("open", relative)
    fd = _os_open(path, flags, *args, **kwargs)
    if relative is not None and writing:
        _fd_paths[fd] = relative
    return fd


def _patched_replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
    _event("rename", _under_root(dst))
    _replace(src, dst, *args, **kwargs)


def _patched_rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
    _event("rename", _under_root(dst))
    _rename(src, dst, *args, **kwargs)


def _patched_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
    if not os.path.isdir(path):
        _event("mkdir", _under_root(path))
    _mkdir(path, *args, **kwargs)


def install() -> None:
    builtins.open = _patched_open
    io.open = _patched_open
    os.open = _patched_os_open
    os.replace = _patched_replace
    os.rename = _patched_rename
    os.mkdir = _patched_mkdir


if __name__ == "__main__":
    install()
    from cvmkd_core.cli import main

    sys.exit(main(sys.argv[1:]))
