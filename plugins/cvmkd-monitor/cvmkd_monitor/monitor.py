"""``cvmkd monitor RUN_DIR``: a run's progress, read only from its files while another process
writes them, so it works from any terminal, on a run started by anyone, and can never disturb it.

What a run writes, and what is read from it (see ``docs/monitoring.md``):

* ``train.jsonl`` (``RUN_DIR/teacher/train.jsonl`` while the teacher trains): one step record per
  logged step and one line per event. Only its tail is parsed: the events before the tail
  (``run_start``, ``rollback``...) are found once with a byte search, then each refresh reads only
  the bytes appended since. A partly written last line is left for the next refresh.
* ``validation/history.jsonl``: one record per validation, read incrementally; a resume rewrites
  it, which is noticed (a new inode, or a shorter file) and read again.
* ``summary.json``: written once, atomically, when the run ends, so its presence means finished.
* ``recipe.toml``: the total steps and the validation period when the log has not said yet.

Nothing here imports torch or any plugin: the command starts at once.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from cvmkd_core.errors import CvmkdError, RunDirError
from cvmkd_core.rundir import DEFAULT_TRAIN_LOG, RECIPE_FILE, RunFiles

#: bytes of train.jsonl parsed when a log is first opened; doubled until it holds enough steps
TAIL_BYTES = 64 * 1024
#: the rate is measured over at most this many recent step intervals...
RATE_RECORDS = 50
#: ...and, once at least MIN_RATE_INTERVALS are counted, none older than this before the last step
RATE_SECONDS = 120.0
MIN_RATE_INTERVALS = 5
#: step records kept in memory (the rate needs RATE_RECORDS + 1)
KEEP_STEPS = 200
#: the events before the tail are found with a byte search, this much read at a time
SCAN_CHUNK = 1 << 20
#: no new record for this long while training means the run is probably dead or hung
STALE_SECONDS = 120.0
#: the same while waiting for the first step, preparing distillation or finalizing: each of
#: these (tokenizer training, caching the teacher's outputs, evaluation, quantization) is long
SLOW_PHASE_STALE_SECONDS = 20 * 60.0

FINAL_STATUSES = ("completed", "stopped", "interrupted", "failed")
#: the step metrics shown first, in this order; any other numeric key follows
MAIN_METRICS = ("loss", "kd", "ce", "token_accuracy", "teacher_agreement", "lr", "grad_norm", "tokens_per_s")
#: numeric keys of a step record that are not metrics, or already shown elsewhere
NOT_METRICS = frozenset({"step", "iteration", "time", "tokens", "seconds_per_step", "epoch"})
#: validation scores shown in the text block, in this order, when present
MAIN_SCORES = ("composite", "bleu", "chrf", "ter", "bertscore_f1")

_EVENT_MARK = b'\n{"event": "'
_CLEAR = "\x1b[H\x1b[2J"


# --- reading files that are being written -------------------------------------------------------


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse(line: bytes) -> dict[str, Any] | None:
    """One JSON object, or None for a line that is not one (damaged, or cut by a crash)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class _Appended:
    """Position in a file that is only appended to; a file replaced or truncated (a resume
    rewrites ``history.jsonl``) is read again from the start."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.inode: int | None = None
        self.damaged = 0

    def _reset(self) -> None:
        self.offset = 0
        self.damaged = 0

    def stat(self) -> os.stat_result | None:
        """The file's state, after forgetting everything read if it is no longer the same file."""
        try:
            st = os.stat(self.path)
        except OSError:
            if self.inode is not None:
                self.inode = None
                self._reset()
            return None
        if st.st_ino != self.inode or st.st_size < self.offset:
            self.inode = st.st_ino
            self._reset()
        return st

    def complete_lines(self, handle: IO[bytes], start: int, size: int) -> Iterable[bytes]:
        """The complete lines in ``[start, size)``; the offset moves past the last newline, so a
        line still being written is read whole next time."""
        handle.seek(start)
        data = handle.read(size - start)
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offset = start + end + 1
        return data[:end].split(b"\n")


