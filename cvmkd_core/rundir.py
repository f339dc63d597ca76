"""The run directory: ``runs/<name>/`` with the resolved recipe, logs, validation, checkpoints,
the model and the reports. An existing run directory is never silently overwritten."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cvmkd_core.checkpoint import CheckpointStore
from cvmkd_core.errors import RunDirError
from cvmkd_core.files import atomic_write_text
from cvmkd_core.recipe import Recipe
from cvmkd_core.stash import StashKey

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SUBDIRS = ("validation", "checkpoints", "model", "reports")
RECIPE_FILE = "recipe.toml"
SUMMARY_FILE = "summary.json"
HISTORY_FILE = "validation/history.jsonl"
DEFAULT_TRAIN_LOG = "train.jsonl"
LOCK_FILE = ".lock"
#: the recipe keys a resumed run changed, ``{key: (before, after)}`` (``prepare_run_dir``)
RESUME_CHANGES: StashKey[dict[str, tuple[Any, Any]]] = StashKey("resume_changes")
#: recipe keys a resumed run may change (``--set`` on ``--resume``): where the run ends and what it
#: runs on. Every other difference from the run's recipe.toml is refused.
CHANGEABLE_ON_RESUME = ("run.steps", "run.device")


class RunFiles:
    """Where a run directory keeps each file: the one layout every reader of runs (reports,
    ``cvmkd monitor``, ``cvmkd compare``) goes through. The step log is where the recipe's
    ``jsonl`` logger wrote it; a stage (a model the run trains first) is a run of its own."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.recipe_file = self.path / RECIPE_FILE
        self.summary_file = self.path / SUMMARY_FILE
        self.history_file = self.path / HISTORY_FILE

    def recipe(self) -> dict[str, Any] | None:
        """The resolved recipe as tables; None while it is missing or unreadable."""
        try:
            return tomllib.loads(self.recipe_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            return None

    def train_log(self, recipe: dict[str, Any] | None = None) -> Path:
        """The JSONL logger's file (``[[loggers]] name = "jsonl", file = ...``), else train.jsonl."""
        loggers = (recipe if recipe is not None else self.recipe() or {}).get("loggers")
        for logger in loggers if isinstance(loggers, list) else []:
            if isinstance(logger, dict) and logger.get("name") == "jsonl" and isinstance(logger.get("file"), str):
                return self.path / logger["file"]
        return self.path / DEFAULT_TRAIN_LOG


def run_dir_for(recipe: Recipe, override: str | Path | None = None) -> Path:
    if override is not None:
        return Path(override)
    return Path(recipe.run.output_dir) / recipe.run.name


@contextlib.contextmanager
def run_dir_lock(path: Path, *, create: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the run directory (``.lock``, holding the writer's PID) for the
    whole run: a second ``cvmkd run`` on the same folder, fresh or ``--resume``, is refused.
    The operating system releases the lock when its process ends, however it ends, so a lock
    left by a killed run never blocks the next one."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on Linux or macOS: no locking
        yield
        return
    if not path.is_dir() and not create:
        yield  # nothing to lock: the caller reports the missing directory
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK_FILE, "a+", encoding="utf-8")
    except OSError as exc:
        raise RunDirError(f"cannot write run directory {path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunDirError(
                f"run directory {path} is in use by {holder}: wait for that run to end or stop it "
                "(Ctrl-C or kill -TERM), then --resume"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing releases the lock


def _flatten(tables: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tables, dict):
        flat: dict[str, Any] = {}
        for key, value in tables.items():
            flat.update(_flatten(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
            if isinstance(value, dict) and not value:
                flat[f"{prefix}{key}"] = {}
        return flat
    return {prefix.rstrip("."): tables}


def recipe_changes(path: Path, recipe: Recipe, registry: Any = None) -> dict[str, tuple[Any, Any]]:
    """The keys whose values differ between the run's ``recipe.toml`` and ``recipe``:
    ``{key: (the run's value, the new value)}``; a key only one side has maps to None there.

    With ``registry``, the run's recipe is first read again by the installed cvmkd, so that a
    setting added since the run started, at its default, is no difference (the run behaved as
    that default does); one it cannot read any more is compared as it is."""
    from cvmkd_core.errors import RecipeError
    from cvmkd_core.recipe import structure_recipe

    try:
        stored = tomllib.loads((path / RECIPE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RunDirError(f"cannot resume: {path / RECIPE_FILE} is unreadable ({exc})") from None
    if registry is not None:
        try:
            stored = tomllib.loads(structure_recipe(stored, registry).to_toml())
        except RecipeError:
            pass
    before, after = _flatten(stored), _flatten(tomllib.loads(recipe.to_toml()))
    return {
        key: (before.get(key), after.get(key))
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    }


def _shown(value: Any) -> str:
    text = "(unset)" if value is None else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_resume_recipe(
    path: Path, recipe: Recipe, registry: Any = None, plugin_files: Sequence[str | Path] = ()
) -> dict[str, tuple[Any, Any]]:
    """A resumed run continues the recipe it was started with. Differences in the keys of
    :data:`CHANGEABLE_ON_RESUME` are allowed and returned; any other is refused, in one line
    that gives the command resuming with the run's own recipe (and the ``--plugin`` files)."""
    import shlex

    changes = recipe_changes(path, recipe, registry)
    refused = {k: v for k, v in changes.items() if k not in CHANGEABLE_ON_RESUME}
    if refused:
        shown = [f"{k} {_shown(a)} -> {_shown(b)}" for k, (a, b) in list(refused.items())[:4]]
        more = f" and {len(refused) - 4} more" if len(refused) > 4 else ""
        plugins = "".join(f" --plugin {shlex.quote(str(f))}" for f in plugin_files)
        raise RunDirError(
            f"cannot resume {path}: the recipe differs from the run's {RECIPE_FILE} in "
            f"{', '.join(shown)}{more}; resume with the run's own recipe "
            f"(cvmkd run {shlex.quote(str(path / RECIPE_FILE))}{plugins} --resume --run-dir {shlex.quote(str(path))}), "
            f"start a new run, or change only {' or '.join(CHANGEABLE_ON_RESUME)} on resume"
        )
    return changes


def _never_started(path: Path) -> bool:
    """Whether a run folder holds nothing a run wrote: its lock, its empty folders and a
    temporary file at most, what a run stopped before it wrote its recipe leaves (a new run may
    start there; ``--resume`` has nothing to resume)."""
    for entry in path.rglob("*"):
        if entry.is_dir() or entry.name == LOCK_FILE:
            continue
        if not (entry.name.startswith(".") and entry.name.endswith(".tmp")):
            return False
    return True


def prepare_run_dir(
    path: Path, recipe: Recipe, *, resume: bool = False, registry: Any = None, plugin_files: Sequence[str | Path] = ()
) -> dict[str, tuple[Any, Any]]:
    """Create the run directory and write the resolved recipe (defaults made explicit).

    Refuses an existing, non-empty directory unless ``resume`` is set; with ``resume`` the
    directory must exist and hold a run whose checkpoints (if any yet) include a usable one.
    """
    if resume:
        if not path.is_dir():
            raise RunDirError(f"cannot resume: no run directory {path}")
        if not (path / RECIPE_FILE).is_file():
            hint = "; it was stopped before it began: run it again without --resume" if _never_started(path) else ""
            raise RunDirError(f"cannot resume: {path} holds no run ({RECIPE_FILE} is missing){hint}")
        changes = check_resume_recipe(path, recipe, registry, plugin_files)
        # a damaged manifest, or no usable checkpoint, is refused before the run writes anything
        CheckpointStore(path / "checkpoints").verify("last")
        if changes:  # the run's recipe.toml stays the recipe the run follows
            atomic_write_text(path / RECIPE_FILE, recipe.to_toml())
        return changes
    if path.exists() and (not path.is_dir() or not _never_started(path)):
        raise RunDirError(
            f"run directory {path} exists already; choose another run.name or --run-dir, "
            "or pass --resume to continue that run"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
        for sub in SUBDIRS:
            (path / sub).mkdir(exist_ok=True)
        atomic_write_text(path / RECIPE_FILE, recipe.to_toml())
    except OSError as exc:
        raise RunDirError(f"cannot write run directory {path}: {exc.strerror or exc}") from None
    return {}
