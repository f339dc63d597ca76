"""The ``jsonl`` logger: one JSON object per logged step, and one per run event, in train.jsonl."""

from __future__ import annotations

import time
from typing import IO, Any

import attrs

from cvmkd_core.config import ge, inside_run_dir
from cvmkd_core.files import append_jsonl, open_jsonl
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.state import RunState, RunSummary, StepResult


@attrs.frozen
class JsonlConfig:
    """``[[loggers]] name = "jsonl"``."""

    file: str = attrs.field(default="train.jsonl", validator=inside_run_dir)
    """where in the run directory (a relative path; folders are created)"""
    every: int = attrs.field(default=0, validator=ge(0))
    """log every N steps; 0 follows ``run.log_every``"""


class JsonlLogger:
    """Write step records and run events to a JSON-lines file in the run directory."""

    def __init__(self, config: JsonlConfig) -> None:
        self.config = config
        self._handle: IO[str] | None = None
        self._last_time: float | None = None

    def _open(self, state: RunState) -> IO[str]:
        if self._handle is None:
            self._handle = open_jsonl(state.run_dir / self.config.file)
        return self._handle

    @hookimpl
    def cvmkd_run_start(self, state: RunState) -> None:
        self._open(state)
        self._last_time = time.perf_counter()

    @hookimpl
    def cvmkd_step_end(self, state: RunState, result: StepResult) -> None:
        every = self.config.every or state.recipe.run.log_every
        if state.step % every and state.step != state.total_steps:
            return
        record: dict[str, Any] = {
            "step": state.step,
            "iteration": state.iterations,
            "time": round(time.time(), 3),
            "loss": result.loss,
        }
        record.update(result.metrics)
        append_jsonl(self._open(state), record)

    @hookimpl
    def cvmkd_event(self, state: RunState, name: str, data: dict[str, Any]) -> None:
        append_jsonl(self._open(state), {"event": name, "time": round(time.time(), 3), **data})

    @hookimpl
    def cvmkd_finalize(self, state: RunState, summary: RunSummary) -> None:
        summary.outputs.setdefault("train_log", str(state.run_dir / self.config.file))
        if self._handle is not None:
            self._handle.close()
            self._handle = None


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.logger("jsonl", JsonlLogger, config=JsonlConfig)