class TrainLog(_Appended):
    """What ``cvmkd monitor`` needs from one stage's ``train.jsonl``, kept up to date by
    :meth:`refresh`: recent step records, the last one in full, and the few events that matter."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._reset()

    def _reset(self) -> None:
        super()._reset()
        #: (step, iteration, time, follows_an_event) of recent step records; an interval that
        #: contains an event (a validation, a rollback, a resume) is not training speed
        self.steps: collections.deque[tuple[int, int, float | None, bool]] = collections.deque(maxlen=KEEP_STEPS)
        self.last_step: dict[str, Any] | None = None
        self.last_time: float | None = None
        self.run_start: dict[str, Any] | None = None
        #: the last of run_start, resume, run_end: a run_end means the loop is done
        self.lifecycle: dict[str, Any] | None = None
        self.rollbacks: list[dict[str, Any]] = []
        self.validations: list[dict[str, Any]] = []
        self.exists = False
        self._after_event = False

    def refresh(self) -> None:
        st = self.stat()
        self.exists = st is not None
        if st is None or st.st_size == self.offset:
            return
        with open(self.path, "rb") as handle:
            start = self.offset
            if start == 0 and st.st_size > TAIL_BYTES:
                start = self._tail_start(handle, st.st_size)
                if start > 0:
                    self._scan_events(handle, start)
            for line in self.complete_lines(handle, start, st.st_size):
                self._take(line)

    def _tail_start(self, handle: IO[bytes], size: int) -> int:
        """Where the parsed tail starts: the first line start in the last TAIL_BYTES, the tail
        doubled until it holds RATE_RECORDS step records (a run that logs rarely, or whose tail is
        mostly long validation events) or the whole file."""
        tail = TAIL_BYTES
        while True:
            begin = max(size - tail, 0)
            if begin == 0:
                return 0
            handle.seek(begin)
            block = handle.read(size - begin)
            if block.count(b'\n{"step"') > RATE_RECORDS:
                newline = block.find(b"\n")
                return begin + newline + 1
            tail *= 2

    def _scan_events(self, handle: IO[bytes], end: int) -> None:
        """The events in ``[0, end)`` (a line boundary): a byte search for lines that start an
        event, so step records, which are nearly all of the file, are never parsed."""
        handle.seek(0)
        carry, done = b"\n", 0
        while done < end:
            chunk = handle.read(min(SCAN_CHUNK, end - done))
            if not chunk:
                break
            done += len(chunk)
            buffer = carry + chunk
            cut = buffer.rfind(b"\n")
            body, carry = buffer[:cut], buffer[cut:]
            at = body.find(_EVENT_MARK)
            while at >= 0:
                stop = body.find(b"\n", at + 1)
                stop = len(body) if stop < 0 else stop
                self._take(body[at + 1 : stop])
                at = body.find(_EVENT_MARK, stop)

    def _take(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        record = _parse(line)
        if record is None:
            self.damaged += 1
            return
        raw_time = record.get("time")
        when = float(raw_time) if isinstance(raw_time, (int, float)) and not isinstance(raw_time, bool) else None
        if when is not None:
            self.last_time = when
        event = record.get("event")
        if event is None:
            step = record.get("step")
            if not isinstance(step, int):
                self.damaged += 1
                return
            iteration = record.get("iteration")
            iteration = iteration if isinstance(iteration, int) else step
            self.steps.append((step, iteration, when, self._after_event))
            self._after_event = False
            self.last_step = record
            return
        self._after_event = True
        if event == "run_start":
            self.run_start = record
        if event in ("run_start", "resume", "run_end"):
            self.lifecycle = record
        elif event in ("rollback", "rollback_skipped"):
            self.rollbacks.append({k: v for k, v in record.items() if k != "details"})
        elif event == "validation":
            self.validations.append(_compact_validation(record))


def _table(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one: files from older or damaged runs."""
    return value if isinstance(value, dict) else {}


