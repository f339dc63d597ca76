"""The hook contract: every ``cvmkd_*`` hook a plugin may implement, typed and documented.

Hooks are always called with keyword arguments. An implementation may accept any subset
of a hook's arguments, so new arguments can be added over time without breaking plugins;
arguments are never renamed or removed. ``docs/hooks.md`` documents every hook below, and a
test fails when one is missing there.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from cvmkd_core.recipe import Recipe
    from cvmkd_core.registry import Registrar
    from cvmkd_core.state import (
        Rollback,
        RunState,
        RunSummary,
        StepResult,
        TranslationSample,
        ValidationRecord,
        ValidationResult,
    )

PROJECT = "cvmkd"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def cvmkd_register(register: Registrar) -> None:
    """Register named components.

    Called once for every plugin when the plugin manager is built (and for a plugin added
    later, when it is added). ``register`` offers one method per component kind, each taking a
    name, a factory and optionally an attrs config class that structures the component's own
    recipe section::

        register.loss("kd", KDLoss, config=KDConfig)
        register.metric("bleu", Bleu, config=BleuConfig)

    Kinds: ``loss``, ``metric``, ``detector``, ``quantizer``, ``reporter``, ``corpus``,
    ``model``, ``logger``, ``trainer``. Two plugins registering the same kind and name is an
    error naming both.
    """


@hookspec(historic=True)
def cvmkd_configure(recipe: Recipe, pm: pluggy.PluginManager) -> None:
    """See the fully resolved recipe once, before the run starts.

    Historic: a plugin registered after the call still receives it.
    """


@hookspec
def cvmkd_run_start(state: RunState) -> None:
    """Set up before the first step: build models and data, open loggers, prepare QAT.

    The built-in trainer runs ``tryfirst`` so every other implementation sees the
    models, the optimizer and the batch stream in ``state``.
    """


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
    """Score the current student; return ``{score_name: value}`` or a :class:`ValidationResult`
    (scores plus details for the record).

    Every implementation's scores and details are merged into one record; the same key from two
    implementations is an error. The built-in validation translates the held-out set, scores it
    with every selected metric, compares with the teacher and the previous validation, and asks
    ``cvmkd_analyze`` for an error analysis.
    """


@hookspec
def cvmkd_analyze(state: RunState, sample: TranslationSample) -> dict[str, Any] | None:
    """Analyse one validation's translations; return ``{name: findings}`` (JSON-serialisable).

    Called by the built-in validation after scoring. ``sample`` holds the sources, references and
    hypotheses, and the previous validation's hypotheses when there was one. Each
    implementation's findings are stored under ``details["analysis"]`` in the record; the same
    name from two implementations is an error. The built-in ``cvmkd.analysis`` returns
    ``{"errors": ...}`` (length, worst sentences, loops, copies, empty output, regressions).
    """


@hookspec(firstresult=True)
def cvmkd_check_degradation(
    state: RunState, record: ValidationRecord, history: list[ValidationRecord]
) -> Rollback | None:
    """Decide whether the student degraded; return a :class:`Rollback` to go back, else None.

    ``history`` holds the earlier validation records of this run, oldest first. First result
    wins: the detector selected in the recipe answers.
    """


@hookspec
def cvmkd_checkpoint(state: RunState, record: ValidationRecord | None, payload: dict[str, Any]) -> None:
    """Add state to the checkpoint written after a validation.

    Each stateful plugin stores its ``state_dict()`` under its own key in ``payload``. The
    core writes the payload once, atomically, after every implementation has run. ``record`` is
    the validation the checkpoint follows, or None for the checkpoint written when a run is
    interrupted. Store tensors and plain values only: checkpoints are read back with
    ``torch.load(weights_only=True)``, which refuses arbitrary objects.
    """


@hookspec
def cvmkd_restore(state: RunState, payload: dict[str, Any], reason: str) -> None:
    """Reload state from a checkpoint payload. ``reason`` is ``"resume"`` or ``"rollback"``."""


@hookspec
def cvmkd_event(state: RunState, name: str, data: dict[str, Any]) -> None:
    """Observe a run event: ``run_start``, ``validation``, ``checkpoint``, ``rollback``,
    ``resume``, ``stop``, ``run_end``. Loggers write events beside the step records."""


@hookspec
def cvmkd_run_error(state: RunState, error: BaseException) -> None:
    """Last words before an error (or an interrupt) propagates out of the loop."""


@hookspec
def cvmkd_finalize(state: RunState, summary: RunSummary) -> None:
    """Finish the run: quantize, export the model, write reports.

    Always called, also when the run failed (``summary.status`` says how it ended).
    Implementations may add entries to ``summary.outputs`` and ``summary.extra``.
    """
