"""cvmkd-tensorboard: the ``tensorboard`` logger, TensorBoard event files beside ``train.jsonl``.

Selected in the recipe's ``[[loggers]]``; every key is optional (defaults shown). The array
replaces the default ``[{name = "jsonl"}]``, so list ``jsonl`` too: ``cvmkd monitor`` and the
reports read ``train.jsonl``::

    [[loggers]]
    name = "jsonl"

    [[loggers]]
    name = "tensorboard"
    log_dir = "tensorboard"      # relative to the run directory
    every = 0                    # log every N steps; 0 follows run.log_every
    flush_seconds = 30           # the event file is written out at least this often

What it writes, every value at the global step ``state.step`` (the step of the weights):

- ``train/<key>``: each logged step's ``loss`` and every numeric value of its metrics (``kd``,
  ``ce``, ``token_accuracy``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``teacher_agreement``...),
  at the steps ``train.jsonl`` logs (every ``every`` steps, and the last one);
- ``validation/<key>``: each validation's scores (``composite`` included), at its step;
  ``teacher/<key>`` the teacher's scores on the same sentences and ``retention/<key>`` the
  student's share of them, when the validation has them (the ``kd`` trainer's runs do);
- ``run/recipe``: the resolved recipe (``recipe.toml``) as text, at the start;
- ``run/rollbacks``: the number of rollbacks so far (0 at the start), and a ``run/events`` text
  entry per rollback, skipped rollback and resume, at the step it happened;
- at the end, ``run/summary`` (how the run ended) as text, and the hyperparameters (the resolved
  recipe, flattened to ``section.key``) for TensorBoard's HParams dashboard, with the
  ``validation/<key>`` scalars as its metrics: ``tensorboard --logdir runs`` compares runs.

The event files are flushed and closed at finalize, or already on an error, so a failing
finalize step loses nothing. ``summary.json`` names the folder under ``outputs.tensorboard``.
A rollback or a resume sets the step back; the steps after it are logged again, as in
``train.jsonl`` (nothing is purged), so a chart then goes back along the step axis once.

The ``tensorboard`` package is this plugin's dependency, not cvmkd's; a recipe selecting the
logger without it installed fails before training (``ComponentError``, exit status 2).
"""

from __future__ import annotations

import json
import logging
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from cvmkd_core.config import ge, gt, inside_run_dir
from cvmkd_core.errors import ComponentError
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.recipe import ComponentRef, Recipe
from cvmkd_core.state import RunState, RunSummary, StepResult

log = logging.getLogger("cvmkd")

MISSING = "logger 'tensorboard' needs the tensorboard package: pip install tensorboard"


@attrs.frozen
class TensorBoardConfig:
    """``[[loggers]] name = "tensorboard"``."""

    log_dir: str = attrs.field(default="tensorboard", validator=inside_run_dir)
    """folder of the event files, relative to the run directory (and inside it)"""
    every: int = attrs.field(default=0, validator=ge(0))
    """log training scalars every N steps; 0 follows ``run.log_every``"""
    flush_seconds: float = attrs.field(default=30.0, validator=gt(0))
    """the event file is written out at least this often"""


def _tensorboard() -> tuple[Any, Any]:
    """``SummaryWriter`` and ``hparams``, imported only when a recipe selects the logger."""
    try:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
    except ImportError as exc:
        detail = "" if isinstance(exc, ModuleNotFoundError) else f" ({exc})"
        raise ComponentError(MISSING + detail) from None
    return SummaryWriter, hparams


def _number(value: Any) -> float | None:
    """A value TensorBoard can plot, or None (strings, lists, bools are left to train.jsonl)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _code(text: str) -> str:
    """Verbatim text in TensorBoard's Markdown: an indented code block."""
    return "\n".join("    " + line for line in text.splitlines())


