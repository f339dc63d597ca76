"""The run directory: ``runs/<name>/`` with the resolved recipe, logs, validation, checkpoints,
the model and the reports. An existing run directory is never silently overwritten."""

from __future__ import annotations

from pathlib import Path

from cvmkd_core.checkpoint import CheckpointStore
from cvmkd_core.errors import RunDirError
from cvmkd_core.files import atomic_write_text
from cvmkd_core.recipe import Recipe

SUBDIRS = ("validation", "checkpoints", "model", "reports")
RECIPE_FILE = "recipe.toml"


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
