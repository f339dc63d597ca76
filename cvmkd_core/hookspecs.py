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
    from cvmkd_core.cli import Commands
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
def cvmkd_check(state: RunState) -> None:
    """Check the recipe's settings against each other before any work starts; raise a
    :class:`~cvmkd_core.errors.CvmkdError` naming the problem. Fires before ``cvmkd_setup``, so
    a wrong setting fails before the trainer trains a teacher, say."""


@hookspec
def cvmkd_setup(state: RunState) -> None:
    """The trainer builds what the run trains: models, data, optimizer, and ``state.batches``.

    Fires before ``cvmkd_run_start``, so every ``cvmkd_run_start`` implementation sees them.
    """


@hookspec
def cvmkd_run_start(state: RunState) -> None:
    """Set up before the first step, after the trainer's ``cvmkd_setup``: open loggers, prepare
    quantization-aware training, read the models in ``state.objects``."""


@hookspec
def cvmkd_step_start(state: RunState, batch: Any) -> None:
    """Before each training iteration (``cvmkd_step``): schedules that change the model, such as
    switching quantization-aware training on at its step."""


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
def cvmkd_export(state: RunState, summary: RunSummary) -> None:
    """Finalize, phase 1 of 6: write the trained model (a model package), and record it in
    ``summary.outputs``. Finalize phases always fire in this order, also after a failed run
    (``summary.status`` says how it ended): ``cvmkd_export``, ``cvmkd_evaluate``,
    ``cvmkd_quantize``, ``cvmkd_finalize``, ``cvmkd_record_outcome``, then ``summary.json`` is
    written, then ``cvmkd_report``."""


@hookspec
def cvmkd_evaluate(state: RunState, summary: RunSummary) -> None:
    """Finalize, phase 2: score the final models on the test split and set
    ``summary.evaluation`` (a :class:`~cvmkd_core.state.TestEvaluation`)."""


@hookspec
def cvmkd_quantize(state: RunState, summary: RunSummary) -> None:
    """Finalize, phase 3: quantize the final student with the recipe's ``[[quantize]]`` and
    append every variant to ``summary.quantized``."""


@hookspec
def cvmkd_finalize(state: RunState, summary: RunSummary) -> None:
    """Finalize, phase 4: judge and finish the run: the retention gate sets ``summary.gate``
    (a :class:`~cvmkd_core.state.GateVerdict`); loggers close.

    Implementations may add entries to ``summary.outputs`` and ``summary.extra``.
    """


@hookspec
def cvmkd_record_outcome(state: RunState, summary: RunSummary) -> None:
    """Finalize, phase 5: the summary is complete (status, gate, wall time): record the outcome
    where a plugin keeps it, such as the metadata of every model package."""


@hookspec
def cvmkd_report(state: RunState, summary: RunSummary) -> None:
    """Finalize, phase 6: ``summary.json`` is written; write reports from the run's files. A
    failing reporter should warn, not fail the run."""


@hookspec
def cvmkd_register_commands(cli: Commands) -> None:
    """Add ``cvmkd`` subcommands: ``cli.command(name, help, configure, run)``, where
    ``configure(parser)`` adds arguments to an argparse parser and ``run(args)`` returns the exit
    status. Called when the ``cvmkd`` command starts."""
