"""The event loop. Every hook it fires, in order (``pm.hook.`` omitted)::

    cvmkd_configure(recipe, pm)                          # historic, once
    try:
        cvmkd_check(state)                               # settings checked before any work
        cvmkd_setup(state)                               # the trainer: models, optimizer, batches
        cvmkd_run_start(state)                           # everyone else, seeing the models
        if resuming:
            cvmkd_restore(state, payload, "resume")      # from the last good checkpoint
        event("run_start")
        while state.step < run.steps and not state.stop_requested:
            batch = next(state.batches)
            cvmkd_step_start(state, batch)
            result = cvmkd_step(state, batch)            # firstresult; the trainer's is trylast
            state.step += 1; state.iterations += 1
            cvmkd_step_end(state, result)
            if a hook called state.request_rollback(decision):   # a non-finite loss, say
                roll back as below; continue
            if state.step % run.validate_every == 0 or state.step == run.steps:
                scores, details, rank = merge(cvmkd_validate(state))   # duplicate keys are an error
                record = ValidationRecord(state.step, scores, details)
                event("validation", record)
                decision = cvmkd_check_degradation(state, record, history)   # firstresult
                if decision is a Rollback:
                    payload = load(decision.target)      # best or last checkpoint
                    cvmkd_restore(state, payload, "rollback")
                    event("rollback")
                else:
                    payload = NamedStash(); payload[CORE_STATE] = ...
                    cvmkd_checkpoint(state, record, payload)   # each plugin adds its state
                    write payload atomically; event("checkpoint")
        if interrupted by a first Ctrl-C:
            cvmkd_checkpoint(state, None, payload)       # resumable from this step
    except BaseException as error:
        cvmkd_run_error(state, error)
        raise
    finally:                                             # always, also after an error
        event("run_end")
        cvmkd_finalize(state, summary)                   # wrappers first: a plugin's own phases
                                                         # (export, evaluate...); then
                                                         # verdicts; loggers close
        summary.wall_seconds = time since start          # finalize included
        cvmkd_record_outcome(state, summary)             # e.g. stamp the model packages
        write summary.json
        cvmkd_report(state, summary)                     # reports from the run's files

A rollback restores the checkpoint's weights, optimizer, data position, random state and every
plugin's state, then multiplies the learning rate by ``decision.lr_factor``; ``decision.stop``
ends the run there (the detector's ``max_rollbacks``). With no checkpoint to go back to the run
stops and says why.

``state.step`` is the training step of the current weights (a rollback sets it back);
``state.iterations`` counts every iteration executed and never decreases. The loop ends when
``state.step`` reaches ``run.steps``: a rollback therefore makes the run execute more
iterations than ``run.steps``, and the summary reports both numbers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch

from cvmkd_core.checkpoint import CheckpointStore
from cvmkd_core.distributed import rank_seed
from cvmkd_core.errors import CheckpointError, CvmkdError
from cvmkd_core.files import append_jsonl, atomic_write_json, atomic_write_text, open_jsonl
from cvmkd_core.plugins import Plugins
from cvmkd_core.recipe import Recipe
from cvmkd_core.rundir import RESUME_CHANGES
from cvmkd_core.stash import NamedStash
from cvmkd_core.state import (
    CORE_STATE,
    DISTRIBUTED,
    FAILED_IN,
    FINALIZE_ERROR,
    INVOCATION_SECONDS,
    SIGNAL,
    STOP_REASON,
    VALIDATION_TIME,
    WORLD_SIZE,
    Event,
    Rollback,
    RunState,
    RunSummary,
    ValidationRecord,
    ValidationResult,
)

log = logging.getLogger("cvmkd")


class PluginError(CvmkdError):
    """A plugin broke the hook contract (no step result, duplicate score keys...)."""


def instantiate_components(plugins: Plugins, state: RunState) -> None:
    """Build every component the recipe selected; those with hook implementations join the run
    as plugins, so only selected components take part, whatever is installed."""
    for path, ref in state.recipe.component_refs():
        component = plugins.registry.get(ref.kind, ref.name)
        obj = component.factory(ref.config) if component.config is not None else component.factory()
        state.components[path] = obj
        if ref.kind == "trainer" and "." not in path:
            state.trainer = obj
        if _has_hookimpls(obj):
            name = f"{ref.kind}:{ref.name}@{path}"
            if plugins.pm.has_plugin(name):  # the session's earlier run: its instance is done
                plugins.pm.unregister(name=name)
            plugins.add_plugin(obj, name=name)


def _has_hookimpls(obj: Any) -> bool:
    return any(
        getattr(getattr(obj, attr, None), "cvmkd_impl", None) is not None
        for attr in dir(obj)
        if attr.startswith("cvmkd_")
    )


def _merge_validation(results: list[Any]) -> tuple[dict[str, float], dict[str, Any], float | None]:
    """One record's scores and details, and the checkpoint's rank, from every ``cvmkd_validate`` result."""
    scores: dict[str, float] = {}
    details: dict[str, Any] = {}
    rank: float | None = None
    for result in results:
        if result is None:
            continue
        if isinstance(result, ValidationResult):
            part_scores, part_details = result.scores, result.details
            if result.rank is not None:
                if rank is not None:
                    raise PluginError("two plugins returned the rank of a validation")
                rank = float(result.rank)
        elif isinstance(result, dict):
            part_scores, part_details = result, {}
        else:
            raise PluginError(f"cvmkd_validate returned {type(result).__name__}; expected a dict or ValidationResult")
        for key, value in part_scores.items():
            if key in scores:
                raise PluginError(f"two plugins returned the validation score {key!r}")
            scores[key] = float(value)
        for key, value in part_details.items():
            if key in details:
                raise PluginError(f"two plugins returned the validation detail {key!r}")
            details[key] = value
    return scores, details, rank


def _core_payload(state: RunState) -> dict[str, Any]:
    return {
        "step": state.step,
        "iterations": state.iterations,
        "rollbacks": state.rollbacks,
        "lr_scale": state.lr_scale,
        "history": [r.to_dict() for r in state.history],
        "validation_seconds": state.validation_seconds,
        "wall_seconds": state.elapsed(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": list(random.getstate()[1]),
        "python_rng_version": random.getstate()[0],
    }


def _restore_core(state: RunState, core: dict[str, Any], reason: str) -> None:
    """Put the loop's own state back. A rollback restores the step, the learning-rate scale and
    the random state, but keeps the iteration count, the rollback count and the history: they
    describe what the run did, not where the weights are."""
    state.step = int(core["step"])
    state.lr_scale = float(core.get("lr_scale", 1.0))
    torch.set_rng_state(core["torch_rng"])
    if state.world.rank:  # the checkpoint holds rank 0's generator: the others draw their own
        torch.manual_seed(rank_seed(state.recipe.run.seed, state.world.rank, state.step))
    random.setstate((core["python_rng_version"], tuple(core["python_rng"]), None))
    if reason == "resume":
        state.iterations = int(core["iterations"])
        state.rollbacks = int(core["rollbacks"])
        state.history = [ValidationRecord(**r) for r in core["history"]]
        state.validation_seconds = float(core.get("validation_seconds", 0.0))
        state.earlier_seconds = float(core.get("wall_seconds", 0.0))


class Terminated(KeyboardInterrupt):
    """A second SIGTERM, or a SIGTERM while finalizing: stop at once (exit status 143)."""


@contextlib.contextmanager
def _interrupts(state: RunState) -> Iterator[None]:
    """The first Ctrl-C (SIGINT) or SIGTERM (what schedulers, ``kill`` and ``timeout`` send) asks
    the loop to stop after the current step and write a checkpoint; a second one stops at once
    (KeyboardInterrupt). Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        stop_now = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        if state.interrupted:
            raise stop_now
        state.interrupted = True
        state.interrupted_by = name
        what = "Ctrl-C" if signum == signal.SIGINT else name
        if state.finalizing:
            # training is over: there is no step to finish, and finalize's steps may take minutes
            log.warning("interrupted (%s) while finalizing: stopping now; --resume finishes the outputs", what)
            raise stop_now
        state.request_stop(f"interrupted ({what}): stopping after this step; {what} again stops at once")
        log.warning("%s", state.stop_reason)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


