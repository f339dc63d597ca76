"""Progress in the run log: a line every 30 seconds with step, loss, speed and time left."""

from __future__ import annotations

import logging
import time
from typing import Any

from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.state import RunState, StepResult

log = logging.getLogger("cvmkd")

INTERVAL_SECONDS = 30.0


class Progress:
    def __init__(self) -> None:
        self.started = 0.0
        self.first_step = 0
        self.last_report = 0.0

    @hookimpl
    def cvmkd_event(self, state: RunState, name: str, data: dict[str, Any]) -> None:
        if name in ("run_start", "resume", "rollback"):
            self.started = self.last_report = time.perf_counter()
            self.first_step = state.step

    @hookimpl
    def cvmkd_step_end(self, state: RunState, result: StepResult) -> None:
        now = time.perf_counter()
        if now - self.last_report < INTERVAL_SECONDS and state.step != state.total_steps:
            return
        self.last_report = now
        done = state.step - self.first_step
        rate = (now - self.started) / done if done else 0.0
        left = (state.total_steps - state.step) * rate
        log.info(
            "%s step %d/%d  loss %.4f  %.2f s/step  %s left",
            state.recipe.distill.name, state.step, state.total_steps, result.loss, rate, _duration(left),
        )


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


_progress = Progress()
cvmkd_event = _progress.cvmkd_event
cvmkd_step_end = _progress.cvmkd_step_end