def flatten_recipe(table: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """``{"run.steps": 12, "distill.loss.temperature": 6.0, ...}``; arrays become JSON text."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_recipe(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


class TensorBoardLogger:
    """Write training scalars, validation scores, rollbacks and the recipe as TensorBoard events."""

    def __init__(self, config: TensorBoardConfig) -> None:
        self.config = config
        # fails here, when the run's components are built, before any training
        self._summary_writer, self._hparams = _tensorboard()
        self._writer: Any = None
        self._log_dir: Path | None = None
        self._closed = False

    def _open(self, state: RunState) -> Any:
        if self._writer is None:
            self._log_dir = state.run_dir / self.config.log_dir
            self._writer = self._summary_writer(log_dir=str(self._log_dir), flush_secs=self.config.flush_seconds)
        return self._writer

    def _scalars(self, state: RunState, prefix: str, values: dict[str, Any] | None, step: int) -> None:
        writer = self._open(state)
        for key, value in (values or {}).items():
            number = _number(value)
            if number is not None:
                writer.add_scalar(f"{prefix}/{key}", number, step)

    def _text(self, state: RunState, tag: str, text: str, step: int) -> None:
        self._open(state).add_text(tag, text, step)

    @hookimpl
    def cvmkd_configure(self, recipe: Recipe) -> None:
        # typed as their base class: cvmkd_core makes LoggerRef at runtime, which mypy cannot use as a type
        loggers: Sequence[ComponentRef] = recipe.loggers
        if not any(ref.name == "jsonl" for ref in loggers):
            log.warning(
                "tensorboard: the recipe's [[loggers]] has no jsonl: train.jsonl is not written, and "
                'cvmkd monitor and the reports read it; list both, [[loggers]] name = "jsonl" and name = "tensorboard"'
            )

    @hookimpl
    def cvmkd_step_end(self, state: RunState, result: StepResult) -> None:
        every = self.config.every or state.recipe.run.log_every
        if self._closed or (state.step % every and state.step != state.total_steps):
            return
        self._scalars(state, "train", {"loss": result.loss, **result.metrics}, state.step)

    @hookimpl
    def cvmkd_event(self, state: RunState, name: str, data: dict[str, Any]) -> None:
        if self._closed:
            return
        if name == "run_start":
            self._text(state, "run/recipe", _code(state.recipe.to_toml()), state.step)
            self._open(state).add_scalar("run/rollbacks", state.rollbacks, state.step)
        elif name == "validation":
            step, details = int(data["step"]), data.get("details") or {}
            self._scalars(state, "validation", data.get("scores"), step)
            teacher = details.get("teacher")
            if isinstance(teacher, dict):
                self._scalars(state, "teacher", teacher.get("scores"), step)
            if isinstance(details.get("retention"), dict):
                self._scalars(state, "retention", details["retention"], step)
        elif name == "rollback":
            step = int(data["from_step"])
            self._open(state).add_scalar("run/rollbacks", int(data["rollbacks"]), step)
            self._text(
                state,
                "run/events",
                f"rollback {data['rollbacks']} at iteration {data['iteration']}: {data['reason']}; "
                f"step {step} back to step {data['to_step']} ({data['checkpoint']}), "
                f"learning-rate scale now {data['lr_scale']:g}",
                step,
            )
        elif name == "rollback_skipped":
            self._text(state, "run/events", f"rollback skipped: {data['reason']}; {data['error']}", state.step)
        elif name == "resume":
            self._text(state, "run/events", f"resumed at step {data['step']} from {data['checkpoint']}", state.step)

    def _close(self, state: RunState, ending: str) -> None:
        """The run's summary line and hyperparameters, then flush and close; later events are ignored."""
        if self._closed:
            return
        self._closed = True
        if self._writer is None:
            return  # the run ended before it started: nothing to write
        writer = self._writer
        try:
            writer.add_text("run/summary", ending, state.step)
            accepted = [r for r in state.history if not r.rolled_back]
            metrics = {f"validation/{k}": v for k, v in (accepted[-1].scores if accepted else {}).items()}
            for summary in self._hparams(flatten_recipe(state.recipe.to_dict()), metrics):
                writer.file_writer.add_summary(summary, state.step)
        finally:
            writer.close()

    @hookimpl
    def cvmkd_run_error(self, state: RunState, error: BaseException) -> None:
        status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
        self._close(
            state, f"{status} at step {state.step} ({state.iterations} iterations): {type(error).__name__}: {error}"
        )

    @hookimpl
    def cvmkd_finalize(self, state: RunState, summary: RunSummary) -> None:
        self._close(
            state,
            f"{summary.status} at step {state.step} ({state.iterations} iterations, "
            f"{state.rollbacks} rollbacks)" + (f": {summary.error}" if summary.error else ""),
        )
        if self._log_dir is not None:
            summary.outputs.setdefault("tensorboard", str(self._log_dir))


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.logger("tensorboard", TensorBoardLogger, config=TensorBoardConfig)