class Loop:
    """Runs one recipe in one run directory."""

    def __init__(self, recipe: Recipe, plugins: Plugins, state: RunState) -> None:
        self.recipe = recipe
        self.plugins = plugins
        self.pm = plugins.pm
        self.state = state
        self.checkpoints = CheckpointStore(state.run_dir / "checkpoints", keep=recipe.run.keep_checkpoints)

    def run(self, *, resume: bool = False, checked: bool = False) -> RunSummary:
        """Run the loop; ``checked``: ``cvmkd_check`` has passed already (``prepare_state``)."""
        state = self.state
        summary = RunSummary()
        with _interrupts(state):
            self._run(summary, resume, checked)
        return summary

    def _run(self, summary: RunSummary, resume: bool, checked: bool) -> None:
        state, hook = self.state, self.pm.hook
        failed: BaseException | None = None
        try:
            hook.cvmkd_configure.call_historic(kwargs={"recipe": self.recipe, "pm": self.pm})
            if not checked:
                hook.cvmkd_check(state=state)
            world = state.world
            if not world.main:
                world.barrier()  # rank 0 sets up first: it builds the caches the others read
            hook.cvmkd_setup(state=state)
            if world.main:
                world.barrier()
            hook.cvmkd_run_start(state=state)
            if state.batches is None:
                raise PluginError(
                    f"trainer {self.recipe.distill.name!r} set up no batch stream in cvmkd_setup"  # type: ignore[attr-defined]
                )
            if resume:
                self._resume()
            state.emit(Event.RUN_START, step=state.step, total_steps=state.total_steps)
            self._train()
            if state.interrupted:
                self._checkpoint(None)
                summary.status = "interrupted"
                summary.error = "interrupted"
            elif state.stop_requested:
                summary.status = "stopped"
            else:
                summary.status = "completed"
        except KeyboardInterrupt as error:
            failed = error
            summary.status = "interrupted"
            summary.error = "interrupted"
            hook.cvmkd_run_error(state=state, error=error)
            raise
        except BaseException as error:
            failed = error
            summary.status = "failed"
            summary.error = f"{type(error).__name__}: {error}"
            hook.cvmkd_run_error(state=state, error=error)
            raise
        finally:
            self._finalize(summary, failed)

    # --- the parts ------------------------------------------------------------------------------

    def _train(self) -> None:
        state, hook, run = self.state, self.pm.hook, self.recipe.run
        while state.step < run.steps and not state.stop_requested:
            batch = next(state.batches)  # type: ignore[arg-type]
            hook.cvmkd_step_start(state=state, batch=batch)
            result = hook.cvmkd_step(state=state, batch=batch)
            if result is None:
                raise PluginError("no plugin performed the training step (cvmkd_step returned nothing)")
            state.step += 1
            state.iterations += 1
            hook.cvmkd_step_end(state=state, result=result)
            if state.world.size > 1:
                self._agree()
            if state.pending_rollback is not None:
                decision, state.pending_rollback = state.pending_rollback, None
                self._rollback(decision)
                continue
            if state.step % run.validate_every == 0 or state.step == run.steps:
                self._validate()

    def _agree(self) -> None:
        """After each step, every rank takes rank 0's pending rollback, and stops when any rank
        was asked to (an interrupt reaches each process on its own)."""
        state = self.state
        mine = (state.pending_rollback, state.stop_reason if state.stop_requested else None, state.interrupted_by)
        views = state.world.gather(mine)
        state.pending_rollback = views[0][0]
        for _, reason, signal_name in views:
            if reason is not None and not state.stop_requested:
                state.request_stop(reason)
            if signal_name is not None and not state.interrupted:
                state.interrupted, state.interrupted_by = True, signal_name

    def _validate(self) -> None:
        state, hook = self.state, self.pm.hook
        if not state.world.main:  # rank 0 validates; the others do what it decided
            decision, stop = state.world.from_main(None)
            if decision is not None:
                self._rollback(decision)
            elif stop is not None and not state.stop_requested:
                state.request_stop(stop)
            return
        started = time.perf_counter()
        scores, details, rank = _merge_validation(hook.cvmkd_validate(state=state))
        seconds = time.perf_counter() - started
        state.validation_seconds += seconds
        elapsed = max(state.elapsed(), 1e-9)
        log.info(
            "validation at step %d took %.1fs; validation so far: %.0fs, %.1f%% of the run's %.0fs",
            state.step,
            seconds,
            state.validation_seconds,
            100 * state.validation_seconds / elapsed,
            elapsed,
        )
        record = ValidationRecord(
            step=state.step,
            iteration=state.iterations,
            scores=scores,
            seconds=round(seconds, 3),
            details=details,
        )
        history = list(state.history)
        decision = hook.cvmkd_check_degradation(state=state, record=record, history=history)
        if isinstance(decision, Rollback):
            record = ValidationRecord(**{**record.to_dict(), "rolled_back": True})
            self._store_record(record)
            state.history.append(record)
            state.emit(Event.VALIDATION, **record.to_dict())
            state.world.from_main((decision, None))
            self._rollback(decision)
            return
        self._store_record(record)
        state.history.append(record)
        state.emit(Event.VALIDATION, **record.to_dict())
        self._checkpoint(record, rank)
        state.world.from_main((None, state.stop_reason if state.stop_requested else None))

    def _checkpoint(self, record: ValidationRecord | None, rank: float | None = None) -> None:
        """Every plugin adds its state; the payload is written once, atomically. ``record`` is
        None for the checkpoint written on an interrupt (it is never the best); ``rank`` is what
        the validation ranks it by. Rank 0 alone writes: the other ranks' weights are the same."""
        state = self.state
        if not state.world.main:
            return
        payload = NamedStash()
        payload[CORE_STATE] = _core_payload(state)
        self.pm.hook.cvmkd_checkpoint(state=state, record=record, payload=payload)
        entry = self.checkpoints.save(state.step, state.iterations, payload.to_dict(), score=rank)
        state.emit(
            Event.CHECKPOINT, step=state.step, file=entry.file, sha256=entry.sha256, validated=record is not None
        )

    def _store_record(self, record: ValidationRecord) -> None:
        directory = self.state.run_dir / "validation"
        suffix = "_rolled_back" if record.rolled_back else ""
        atomic_write_json(directory / f"step_{record.step:08d}_it{record.iteration:08d}{suffix}.json", record.to_dict())
        with open_jsonl(directory / "history.jsonl") as handle:
            append_jsonl(handle, record.to_dict())

    def _rollback(self, decision: Rollback) -> None:
        state = self.state
        try:
            entry, saved = self.checkpoints.load(decision.target)
        except CheckpointError as exc:
            reason = f"{decision.reason}; no checkpoint to roll back to ({exc})"
            log.error("stopping: %s", reason)
            state.emit(Event.ROLLBACK_SKIPPED, step=state.step, reason=decision.reason, error=str(exc))
            state.request_stop(reason)
            return
        from_step = state.step
        payload = NamedStash.from_dict(saved)
        _restore_core(state, payload[CORE_STATE], "rollback")
        state.rollbacks += 1
        state.lr_scale *= decision.lr_factor
        self.pm.hook.cvmkd_restore(state=state, payload=payload, reason="rollback")
        if decision.stop:
            state.request_stop(f"{decision.reason}; restored step {state.step} and stopped")
        log.warning(
            "rollback %d: %s; restored step %d (%s), learning-rate scale now %g",
            state.rollbacks,
            decision.reason,
            state.step,
            entry.file,
            state.lr_scale,
        )
        state.emit(
            "rollback",
            from_step=from_step,
            to_step=state.step,
            iteration=state.iterations,
            reason=decision.reason,
            checkpoint=entry.file,
            lr_scale=state.lr_scale,
            rollbacks=state.rollbacks,
        )

    def _resume(self) -> None:
        state = self.state
        if not self.checkpoints.entries():
            # interrupted before its first checkpoint (during a stage run before training, or
            # while writing the first checkpoint, after its validation was recorded)
            log.info("no checkpoint in %s yet: starting from step 0", self.checkpoints.directory)
            self._rewrite_history()
            state.emit(Event.RESUME, step=0, checkpoint=None)
            return
        entry, saved = self.checkpoints.load("last")
        payload = NamedStash.from_dict(saved)
        _restore_core(state, payload[CORE_STATE], "resume")
        self._rewrite_history()
        self.pm.hook.cvmkd_restore(state=state, payload=payload, reason="resume")
        log.info("resumed from %s at step %d", entry.file, state.step)
        changes = state.stash.get(RESUME_CHANGES, {})
        for key, (before, after) in changes.items():
            log.warning("resumed with %s = %r (the run was started with %r)", key, after, before)
        state.emit(
            Event.RESUME,
            step=state.step,
            checkpoint=entry.file,
            **({"changes": {k: {"from": a, "to": b} for k, (a, b) in changes.items()}} if changes else {}),
        )

    def _rewrite_history(self) -> None:
        """Validations after the checkpoint a run resumes from describe weights that are gone: the
        history file is rewritten from the checkpoint's, so it matches the run that continues."""
        state = self.state
        history = state.run_dir / "validation" / "history.jsonl"
        if state.world.main and (state.history or history.exists()):
            atomic_write_text(history, "".join(json.dumps(r.to_dict(), default=str) + "\n" for r in state.history))

    def _finalize(self, summary: RunSummary, failed: BaseException | None) -> None:
        state = self.state
        summary.final_step = state.step
        summary.iterations_executed = state.iterations
        summary.rollbacks = state.rollbacks
        summary.wall_seconds = round(state.elapsed(), 3)
        if state.stop_reason:
            summary.extra[STOP_REASON] = state.stop_reason
        if state.interrupted_by:
            summary.extra[SIGNAL] = state.interrupted_by
        if state.history:
            last = state.history[-1].to_dict()
            summary.last_validation = {k: v for k, v in last.items() if k != "details"}
        wall = max(state.elapsed(), 1e-9)
        summary.extra[VALIDATION_TIME] = {
            "count": len(state.history),
            "seconds": round(state.validation_seconds, 2),
            "share_of_wall_time": round(state.validation_seconds / wall, 4),
        }
        summary.extra[WORLD_SIZE] = state.world.size
        if state.world.size > 1:
            summary.extra[DISTRIBUTED] = state.world.to_dict()
        if not state.world.main:
            return  # rank 0 exports, evaluates, writes the summary and reports
        hook = self.pm.hook
        state.finalizing = True
        state.phase = "run_end"
        try:
            state.emit(Event.RUN_END, status=summary.status, step=state.step, iterations=state.iterations)
            state.phase = "finalize"
            hook.cvmkd_finalize(state=state, summary=summary)
            # the wall time covers finalize too, every plugin's phases in it
            summary.wall_seconds = round(state.elapsed(), 3)
            summary.extra[INVOCATION_SECONDS] = round(time.time() - state.started_at, 3)
            state.phase = "record_outcome"
            hook.cvmkd_record_outcome(state=state, summary=summary)
        except BaseException as exc:
            if failed is None:
                # the run's own work is done, but a finalize step (export, report...) failed
                if isinstance(exc, KeyboardInterrupt):
                    summary.status = "interrupted"
                    summary.error = "interrupted while finalizing"
                    if state.interrupted_by:
                        summary.extra[SIGNAL] = state.interrupted_by
                else:
                    summary.status = "failed"
                    summary.error = f"finalize: {type(exc).__name__}: {exc}"
                summary.extra[FAILED_IN] = state.phase
                if state.phase != "record_outcome":
                    # the packages written so far say that the run failed, not that it completed
                    with contextlib.suppress(Exception):
                        hook.cvmkd_record_outcome(state=state, summary=summary)
                raise
            # the original error matters more; finalize's own failure is still reported
            log.error("finalize failed after the run failed: %s: %s", type(exc).__name__, exc)
            summary.extra[FINALIZE_ERROR] = f"{type(exc).__name__}: {exc}"
        finally:
            atomic_write_json(state.run_dir / "summary.json", summary.to_dict())
            # reports are written from the run's files, summary.json included; a failing
            # reporter warns and changes nothing else
            hook.cvmkd_report(state=state, summary=summary)


__all__ = ["Loop", "PluginError", "Terminated", "instantiate_components"]
