"""The project's own error types: each carries a message a user can act on.

The CLI turns any :class:`CvmkdError` into one line per problem on stderr and exit status 2.
"""

from __future__ import annotations

import errno
import traceback
from pathlib import Path
from typing import Any


class CvmkdError(Exception):
    """Base of every error cvmkd reports to a user as-is (no traceback unless --debug)."""

    exit_status = 2

    def lines(self) -> list[str]:
        """The message as the lines the CLI prints, one problem per line."""
        return [str(self)]


class RecipeError(CvmkdError):
    """A recipe is malformed, has unknown keys, wrong types or out-of-range values.

    Holds every problem found, one per line, each starting with its path.
    """

    def __init__(self, problems: list[str] | str, source: str | None = None) -> None:
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        prefix = f"{self.source}: " if self.source else ""
        return [f"{prefix}{p}" for p in self.problems]


class ComponentError(CvmkdError):
    """A named component is unknown, or two plugins registered the same name."""


class PluginLoadError(CvmkdError):
    """A plugin failed to import or register, or a hook file is invalid."""


class RunDirError(CvmkdError):
    """The run directory exists already, or cannot be written."""


class WriteError(CvmkdError, OSError):
    """A file could not be written (a full disk, a read-only folder): names the file. Still an
    OSError, with its errno and strerror, for code that handles those."""

    def __init__(self, path: Any, error: OSError) -> None:
        super().__init__(error.errno, error.strerror or str(error))
        self.path = str(path)

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.strerror}"

    def lines(self) -> list[str]:
        return [str(self)]


class CheckpointError(CvmkdError):
    """A checkpoint is missing, corrupted or incompatible."""


class ModelError(CvmkdError):
    """A model or its package is incompatible or damaged (for example a size mismatch)."""


class CheckError(CvmkdError):
    """Settings that do not fit together, refused by a ``cvmkd_check`` implementation: reported
    as a recipe error, with the recipe's path, before anything runs."""


class ReportError(CvmkdError):
    """One or more report writers failed; the others' files were still written.

    Holds each failure as ``(reporter, one-line problem)`` and the files that were written. Exit
    status 1, as for any plugin failing: the run directory itself is fine.
    """

    exit_status = 1

    def __init__(self, failures: list[tuple[str, str]], written: list | None = None) -> None:
        self.failures = list(failures)
        self.written = list(written or [])
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [f"reporter {name!r} failed: {problem}" for name, problem in self.failures]


#: the core's event loop: its frames are where hooks are called from, never a hook itself
_LOOP_FILE = str(Path(__file__).with_name("loop.py"))


def one_line(text: Any, limit: int | None = None) -> str:
    """``text`` on one line (whitespace runs, newlines included, become one space), cut to
    ``limit`` characters with an ellipsis when given."""
    line = " ".join(str(text).split())
    return line if limit is None or len(line) <= limit else line[: limit - 1] + "…"


#: operating-system errors that are the machine's state, not a bug: the disk or the quota is
#: full, a folder is read-only or not the user's
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_ACCESS_ERRNOS = {errno.EACCES, errno.EPERM}


def machine_error(exc: BaseException) -> str | None:
    """One line for an operating-system error that names its file and comes from the machine's
    state (a full disk, a read-only folder), wherever it was raised; None for anything else."""
    if not isinstance(exc, OSError) or not exc.filename:
        return None
    if exc.errno in _WRITE_ERRNOS:
        return f"cannot write {exc.filename}: {exc.strerror}"
    if exc.errno in _ACCESS_ERRNOS:
        return f"{exc.filename}: {exc.strerror}"
    return None


def describe_failure(exc: BaseException, limit: int | None = None) -> str:
    """One line for an unexpected exception: the hook and plugin file it came from when a hook
    implementation raised it (the innermost ``cvmkd_*`` frame outside the core's loop), else the
    innermost frame: ``cvmkd_step in /path/hooks.py:7 raised ValueError: boom``,
    ``ValueError: boom (at /path/file.py:12)``."""
    message = one_line(exc, limit)
    what = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
    for frame in reversed(frames):
        if frame.name.startswith("cvmkd_") and frame.filename != _LOOP_FILE:
            return f"{frame.name} in {frame.filename}:{frame.lineno} raised {what}"
    if frames:
        return f"{what} (at {frames[-1].filename}:{frames[-1].lineno})"
    return what
