"""The run's mutable state, owned by the loop, and the small frozen records passed between hooks."""

from __future__ import annotations

import enum
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from cvmkd_core.distributed import SINGLE, World
from cvmkd_core.stash import NamedStash, Stash, StashKey

T = TypeVar("T")

if TYPE_CHECKING:
    import pluggy

    from cvmkd_core.recipe import Recipe
    from cvmkd_core.registry import Registry


class Event(str, enum.Enum):
    """The run events the loop emits (``cvmkd_event``); each is written to the step log as its
    string value, so ``event == "validation"`` and JSON keep working."""

    RUN_START = "run_start"
    RESUME = "resume"
    VALIDATION = "validation"
    CHECKPOINT = "checkpoint"
    ROLLBACK = "rollback"
    ROLLBACK_SKIPPED = "rollback_skipped"
    RUN_END = "run_end"

    def __str__(self) -> str:
        return self.value


@attrs.frozen
class Selected:
    """One component the recipe selected, with a label that names it in outputs: its name, or
    ``name-<index>`` when several entries of a list share the name (``nbit-3``)."""

    label: str
    path: str
    name: str
    component: Any


@attrs.frozen
class StepResult:
    """What one training iteration produced. ``metrics`` holds whatever the trainer logs
    (kd and ce losses, token accuracy, learning rate, gradient norm, tokens/s...)."""

    loss: float
    metrics: dict[str, float] = attrs.field(factory=dict)


@attrs.frozen
class ValidationResult:
    """What a ``cvmkd_validate`` implementation may return instead of a bare score dict:
    the scores, plus details stored in the record (deltas, retention, significance, analysis...).
    """

    scores: dict[str, float]
    details: dict[str, Any] = attrs.field(factory=dict)
    #: the figure the run's checkpoints are ranked by (higher is better; the best checkpoint is
    #: the highest); one implementation at most gives it
    rank: float | None = None


@attrs.frozen
class ValidationRecord:
    """One validation: where in the run it happened, its scores, and the details that explain
    them (see ``docs/validation.md`` for the keys the built-in validation writes)."""

    step: int
    iteration: int
    scores: dict[str, float]
    seconds: float = 0.0
    details: dict[str, Any] = attrs.field(factory=dict)
    rolled_back: bool = False

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Rollback:
    """A detector's decision to go back to an earlier checkpoint.

    ``target`` is ``"best"`` (the best-scoring checkpoint) or ``"last"`` (the last one written).
    ``lr_factor`` multiplies the learning rate after restoring, so the run changes course.
    A detector returns it from ``cvmkd_check_degradation``, or hands it to
    :meth:`RunState.request_rollback` from any hook (a non-finite loss between validations).
    """

    reason: str
    target: str = attrs.field(default="best", validator=attrs.validators.in_(("best", "last")))
    lr_factor: float = 1.0
    #: restore, then end the run (``max_rollbacks`` reached): the run stops with the restored weights
    stop: bool = False


@attrs.frozen
class Verdict:
    """A plugin's judgement of the finished run. ``cvmkd run`` prints the line of a failed one on
    stderr; a failed, enforced verdict makes the run exit with status 3, every output kept."""

    line: str
    failed: bool
    #: False: a failed verdict is reported but does not fail the run (exit status 0)
    enforced: bool = True


# --- what the loop writes into ``summary.extra`` (each plugin declares its own keys) -------------

#: why the run stopped before its last step (a detector, an interrupt)
STOP_REASON: StashKey[str] = StashKey("stop_reason")
#: the signal that interrupted the run (SIGINT, SIGTERM)
SIGNAL: StashKey[str] = StashKey("signal")
#: how many validations ran, their seconds and their share of the wall time
VALIDATION_TIME: StashKey[dict[str, Any]] = StashKey("validation")
WORLD_SIZE: StashKey[int] = StashKey("world_size")
#: the processes of a ``torchrun`` run (``World.to_dict``)
DISTRIBUTED: StashKey[dict[str, Any]] = StashKey("distributed")
#: seconds of this invocation alone (``wall_seconds`` adds earlier ones of a resumed run)
INVOCATION_SECONDS: StashKey[float] = StashKey("invocation_seconds")
#: the finalize phase that failed (``export``, ``evaluate``...)
FAILED_IN: StashKey[str] = StashKey("failed_in")
#: a finalize failure after the run had failed already
FINALIZE_ERROR: StashKey[str] = StashKey("finalize_error")
#: the loop's own part of a checkpoint's payload: step, counters, history, random state
CORE_STATE: StashKey[dict[str, Any]] = StashKey("core")


