"""The hook contract: every ``cvmkd_*`` hook a plugin may implement, typed and documented.

Hooks are always called with keyword arguments. An implementation may accept any subset
of a hook's arguments, so new arguments can be added over time without breaking plugins;
arguments are never renamed or removed. These are the loop's own events and registration; a
plugin that owns a phase of its own declares its hooks itself (``cvmkd_addhooks``), as the
validation plugin does for the test evaluation and the phases of finalize it runs.
``docs/hooks.md`` documents every hook, and a test fails when one is missing there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from cvmkd_core.cli import Commands
    from cvmkd_core.recipe import Recipe
    from cvmkd_core.registry import Registrar
    from cvmkd_core.stash import NamedStash
    from cvmkd_core.state import (
        Rollback,
        RunState,
        RunSummary,
        StepResult,
        ValidationRecord,
        ValidationResult,
    )

PROJECT = "cvmkd"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(historic=True)
def cvmkd_addhooks(pluginmanager: pluggy.PluginManager) -> None:
    """Declare a plugin's own hooks: ``pluginmanager.add_hookspecs(module)``, or
    :func:`cvmkd_core.plugins.add_hookspecs` when several modules of one plugin declare the same.

    Historic: called for every plugin as it is registered, before its other hooks are checked,
    as pytest's ``pytest_addhooks``.
    """


@hookspec
def cvmkd_register(register: Registrar) -> None:
    """Register named components.

    Called once for every plugin when the plugin manager is built (and for a plugin added
    later, when it is added). ``register`` offers one method per component kind, each taking a
    name, a factory and optionally an attrs config class that structures the component's own
    recipe section::

        register.detector("strict", StrictDetector, config=StrictConfig)
        register.logger("csv", CsvLogger)

    The kinds are the loop's own (:data:`cvmkd_core.registry.KINDS`) and those plugins declare
    (``register.kind("loss", "a training loss")``), in any order of plugins. Two plugins
    registering the same kind and name is an error naming both; a component of a kind nobody
    declares is an error at start.
    """


@hookspec(historic=True)
def cvmkd_configure(recipe: Recipe, pm: pluggy.PluginManager) -> None:
    """See the fully resolved recipe once, before the run starts.

    Historic: a plugin registered after the call still receives it.
    """


@hookspec
def cvmkd_check(state: RunState) -> None:
    """Check the recipe's settings against each other before any work starts; raise a
    :class:`~cvmkd_core.errors.CvmkdError` naming the problem. Fires before ``cvmkd_setup``, so
    a wrong setting fails before the trainer's set-up, which may take long, starts."""


@hookspec
def cvmkd_setup(state: RunState) -> None:
    """The trainer builds what the run trains: models, data, optimizer, and ``state.batches``.

    Fires before ``cvmkd_run_start``, so every ``cvmkd_run_start`` implementation sees them.
    """


@hookspec
def cvmkd_run_start(state: RunState) -> None:
    """Set up before the first step, after the trainer's ``cvmkd_setup``: open loggers, prepare
    read the models in ``state.objects``."""


@hookspec
def cvmkd_step_start(state: RunState, batch: Any) -> None:
    """Before each training iteration (``cvmkd_step``): schedules that change the model, such as
    switching a training mode on at its step."""


@hookspec(firstresult=True)
def cvmkd_step(state: RunState, batch: Any) -> StepResult | None:
    """Run one training iteration on ``batch`` and return its :class:`StepResult`.

    First result wins. The built-in trainer's implementation is ``trylast``, so a plugin can
    replace the step by returning a result, or wrap it with ``wrapper=True`` (timing, precision,
    clipping). ``state.step`` is the number of iterations completed before this one.
    """


@hookspec
def cvmkd_step_end(state: RunState, result: StepResult) -> None:
    """Observe a finished iteration: logging, schedules, progress. ``state.step`` is updated."""


@hookspec
def cvmkd_validate(state: RunState) -> dict[str, float] | ValidationResult | None:
    """Score the current model; return ``{score_name: value}`` or a :class:`ValidationResult`
    (scores plus details for the record).

    Every implementation's scores and details are merged into one record; the same key from two
    implementations is an error.
    """


@hookspec(firstresult=True)
def cvmkd_check_degradation(
    state: RunState, record: ValidationRecord, history: list[ValidationRecord]
) -> Rollback | None:
    """Decide whether the model degraded; return a :class:`Rollback` to go back, else None.

    ``history`` holds the earlier validation records of this run, oldest first. First result
    wins: the detector selected in the recipe answers.
    """


@hookspec
def cvmkd_checkpoint(state: RunState, record: ValidationRecord | None, payload: NamedStash) -> None:
    """Add state to the checkpoint written after a validation.

    Each stateful plugin stores its ``state_dict()`` under a key of its own
    (``payload[MY_STATE] = ...``, a :class:`~cvmkd_core.stash.StashKey`; its name names the entry
    in the file, and a name two keys share is an error). The
    core writes the payload once, atomically, after every implementation has run. ``record`` is
    the validation the checkpoint follows, or None for the checkpoint written when a run is
    interrupted. Store tensors and plain values only: checkpoints are read back with
    ``torch.load(weights_only=True)``, which refuses arbitrary objects.
    """


@hookspec
def cvmkd_restore(state: RunState, payload: NamedStash, reason: str) -> None:
    """Reload state from a checkpoint payload (``payload[MY_STATE]``, the key it was saved
    under). ``reason`` is ``"resume"`` or ``"rollback"``."""


@hookspec
def cvmkd_event(state: RunState, name: str, data: dict[str, Any]) -> None:
    """Observe a run event: ``run_start``, ``validation``, ``checkpoint``, ``rollback``,
    ``resume``, ``stop``, ``run_end``. Loggers write events beside the step records."""


@hookspec
def cvmkd_run_error(state: RunState, error: BaseException) -> None:
    """Last words before an error (or an interrupt) propagates out of the loop."""


@hookspec
def cvmkd_finalize(state: RunState, summary: RunSummary) -> None:
    """Finish the run: always called, also after a failed run (``summary.status`` says how it
    ended). Implementations add to ``summary.outputs``, ``summary.results`` and ``summary.extra`` (under typed keys),
    may judge the run (``summary.verdicts``), and close what they opened. A plugin that runs
    phases of its own (export, test evaluation...) runs them from a wrapper of this
    hook, so they come before every plain implementation; ``state.phase`` names the one running.
    """


@hookspec
def cvmkd_record_outcome(state: RunState, summary: RunSummary) -> None:
    """The summary is complete (status, verdicts, wall time): record the outcome where a plugin
    keeps it, such as the metadata of the files the run wrote. ``summary.json`` is written next."""


@hookspec
def cvmkd_report(state: RunState, summary: RunSummary) -> None:
    """``summary.json`` is written; write reports from the run's files. A failing reporter
    should warn, not fail the run."""


@hookspec
def cvmkd_register_commands(cli: Commands) -> None:
    """Add ``cvmkd`` subcommands: ``cli.command(name, help, configure, run)``, where
    ``configure(parser)`` adds arguments to an argparse parser and ``run(args)`` returns the exit
    status. Called when the ``cvmkd`` command starts."""
