"""The run directory: ``runs/<name>/`` with the resolved recipe, logs, validation, checkpoints,
the model and the reports. An existing run directory is never silently overwritten."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from cvmkd_core.checkpoint import CheckpointStore
from cvmkd_core.errors import RunDirError
from cvmkd_core.files import atomic_write_text
from cvmkd_core.recipe import Recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

SUBDIRS = ("validation", "checkpoints", "model", "reports")
RECIPE_FILE = "recipe.toml"
SUMMARY_FILE = "summary.json"
HISTORY_FILE = "validation/history.jsonl"
DEFAULT_TRAIN_LOG = "train.jsonl"


class RunFiles:
    """Where a run directory keeps each file: the one layout every reader of runs (reports,
    ``cvmkd monitor``, ``cvmkd compare``) goes through. The step log is where the recipe's
    ``jsonl`` logger wrote it; a stage (the teacher trained in the run) is a run of its own."""

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

    def stage(self, name: str = "teacher") -> RunFiles:
        return RunFiles(self.path / name)


def run_dir_for(recipe: Recipe, override: str | Path | None = None) -> Path:
    if override is not None:
        return Path(override)
    return Path(recipe.run.output_dir) / recipe.run.name


def prepare_run_dir(path: Path, recipe: Recipe, *, resume: bool = False) -> Path:
    """Create the run directory and write the resolved recipe (defaults made explicit).

    Refuses an existing, non-empty directory unless ``resume`` is set; with ``resume`` the
    directory must exist and hold a run whose checkpoints (if any yet) include a usable one.
    """
    if resume:
        if not path.is_dir():
            raise RunDirError(f"cannot resume: no run directory {path}")
        if not (path / RECIPE_FILE).is_file():
            raise RunDirError(f"cannot resume: {path} holds no run ({RECIPE_FILE} is missing)")
        # a damaged manifest, or no usable checkpoint, is refused before the run writes anything
        CheckpointStore(path / "checkpoints").verify("last")
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
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
    return path