@attrs.define
class RunSummary:
    """How a run ended. Written to ``summary.json``; finalize implementations may add to it."""

    status: str = "running"  # running | completed | stopped | interrupted | failed
    final_step: int = 0
    iterations_executed: int = 0
    rollbacks: int = 0
    wall_seconds: float = 0.0
    error: str | None = None
    last_validation: dict[str, Any] | None = None
    outputs: dict[str, str] = attrs.field(factory=dict)
    #: what plugins add under keys of their own (``summary.results[KEY]``), written to
    #: ``summary.json`` under each key's name, between ``outputs`` and ``extra``
    results: NamedStash = attrs.field(factory=NamedStash)
    #: what plugins record about how the run went, under keys of their own, written to
    #: ``summary.json`` under ``extra``
    extra: NamedStash = attrs.field(factory=NamedStash)
    #: the plugins' judgements of the finished run (``cvmkd run`` prints and acts on them)
    verdicts: list[Verdict] = attrs.field(factory=list)

    def __getitem__(self, key: StashKey[T]) -> T:
        return self.results[key]

    def __setitem__(self, key: StashKey[T], value: T) -> None:
        self.results[key] = value

    def to_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self, filter=lambda a, _: a.name not in ("results", "extra", "verdicts"))
        for name, value in self.results.to_dict().items():
            out[name] = attrs.asdict(value) if attrs.has(type(value)) else value
        out["extra"] = self.extra.to_dict()
        return out


@attrs.define(eq=False)
class RunState:
    """Everything a hook may need about the run in progress.

    ``step`` counts the iterations the current weights have been trained for: a rollback sets it
    back to the restored checkpoint's step. ``iterations`` counts every iteration executed,
    rolled back ones included, and never decreases.
    """

    recipe: Recipe
    pm: pluggy.PluginManager
    registry: Registry
    run_dir: Path
    #: the Plugins object that built ``pm``; a stage builds a fresh one from it
    plugins: Any = None
    step: int = 0
    iterations: int = 0
    rollbacks: int = 0
    #: multiplies the trainer's learning rate; a rollback may lower it to change course
    lr_scale: float = 1.0
    stop_requested: bool = False
    stop_reason: str | None = None
    #: set by the first Ctrl-C: the loop finishes the step, writes a checkpoint and stops
    interrupted: bool = False
    #: the signal that interrupted the run (SIGINT, SIGTERM), if one did
    interrupted_by: str | None = None
    #: training is over and the loop finalizes
    finalizing: bool = False
    #: the finalize phase in progress (``finalize``, or a phase a plugin runs in it: ``export``...),
    #: named in the summary when it fails
    phase: str = ""
    #: a rollback asked for between validations; the loop performs it after the current step
    pending_rollback: Rollback | None = None
    history: list[ValidationRecord] = attrs.field(factory=list)
    #: wall-clock seconds spent in validation so far (its share of the run is logged)
    validation_seconds: float = 0.0
    #: instantiated components by recipe path ("guard", "reports[0]", ...)
    components: dict[str, Any] = attrs.field(factory=dict)
    #: the stream of training batches; the trainer sets it in cvmkd_run_start
    batches: Iterator[Any] | None = None
    #: the recipe's trainer component (the one that performs the step); plugins that work with
    #: it check it against the contract they need (an ABC or Protocol of the plugin that owns it)
    trainer: Any = None
    #: the trainer's objects (models, optimizer...), by name
    objects: dict[str, Any] = attrs.field(factory=dict)
    #: what plugins share during a run, under typed keys (:class:`~cvmkd_core.stash.StashKey`)
    stash: Stash = attrs.field(factory=Stash)
    started_at: float = attrs.field(factory=time.time)
    #: wall-clock seconds earlier invocations of this run spent up to the checkpoint it resumed from
    earlier_seconds: float = 0.0
    #: this process's rank among the run's processes (``torchrun``); rank 0 writes the run's files
    world: World = SINGLE

    def elapsed(self) -> float:
        """The run's wall-clock seconds so far: earlier invocations (up to the checkpoint this
        one resumed from) plus this one."""
        return self.earlier_seconds + (time.time() - self.started_at)

    @property
    def total_steps(self) -> int:
        return self.recipe.run.steps

    def component(self, path: str) -> Any:
        return self.components[path]

    def selected(self, kind: str) -> list[Selected]:
        """The components of ``kind`` the recipe selected, in recipe order, with their labels."""
        return [
            Selected(label=label, path=path, name=ref.name, component=self.components[path])
            for label, path, ref in self.recipe.selected(kind)
            if path in self.components
        ]

    def request_stop(self, reason: str) -> None:
        """Ask the loop to stop after the current step (finalize still runs)."""
        self.stop_requested = True
        self.stop_reason = reason

    def request_rollback(self, decision: Rollback) -> None:
        """Ask the loop to roll back after the current step (the first request wins)."""
        if self.pending_rollback is None:
            self.pending_rollback = decision

    def emit(self, name: Event | str, **data: Any) -> None:
        """Tell every plugin about a run event (validation, rollback, checkpoint...)."""
        self.pm.hook.cvmkd_event(state=self, name=name, data=data)