def _compact_validation(record: dict[str, Any]) -> dict[str, Any]:
    """The parts of a validation record the monitor shows (its details run to kilobytes)."""
    details = _table(record.get("details"))
    scores = _table(record.get("scores"))
    delta = _table(details.get("delta_previous"))
    retention = _table(details.get("retention"))
    return {
        "step": record.get("step"),
        "iteration": record.get("iteration"),
        "scores": {k: v for k, v in scores.items() if _number(v)},
        "seconds": record.get("seconds") if _number(record.get("seconds")) else None,
        "rolled_back": bool(record.get("rolled_back")),
        "previous_step": details.get("previous_step"),
        "delta_previous": delta.get("composite") if _number(delta.get("composite")) else None,
        "retention": retention.get("composite") if _number(retention.get("composite")) else None,
    }


class History(_Appended):
    """``validation/history.jsonl``, read incrementally; validations are few, so all are kept
    (compacted) and the best one can be found."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.records: list[dict[str, Any]] = []
        self.exists = False

    def _reset(self) -> None:
        super()._reset()
        self.records = []

    def refresh(self) -> None:
        st = self.stat()
        self.exists = st is not None
        if st is None or st.st_size == self.offset:
            return
        with open(self.path, "rb") as handle:
            for line in self.complete_lines(handle, self.offset, st.st_size):
                record = _parse(line) if line.strip() else None
                if record is None:
                    self.damaged += bool(line.strip())
                    continue
                self.records.append(_compact_validation(record))


def _read_json(path: Path) -> tuple[dict[str, Any] | None, float | None]:
    """A JSON file written atomically, and its modification time; None while it does not exist."""
    try:
        mtime = path.stat().st_mtime
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, None
    return (data, mtime) if isinstance(data, dict) else (None, None)


# --- the snapshot -------------------------------------------------------------------------------


class _Stage:
    """One training stage: the teacher's nested run in ``RUN_DIR/teacher``, or the run itself."""

    def __init__(self, name: str, directory: Path) -> None:
        self.name = name
        self.directory = directory
        self.files = RunFiles(directory)
        self.log = TrainLog(self.files.train_log({}))  # the recipe's log name once it is readable
        self.history = History(self.files.history_file)
        self.recipe: dict[str, Any] | None = None

    def refresh(self) -> None:
        if self.recipe is None:
            self.recipe = self.files.recipe()
            if self.recipe is not None and self.files.train_log(self.recipe) != self.log.path:
                self.log = TrainLog(self.files.train_log(self.recipe))
        self.log.refresh()
        self.history.refresh()

    def run_setting(self, key: str) -> int | None:
        value = ((self.recipe or {}).get("run") or {}).get(key)
        return value if isinstance(value, int) and value > 0 else None

    def validations(self) -> list[dict[str, Any]]:
        return self.history.records if self.history.exists else self.log.validations


