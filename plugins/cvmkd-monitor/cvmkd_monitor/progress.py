"""Progress of a run: a progress bar on a terminal, plain log lines elsewhere.

On a terminal (stderr is a TTY) ``cvmkd run`` shows a tqdm bar with the stage, step, rate, time
left, the last loss and the last validation's composite score; log lines are printed above it.
When stderr is not a terminal (a log file, CI) or with ``--quiet``, a plain line every
:data:`INTERVAL_SECONDS` says the same (with ``--quiet`` these are the only info lines). The
teacher stage and the distillation each get their own bar.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any

from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.state import RunState, RunSummary, StepResult

#: progress lines have their own logger, so ``--quiet`` can keep them while hiding other info
log = logging.getLogger("cvmkd.progress")

INTERVAL_SECONDS = 30.0

#: "auto": a bar on a terminal, lines otherwise; "lines": always lines; "off": nothing. A user
#: may set CVMKD_PROGRESS; under ``cvmkd run --quiet`` (cvmkd's log level above INFO) "auto"
#: means lines.
MODES = ("auto", "lines", "off")
ENV_MODE = "CVMKD_PROGRESS"


def _mode() -> str:
    mode = os.environ.get(ENV_MODE, "auto")
    if mode == "auto" and logging.getLogger("cvmkd").getEffectiveLevel() > logging.INFO:
        return "lines"  # --quiet: no bar, the periodic lines alone
    return mode if mode in MODES else "auto"


def set_mode(mode: str) -> None:
    """For tests and embedding programs: the same as setting CVMKD_PROGRESS."""
    if mode not in MODES:
        raise ValueError(f"progress mode {mode!r}; expected one of {MODES}")
    os.environ[ENV_MODE] = mode


def _use_bar() -> bool:
    return _mode() == "auto" and sys.stderr.isatty()


class Progress:
    def __init__(self) -> None:
        self.started = 0.0
        self.first_step = 0
        self.last_report = 0.0
        self.bar: Any = None
        self._redirect: contextlib.ExitStack | None = None
        self._composite: float | None = None

    # --- the bar ---------------------------------------------------------------------------------

    def _open_bar(self, state: RunState) -> None:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._close_bar()
        self.bar = tqdm(
            total=state.total_steps,
            initial=state.step,
            desc=_stage(state),
            unit="step",
            dynamic_ncols=True,
            smoothing=0.05,
            file=sys.stderr,
        )
        self._redirect = contextlib.ExitStack()
        # log lines go above the bar instead of through it
        self._redirect.enter_context(logging_redirect_tqdm([logging.getLogger()]))

    def _close_bar(self) -> None:
        if self._redirect is not None:
            self._redirect.close()
            self._redirect = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # --- hooks -----------------------------------------------------------------------------------

    @hookimpl
    def cvmkd_event(self, state: RunState, name: str, data: dict[str, Any]) -> None:
        if _mode() == "off":
            return
        if name in ("run_start", "resume", "rollback"):
            self.started = self.last_report = time.perf_counter()
            self.first_step = state.step
            if _use_bar():
                if self.bar is None or name == "run_start":
                    self._open_bar(state)
                else:  # a rollback or resume moves the weights, and the bar, back
                    self.bar.reset(total=state.total_steps)
                    self.bar.update(state.step)
        elif name == "validation":
            composite = (data.get("scores") or {}).get("composite")
            self._composite = float(composite) if composite is not None else None
        elif name == "run_end":
            self._close_bar()

    @hookimpl
    def cvmkd_step_end(self, state: RunState, result: StepResult) -> None:
        if _mode() == "off":
            return
        if self.bar is not None:
            self.bar.update(state.step - self.bar.n)
            postfix = {"loss": f"{result.loss:.3f}"}
            if self._composite is not None:
                postfix["composite"] = f"{self._composite:.2f}"
            self.bar.set_postfix(postfix, refresh=False)
            return
        now = time.perf_counter()
        if now - self.last_report < INTERVAL_SECONDS and state.step != state.total_steps:
            return
        self.last_report = now
        done = state.step - self.first_step
        rate = (now - self.started) / done if done else 0.0
        left = (state.total_steps - state.step) * rate
        log.info(
            "%s step %d/%d  loss %.4f  %.2f s/step  %s left",
            _stage(state),
            state.step,
            state.total_steps,
            result.loss,
            rate,
            _duration(left),
        )

    @hookimpl
    def cvmkd_run_error(self, state: RunState, error: BaseException) -> None:
        self._close_bar()

    @hookimpl
    def cvmkd_finalize(self, state: RunState, summary: RunSummary) -> None:
        self._close_bar()


def _stage(state: RunState) -> str:
    return str(state.recipe.distill.name)  # type: ignore[attr-defined]  # TrainerRef is made at run time


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


_progress = Progress()
cvmkd_event = _progress.cvmkd_event
cvmkd_step_end = _progress.cvmkd_step_end
cvmkd_run_error = _progress.cvmkd_run_error
cvmkd_finalize = _progress.cvmkd_finalize
