"""From a recipe file to a ready run: plugins loaded, recipe resolved, run directory prepared."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import attrs

from cvmkd_core.distributed import current_world, leave_to_main
from cvmkd_core.errors import CheckError, RecipeError
from cvmkd_core.loop import Loop, instantiate_components
from cvmkd_core.plugins import Plugins, build_plugins
from cvmkd_core.recipe import (
    RECIPE_HOOK_FILES_KEY,
    Recipe,
    apply_overrides,
    read_recipe_tables,
    structure_recipe,
)
from cvmkd_core.rundir import RECIPE_FILE, RESUME_CHANGES, prepare_run_dir, run_dir_for, run_dir_lock
from cvmkd_core.state import RunState, RunSummary


@attrs.define
class Session:
    recipe: Recipe
    plugins: Plugins
    recipe_path: Path
    #: the hook files given on the command line (``--plugin``), not part of the recipe
    plugin_files: list[Path] = attrs.field(factory=list)


def _hook_files_from(data: dict, recipe_path: Path) -> list[Path]:
    """``run.hook_files`` are read before the recipe is structured: the hooks they hold may
    register the components the recipe names. Paths are relative to the recipe file."""
    files = data.get("run", {}).get(RECIPE_HOOK_FILES_KEY, []) if isinstance(data.get("run"), dict) else []
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        return []  # structuring reports the wrong type with its path
    return [(recipe_path.parent / f) for f in files]


def open_session(
    recipe_path: str | Path,
    overrides: Iterable[str] = (),
    hook_files: Iterable[str | Path] = (),
    *,
    entry_points: bool = True,
) -> Session:
    """Load plugins and the recipe; raise RecipeError/PluginLoadError before anything is written."""
    recipe_path = Path(recipe_path)
    hook_files = list(hook_files)
    data = apply_overrides(read_recipe_tables(recipe_path), list(overrides))
    files = [*_hook_files_from(data, recipe_path), *map(Path, hook_files)]
    plugins = build_plugins(files, entry_points=entry_points)
    try:
        recipe = structure_recipe(data, plugins.registry)
    except RecipeError as exc:
        raise RecipeError(exc.problems, source=str(recipe_path)) from None
    if recipe.run.hook_files:  # kept as absolute paths: the run's recipe.toml copy finds them too
        absolute = [str((recipe_path.parent / f).resolve()) for f in recipe.run.hook_files]
        recipe = attrs.evolve(recipe, run=attrs.evolve(recipe.run, hook_files=absolute))
    return Session(recipe=recipe, plugins=plugins, recipe_path=recipe_path, plugin_files=list(map(Path, hook_files)))


def prepare_state(session: Session, run_dir: Path) -> RunState:
    """The run's state with every selected component built, and ``cvmkd_check`` passed: the
    settings are checked against each other before anything is written."""
    state = RunState(
        recipe=session.recipe,
        pm=session.plugins.pm,
        registry=session.plugins.registry,
        run_dir=run_dir,
        plugins=session.plugins,
    )
    instantiate_components(session.plugins, state)
    try:
        session.plugins.pm.hook.cvmkd_check(state=state)
    except CheckError as exc:  # settings that do not fit together
        raise RecipeError(str(exc), source=str(session.recipe_path)) from None
    return state


def run_session(
    session: Session, run_dir: str | Path | None = None, *, resume: bool = False
) -> tuple[RunSummary, Path]:
    """Run the recipe; returns the summary and the run directory."""
    path = run_dir_for(session.recipe, run_dir)
    world = current_world()  # several processes when torchrun started this one
    state = prepare_state(session, path)
    state.world = world
    if not world.main:  # rank 0 writes the run's files; this rank trains in step with it
        leave_to_main(session.plugins.pm)
        world.barrier()  # the run directory is ready
        return Loop(session.recipe, session.plugins, state).run(resume=resume, checked=True), path
    # one writer per run directory, from before anything is written until the run has ended
    with run_dir_lock(path, create=not resume):
        state.stash[RESUME_CHANGES] = prepare_run_dir(
            path, session.recipe, resume=resume, registry=session.plugins.registry, plugin_files=session.plugin_files
        )
        world.barrier()
        summary = Loop(session.recipe, session.plugins, state).run(resume=resume, checked=True)
    return summary, path


def run_stage(parent: RunState, recipe: Recipe, run_dir: Path) -> RunSummary:
    """Run ``recipe`` as a stage of ``parent`` (a model trained first, inside the run) through the same
    loop and the same plugins, with fresh component instances, in ``run_dir``.

    An interrupted stage whose folder holds checkpoints is resumed; one without is started anew.
    """
    plugins = parent.plugins.fresh() if parent.plugins is not None else build_plugins()
    resume = (run_dir / "checkpoints" / "manifest.json").is_file() and (run_dir / RECIPE_FILE).is_file()
    if not resume and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    prepare_run_dir(run_dir, recipe, resume=resume, registry=plugins.registry)
    state = RunState(recipe=recipe, pm=plugins.pm, registry=plugins.registry, run_dir=run_dir, plugins=plugins)
    instantiate_components(plugins, state)
    return Loop(recipe, plugins, state).run(resume=resume)


__all__ = ["Session", "open_session", "prepare_state", "run_session", "run_stage", "RECIPE_FILE"]