class Monitor:
    """Reads a run directory's files again on each :meth:`snapshot`, remembering where it was."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.teacher = _Stage("teacher", run_dir / "teacher")
        self.student = _Stage("distillation", run_dir)

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Everything ``cvmkd monitor`` shows, as a JSON-ready dict (``--json`` prints it)."""
        now = time.time() if now is None else now
        has_teacher = self.teacher.directory.is_dir()
        if has_teacher:
            self.teacher.refresh()
        self.student.refresh()
        teacher_summary, _ = _read_json(self.teacher.directory / "summary.json") if has_teacher else (None, None)
        summary, summary_mtime = _read_json(self.run_dir / "summary.json")

        # the student's train.jsonl is opened once the teacher is ready: until then, the teacher's
        stage = self.student if self.student.log.exists or not has_teacher else self.teacher
        log = stage.log
        last_time = max((t for t in (self.teacher.log.last_time, self.student.log.last_time) if t), default=None)
        # a summary older than the last record is from before a resume: the run goes on
        finished = (
            summary is not None
            and summary.get("status") in FINAL_STATUSES
            and (last_time is None or summary_mtime is None or summary_mtime + 1.0 >= last_time)
        )

        total = None
        if log.run_start and isinstance(log.run_start.get("total_steps"), int):
            total = log.run_start["total_steps"]
        total = total or stage.run_setting("steps")
        if total is None and stage is self.teacher:
            total = ((self.student.recipe or {}).get("teacher") or {}).get("steps")
        validate_every = stage.run_setting("validate_every")
        if validate_every is None and stage is self.teacher:
            validate_every = ((self.student.recipe or {}).get("teacher") or {}).get("validate_every")

        last = log.last_step
        step = last.get("step") if last else None
        iteration = last.get("iteration", step) if last else None
        validations = stage.validations()
        seconds_per_step = _seconds_per_step(log)

        activity, since = self._activity(stage, finished, teacher_summary, step, validations, validate_every, total)
        age = now - since if since is not None else None
        eta = validations_left = None
        validation_seconds = _mean([v["seconds"] for v in validations[-3:] if v["seconds"]])
        running = activity in ("training", "validating")
        if running and total and step is not None and validate_every:
            # those at the steps still to come: every validate_every, and the last step
            validations_left = max(
                total // validate_every
                - step // validate_every
                + (1 if total % validate_every and total > step else 0),
                0,
            )
        if running and seconds_per_step and total and step is not None:
            # the validations still to come are part of the stage's time: 10% of it in the default run
            eta = max(total - step, 0) * seconds_per_step
            if validations_left and validation_seconds:
                eta += validations_left * validation_seconds
            if activity == "validating" and validation_seconds and age is not None:
                eta += max(validation_seconds - age, 0.0)
        if activity in ("training", "validating"):
            limit = STALE_SECONDS
            if activity == "training" and seconds_per_step:
                limit = max(limit, 10 * seconds_per_step)
            if activity == "validating":
                limit = max(limit, 3 * (_mean([v["seconds"] for v in validations if v["seconds"]]) or 0.0))
        else:
            limit = SLOW_PHASE_STALE_SECONDS
        stale = not finished and age is not None and age > limit

        snapshot: dict[str, Any] = {
            "run_dir": str(self.run_dir),
            "time": round(now, 3),
            "status": (summary or {}).get("status") if finished else "running",
            "finished": finished,
            "stage": stage.name,
            "stages": ["teacher", "distillation"] if has_teacher else ["distillation"],
            "activity": activity,
            "step": step,
            "iteration": iteration,
            "total_steps": total,
            "percent": round(100.0 * step / total, 2) if total and step is not None else None,
            "seconds_per_step": round(seconds_per_step, 4) if seconds_per_step else None,
            "steps_per_minute": round(60.0 / seconds_per_step, 1) if seconds_per_step else None,
            "eta_seconds": round(eta, 1) if eta is not None else None,
            "validate_every": validate_every,
            "validations_left": validations_left,
            "eta_includes_validations": bool(validations_left and validation_seconds),
            "last_record_time": last_time,
            "seconds_since": round(age, 1) if age is not None else None,
            "stale": stale,
            "metrics": _metrics(last),
            "validation": _validation_summary(validations),
            "rollbacks": {
                "count": sum(1 for r in log.rollbacks if r.get("event") == "rollback"),
                "last": _rollback_summary(log.rollbacks[-1]) if log.rollbacks else None,
            },
            "teacher": _summary_fields(teacher_summary) if teacher_summary else None,
            "summary": _summary_fields(summary) if finished and summary else None,
            "damaged_lines": log.damaged + stage.history.damaged,
        }
        if finished and summary and isinstance(summary.get("rollbacks"), int):
            snapshot["rollbacks"]["count"] = summary["rollbacks"]
        return snapshot

    def _activity(
        self,
        stage: _Stage,
        finished: bool,
        teacher_summary: dict[str, Any] | None,
        step: int | None,
        validations: list[dict[str, Any]],
        validate_every: int | None,
        total: int | None,
    ) -> tuple[str, float | None]:
        """What the run is doing, and since when: the clock for the "stalled?" warning."""
        log = stage.log
        if finished:
            return "finished", None
        if stage is self.teacher and teacher_summary is not None:
            # the teacher is trained; the student's log opens once its outputs are cached
            return "preparing", _mtime(self.teacher.directory / "summary.json")
        if log.lifecycle is not None and log.lifecycle.get("event") == "run_end":
            return "finalizing", log.last_time
        if step is None:
            started = [_mtime(stage.directory / "recipe.toml"), _mtime(log.path), log.last_time]
            return "waiting", max((t for t in started if t), default=None)
        due = bool(validate_every and step % validate_every == 0) or step == total
        validated = any(v["step"] == step for v in validations[-2:])
        if due and not validated:
            return "validating", log.last_time
        return "training", log.last_time


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _seconds_per_step(log: TrainLog) -> float | None:
    """Training time per step over the recent step records: iterations (which a rollback does not
    set back) divided by the time between records, leaving out intervals that contain an event
    (a validation pause, a rollback, a resume)."""
    records = list(log.steps)
    if len(records) < 2:
        return None
    newest = records[-1][2]
    seconds = 0.0
    iterations = 0
    intervals = 0
    for (_, it0, t0, _), (_, it1, t1, after_event) in zip(reversed(records[:-1]), reversed(records[1:])):
        if intervals >= RATE_RECORDS:
            break
        if t1 is None or t0 is None or newest is None:
            continue
        if intervals >= MIN_RATE_INTERVALS and newest - t0 > RATE_SECONDS:
            break
        if after_event or it1 <= it0 or t1 < t0:
            continue
        seconds += t1 - t0
        iterations += it1 - it0
        intervals += 1
    return seconds / iterations if iterations and seconds > 0 else None


def _metrics(record: dict[str, Any] | None) -> dict[str, float]:
    """The numeric values of the last step record, the main ones first."""
    if not record:
        return {}
    numbers = {k: v for k, v in record.items() if _number(v) and k not in ("step", "iteration", "time")}
    ordered = {k: numbers[k] for k in MAIN_METRICS if k in numbers}
    ordered.update((k, v) for k, v in numbers.items() if k not in ordered)
    return ordered


def _validation_summary(validations: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last validation, its change since the one before, and the best so far by composite."""
    if not validations:
        return None
    last = validations[-1]
    composite = last["scores"].get("composite")
    previous_step, change = last.get("previous_step"), last.get("delta_previous")
    if change is None and len(validations) > 1 and composite is not None:
        before = validations[-2]
        if _number(before["scores"].get("composite")):
            previous_step, change = before["step"], composite - before["scores"]["composite"]
    kept = [v for v in validations if not v["rolled_back"] and _number(v["scores"].get("composite"))]
    best = max(kept, key=lambda v: v["scores"]["composite"]) if kept else None
    return {
        "step": last["step"],
        "iteration": last["iteration"],
        "scores": last["scores"],
        "composite": composite,
        "previous_step": previous_step,
        "change": change,
        "retention": last.get("retention"),
        "rolled_back": last["rolled_back"],
        "seconds": last["seconds"],
        "best_step": best["step"] if best else None,
        "best_composite": best["scores"]["composite"] if best else None,
        "count": len(validations),
    }


def _rollback_summary(event: dict[str, Any]) -> dict[str, Any]:
    keys = ("event", "time", "from_step", "to_step", "step", "reason", "error", "lr_scale", "checkpoint")
    return {k: event[k] for k in keys if k in event}


def _summary_fields(summary: dict[str, Any]) -> dict[str, Any]:
    extra = _table(summary.get("extra"))
    gate = _table(summary.get("gate") or extra.get("gate")) or None  # extra.gate: runs made before gate was a field
    return {
        "status": summary.get("status"),
        "final_step": summary.get("final_step"),
        "iterations": summary.get("iterations_executed"),
        "rollbacks": summary.get("rollbacks"),
        "wall_seconds": summary.get("wall_seconds"),
        "error": summary.get("error"),
        "stop_reason": extra.get("stop_reason"),
        "gate": {"passed": gate.get("passed"), "verdict": gate.get("verdict")} if gate else None,
    }


# --- the text block -----------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """``42s``, ``5m12s``, ``1h02m``: short enough for a status line."""
    seconds = int(round(max(seconds, 0.0)))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value != 0 and abs(value) < 0.001:
        return f"{value:.2e}"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def render(snapshot: dict[str, Any]) -> str:
    """The compact block ``cvmkd monitor`` prints: six to eight lines."""
    s = snapshot
    lines: list[str] = []
    stage = "teacher training" if s["stage"] == "teacher" else "distillation"
    if len(s["stages"]) > 1:
        stage += f" (stage {s['stages'].index(s['stage']) + 1}/{len(s['stages'])})"
    teacher = s["teacher"]
    if s["stage"] != "teacher" and teacher:
        took = f" in {duration(teacher['wall_seconds'])}" if _number(teacher.get("wall_seconds")) else ""
        stage += f"; teacher {teacher['status']} at step {teacher['final_step']}{took}"
    lines.append(f"{s['run_dir']}: {s['status']}, {stage}")

    if s["step"] is None:
        lines.append(f"step 0/{s['total_steps']}" if s["total_steps"] else "step -")
    else:
        total = f"/{s['total_steps']} ({s['percent']:.1f}%)" if s["total_steps"] else ""
        iterations = f", {s['iteration']} iterations" if s["iteration"] not in (None, s["step"]) else ""
        line = f"step {s['step']}{total}{iterations}"
        if s["seconds_per_step"]:
            line += f"  {s['seconds_per_step']:.3g} s/step ({s['steps_per_minute']:.0f} steps/min)"
        if s["eta_seconds"] is not None and not s["stale"]:  # a stalled run's ETA means nothing
            line += f"  ETA {duration(s['eta_seconds'])}"
            left = s["validations_left"]
            if left:
                plural = "s" if left > 1 else ""
                line += (
                    f" incl. {left} validation{plural}"
                    if s["eta_includes_validations"]
                    else f" + {left} validation{plural}"
                )
        lines.append(line)

    lines.append(_activity_line(s))
    if s["metrics"]:
        shown = [(k, v) for k, v in s["metrics"].items() if k not in NOT_METRICS][:9]
        lines.append("  ".join(f"{k} {_value(v)}" for k, v in shown))
    lines.append(_validation_line(s["validation"]))
    rollbacks = s["rollbacks"]
    if rollbacks["last"]:
        last = rollbacks["last"]
        where = (
            f"step {last['from_step']} -> {last['to_step']}" if "from_step" in last else f"at step {last.get('step')}"
        )
        lines.append(f"rollbacks: {rollbacks['count']}, last {where}: {last.get('reason', '?')}")
    else:
        lines.append(f"rollbacks: {rollbacks['count'] or 'none'}")
    if s["damaged_lines"]:
        lines.append(f"warning: {s['damaged_lines']} damaged line(s) skipped in the logs")
    return "\n".join(lines)


def _activity_line(s: dict[str, Any]) -> str:
    summary, age = s["summary"], s["seconds_since"]
    if summary:
        took = f" in {duration(summary['wall_seconds'])}" if _number(summary.get("wall_seconds")) else ""
        line = f"finished: {summary['status']} at step {summary['final_step']}{took}"
        reason = summary.get("error") or summary.get("stop_reason")
        if reason:
            line += f" ({reason})"
        if summary.get("gate"):
            line += f"; {summary['gate'].get('verdict') or ('gate passed' if summary['gate'].get('passed') else 'gate failed')}"
        return line
    ago = duration(age) if age is not None else "?"
    if s["stale"]:
        what = {
            "training": "no new step",
            "validating": f"validating step {s['step']}, no new record",
            "waiting": "waiting for the first step, nothing written",
            "preparing": "preparing distillation, nothing written",
            "finalizing": "finalizing, no summary.json",
        }[s["activity"]]
        return f"{what} for {ago}: stalled, or the process has died?"
    return {
        "training": f"last step {ago} ago",
        "validating": f"validating step {s['step']} for {ago}",
        "waiting": f"waiting for the first step ({ago})",
        "preparing": f"preparing distillation (caching the teacher's outputs) for {ago}",
        "finalizing": f"training done; finalizing (evaluation, export, reports) for {ago}",
    }[s["activity"]]


def _validation_line(v: dict[str, Any] | None) -> str:
    if not v:
        return "validation: none yet"
    names = [k for k in MAIN_SCORES if k in v["scores"]] or list(v["scores"])[:3]
    parts = []
    for name in names:
        part = f"{name} {v['scores'][name]:.2f}"
        if name == "composite" and v["change"] is not None:
            against = f" vs step {v['previous_step']}" if v["previous_step"] is not None else ""
            part += f" ({_signed(v['change'])}{against})"
        parts.append(part)
    line = f"validation @ step {v['step']}: " + "  ".join(parts)
    if v["rolled_back"]:
        line += "  [rolled back]"
    if v["best_step"] is not None:
        line += f"; best step {v['best_step']}"
    return line


# --- the command --------------------------------------------------------------------------------


def check_run_dir(path: Path) -> None:
    """One-line errors for a path that is not a run directory, before anything is shown."""
    if not path.exists():
        raise RunDirError(f"no run directory at {path}")
    if not path.is_dir():
        raise RunDirError(f"{path} is a file, not a run directory")
    if not any((path / name).exists() for name in (RECIPE_FILE, DEFAULT_TRAIN_LOG, "teacher")):
        raise RunDirError(f"{path} is not a run directory: it holds no recipe.toml, train.jsonl or teacher/")


def _changed(snapshot: dict[str, Any]) -> tuple[Any, ...]:
    """What must differ for --follow to print a new block when stdout is not a terminal."""
    s = snapshot
    return (
        s["status"],
        s["stage"],
        s["activity"],
        s["step"],
        s["iteration"],
        s["stale"],
        (s["validation"] or {}).get("step"),
        s["rollbacks"]["count"],
    )


def monitor_command(args: argparse.Namespace) -> int:
    """``cvmkd monitor RUN_DIR [--follow] [--interval SECONDS] [--json]``: one block (or one JSON
    snapshot), or with ``--follow`` a block refreshed until the run ends. Ctrl-C exits quietly."""
    run_dir = Path(args.run_dir)
    check_run_dir(run_dir)
    if args.interval <= 0:
        raise CvmkdError(f"--interval must be a positive number of seconds (got {args.interval:g})")
    monitor = Monitor(run_dir)
    try:
        if args.json:
            print(json.dumps(monitor.snapshot(), indent=2))
        elif not args.follow:
            print(render(monitor.snapshot()))
        else:
            _follow(monitor, args.interval)
        sys.stdout.flush()
    except BrokenPipeError:
        # ``cvmkd monitor ... | head``: the reader has what it wanted; don't fail at exit either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _follow(monitor: Monitor, interval: float) -> None:
    """Refresh until the run has finished; the final block is always printed."""
    terminal = sys.stdout.isatty()
    shown: tuple[Any, ...] | None = None
    try:
        while True:
            snapshot = monitor.snapshot()
            if terminal:
                sys.stdout.write(_CLEAR + render(snapshot) + "\n")
            elif _changed(snapshot) != shown:
                sys.stdout.write(("\n" if shown is not None else "") + render(snapshot) + "\n")
                shown = _changed(snapshot)
            sys.stdout.flush()
            if snapshot["finished"]:
                return
            time.sleep(interval)
    except KeyboardInterrupt:
        return
