"""``cvmkd monitor``: progress read from a run's files, also while another process writes them.

Every run directory here is synthetic, written by the test in the formats the loop, the ``jsonl``
logger and the validation writer produce, with step times chosen so rates and ETAs are exact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cvmkd_core.cli import main
from cvmkd_core.files import atomic_write_json
from cvmkd_monitor import monitor as monitor_module
from cvmkd_monitor.monitor import Monitor, render

T0 = 1_700_000_000.0

RECIPE = """
[run]
name = "m"
steps = 1000
validate_every = 100

[teacher]
steps = 900
validate_every = 900
"""


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record) + "\n"


def _step(step: int, t: float, iteration: int | None = None, **metrics: float) -> dict[str, Any]:
    record: dict[str, Any] = {"step": step, "iteration": step if iteration is None else iteration, "time": round(t, 3)}
    record.update(
        {
            "loss": 2.0 - step / 1000,
            "lr": 0.0005,
            "grad_norm": 0.3,
            "tokens_per_s": 5000.0,
            "kd": 0.01,
            "ce": 3.5,
            "token_accuracy": 0.4,
            "tokens": 900,
            "seconds_per_step": 0.5,
        }
    )
    record.update(metrics)
    return record


def _validation(step: int, composite: float, seconds: float = 20.0) -> dict[str, Any]:
    return {
        "step": step,
        "iteration": step,
        "scores": {"bleu": composite / 2, "chrf": composite + 10, "ter": 80.0, "composite": composite},
        "seconds": seconds,
        "details": {"sentences": 100, "analysis": {"worst": ["x" * 500]}},
        "rolled_back": False,
    }


def _distillation_run(root: Path, steps: int = 250, seconds: float = 0.5, pause: float = 20.0) -> tuple[Path, float]:
    """A run at ``steps`` of 1000, one step per ``seconds``, validated every 100 steps (each
    validation a ``pause`` in the log); returns the run directory and the last record's time."""
    run = root / "run"
    (run / "validation").mkdir(parents=True)
    (run / "recipe.toml").write_text(RECIPE)
    t = T0
    lines = [_line({"event": "run_start", "time": t, "step": 0, "total_steps": 1000})]
    history = []
    for step in range(1, steps + 1):
        t += seconds
        lines.append(_line(_step(step, t)))
        if step % 100 == 0:
            t += pause
            record = _validation(step, 10.0 + step / 50, seconds=pause)
            history.append(_line(record))
            lines.append(_line({"event": "validation", "time": t, **record}))
            lines.append(_line({"event": "checkpoint", "time": t, "step": step, "file": f"step_{step:08d}.pt"}))
    (run / "train.jsonl").write_text("".join(lines))
    (run / "validation" / "history.jsonl").write_text("".join(history))
    return run, round(t, 3)


def test_a_running_distillation_shows_step_rate_eta_losses_and_validation(tmp_path: Path) -> None:
    run, last = _distillation_run(tmp_path)
    snap = Monitor(run).snapshot(now=last + 3)
    assert snap["status"] == "running" and snap["stage"] == "distillation" and snap["activity"] == "training"
    assert (snap["step"], snap["total_steps"], snap["percent"]) == (250, 1000, 25.0)
    # validation pauses are not training speed
    assert snap["seconds_per_step"] == pytest.approx(0.5)
    assert snap["steps_per_minute"] == pytest.approx(120.0)
    # 750 steps at 0.5 s, and 8 validations of 20 s each still to come (300, 400, ... 1000)
    assert snap["validations_left"] == 8
    assert snap["eta_seconds"] == pytest.approx(750 * 0.5 + 8 * 20)
    assert snap["seconds_since"] == pytest.approx(3.0) and not snap["stale"]
    assert list(snap["metrics"])[:4] == ["loss", "kd", "ce", "token_accuracy"]
    validation = snap["validation"]
    assert (validation["step"], validation["previous_step"], validation["best_step"]) == (200, 100, 200)
    assert validation["composite"] == pytest.approx(14.0) and validation["change"] == pytest.approx(2.0)
    assert snap["rollbacks"] == {"count": 0, "last": None}

    text = render(snap)
    lines = text.splitlines()
    assert 6 <= len(lines) <= 8, text
    assert lines[0] == f"{run}: running, distillation"
    assert lines[1] == "step 250/1000 (25.0%)  0.5 s/step (120 steps/min)  ETA 8m55s incl. 8 validations"
    assert lines[2] == "last step 3s ago"
    assert lines[3].startswith(
        "loss 1.75  kd 0.01  ce 3.5  token_accuracy 0.4  lr 5.00e-04  grad_norm 0.3  tokens_per_s 5000"
    )
    assert "tokens " not in lines[3] and "seconds_per_step" not in lines[3]
    assert (
        lines[4]
        == "validation @ step 200: composite 14.00 (+2.00 vs step 100)  bleu 7.00  chrf 24.00  ter 80.00; best step 200"
    )
    assert lines[5] == "rollbacks: none"


def test_a_stalled_run_says_so(tmp_path: Path) -> None:
    run, last = _distillation_run(tmp_path)
    snap = Monitor(run).snapshot(now=last + 312)
    assert snap["stale"] and snap["status"] == "running"
    assert "no new step for 5m12s" in render(snap)


def test_a_validation_in_progress_is_not_a_stall(tmp_path: Path) -> None:
    run, _ = _distillation_run(tmp_path, steps=300)
    # the log ends with step 300's record: its validation (20 s last time) has not been written
    lines = (run / "train.jsonl").read_text().splitlines(keepends=True)
    (run / "train.jsonl").write_text("".join(lines[:-2]))
    history = (run / "validation" / "history.jsonl").read_text().splitlines(keepends=True)
    (run / "validation" / "history.jsonl").write_text("".join(history[:-1]))
    last = json.loads(lines[-3])["time"]
    snap = Monitor(run).snapshot(now=last + 45)
    assert snap["activity"] == "validating" and not snap["stale"]
    assert "validating step 300 for 45s" in render(snap)
    assert Monitor(run).snapshot(now=last + 200)["stale"]


def test_a_partial_last_line_waits_and_a_damaged_line_is_skipped(tmp_path: Path) -> None:
    run, last = _distillation_run(tmp_path)
    log = run / "train.jsonl"
    with open(log, "a") as handle:
        handle.write('{"step": 251, "iteration": 251, "time": ' + "{broken\n")
        handle.write(_line(_step(251, last + 0.5)))
        handle.write('{"step": 252, "iteration": 252, "ti')  # the writer is mid-line
    monitor = Monitor(run)
    snap = monitor.snapshot(now=last + 1)
    assert snap["step"] == 251 and snap["damaged_lines"] == 1
    assert "warning: 1 damaged line(s) skipped" in render(snap)
    with open(log, "a") as handle:  # the line is completed: the next refresh reads only the new bytes
        handle.write(f'me": {last + 1.0}, "loss": 1.0}}\n')
    snap = monitor.snapshot(now=last + 2)
    assert snap["step"] == 252 and snap["metrics"] == {"loss": 1.0} and snap["damaged_lines"] == 1


def test_rollbacks_are_counted_and_the_rate_follows_iterations(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text(RECIPE)
    lines = [_line({"event": "run_start", "time": T0, "step": 0, "total_steps": 1000})]
    t = T0
    for step in range(1, 101):
        t += 1.0
        lines.append(_line(_step(step, t)))
    for n, reason in ((1, "composite fell 12% below the best"), (2, "non-finite loss")):
        lines.append(
            _line(
                {
                    "event": "rollback",
                    "time": t,
                    "from_step": 100,
                    "to_step": 50,
                    "iteration": 100 * n,
                    "reason": reason,
                    "checkpoint": "step_00000050.pt",
                    "lr_scale": 0.5**n,
                    "rollbacks": n,
                }
            )
        )
        for i in range(1, 101 if n == 1 else 31):
            t += 1.0
            lines.append(_line(_step(50 + i, t, iteration=100 * n + i)))
    (run / "train.jsonl").write_text("".join(lines))
    snap = Monitor(run).snapshot(now=t + 1)
    assert (snap["step"], snap["iteration"]) == (80, 230)
    assert snap["seconds_per_step"] == pytest.approx(1.0)
    assert snap["rollbacks"]["count"] == 2
    assert snap["rollbacks"]["last"]["reason"] == "non-finite loss"
    text = render(snap)
    assert "step 80/1000 (8.0%), 230 iterations" in text
    assert "rollbacks: 2, last step 100 -> 50: non-finite loss" in text


def test_a_long_log_is_read_from_its_tail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    t = T0
    lines = [_line({"event": "run_start", "time": t, "step": 0, "total_steps": 30000})]
    for step in range(1, 20001):
        t += 0.2
        lines.append(_line(_step(step, t)))
        if step == 10:
            lines.append(_line({"event": "rollback", "time": t, "from_step": 10, "to_step": 0, "reason": "early"}))
    (run / "train.jsonl").write_text("".join(lines))
    parsed = []
    real_parse = monitor_module._parse
    monkeypatch.setattr(monitor_module, "_parse", lambda line: parsed.append(line) or real_parse(line))
    monitor = Monitor(run)
    snap = monitor.snapshot(now=t + 1)
    assert (snap["step"], snap["total_steps"], snap["rollbacks"]["count"]) == (20000, 30000, 1)
    assert snap["seconds_per_step"] == pytest.approx(0.2)
    assert len(parsed) < 500  # the tail and the two events, never the 20,000 step records
    parsed.clear()
    with open(run / "train.jsonl", "a") as handle:
        handle.write(_line(_step(20001, t + 0.2)))
    assert monitor.snapshot(now=t + 1)["step"] == 20001
    assert len(parsed) == 1  # a refresh reads only what was appended


def test_the_teacher_stage_comes_first(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / "teacher" / "validation").mkdir(parents=True)
    (run / "recipe.toml").write_text(RECIPE)
    # no run_start line and no teacher/recipe.toml yet: the total is the parent recipe's teacher.steps
    records = [_step(step, T0 + 1.2 * step) for step in range(1, 101)]
    (run / "teacher" / "train.jsonl").write_text("".join(_line(r) for r in records))
    snap = Monitor(run).snapshot(now=T0 + 121)
    assert (snap["stage"], snap["step"], snap["total_steps"]) == ("teacher", 100, 900)
    assert snap["seconds_per_step"] == pytest.approx(1.2)
    assert snap["validations_left"] == 1 and snap["eta_seconds"] == pytest.approx(800 * 1.2)
    text = render(snap)
    assert text.splitlines()[0] == f"{run}: running, teacher training (stage 1/2)"
    assert "step 100/900 (11.1%)  1.2 s/step (50 steps/min)  ETA 16m00s + 1 validation" in text

    # the teacher is done, the student's log not opened yet: the teacher's outputs are being cached
    atomic_write_json(
        run / "teacher" / "summary.json", {"status": "completed", "final_step": 900, "wall_seconds": 1080.0}
    )
    snap = Monitor(run).snapshot(now=time.time() + 30)
    assert (snap["stage"], snap["activity"], snap["status"]) == ("teacher", "preparing", "running")
    assert "preparing distillation" in render(snap)

    (run / "train.jsonl").write_text(_line({"event": "run_start", "time": T0 + 2000, "step": 0, "total_steps": 1000}))
    snap = Monitor(run).snapshot(now=T0 + 2005)
    assert (snap["stage"], snap["activity"], snap["step"], snap["total_steps"]) == (
        "distillation",
        "waiting",
        None,
        1000,
    )
    text = render(snap)
    assert "distillation (stage 2/2); teacher completed at step 900 in 18m00s" in text
    assert "waiting for the first step" in text


def test_a_finished_run_shows_status_exit_reason_and_gate(tmp_path: Path) -> None:
    run, last = _distillation_run(tmp_path, steps=1000)
    gate = {"passed": False, "verdict": "retention gate failed: the student keeps 81% of the teacher on bleu"}
    atomic_write_json(
        run / "summary.json",
        {
            "status": "completed",
            "final_step": 1000,
            "iterations_executed": 1000,
            "rollbacks": 0,
            "wall_seconds": 3641.4,
            "error": None,
            "gate": gate,
            "extra": {},
        },
    )
    snap = Monitor(run).snapshot(now=last + 100)
    assert snap["finished"] and snap["status"] == "completed" and snap["activity"] == "finished"
    assert snap["summary"]["gate"] == gate and snap["eta_seconds"] is None and not snap["stale"]
    text = render(snap)
    assert text.splitlines()[0] == f"{run}: completed, distillation"
    assert "finished: completed at step 1000 in 1h00m; retention gate failed: the student keeps 81%" in text

    atomic_write_json(run / "summary.json", {"status": "failed", "final_step": 420, "error": "RuntimeError: boom"})
    snap = Monitor(run).snapshot(now=last + 100)
    assert snap["status"] == "failed"
    assert "finished: failed at step 420 (RuntimeError: boom)" in render(snap)

    # a summary older than the last record is from before a resume: the run is running again
    os.utime(run / "summary.json", (last - 600, last - 600))
    snap = Monitor(run).snapshot(now=last + 1)
    assert snap["status"] == "running" and not snap["finished"]


def test_a_run_that_just_started_is_waiting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text(RECIPE)
    assert main(["monitor", str(run)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1:3] == ["step 0/1000", "waiting for the first step (0s)"]
    assert "validation: none yet" in out


def test_json_prints_one_snapshot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = _distillation_run(tmp_path)
    assert main(["monitor", str(run), "--json"]) == 0
    snap = json.loads(capsys.readouterr().out)
    assert snap["step"] == 250 and snap["validation"]["best_step"] == 200
    # the run's last record is years old by the wall clock
    assert snap["stale"] and snap["seconds_since"] > 3600


def test_follow_exits_quietly_on_ctrl_c(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = _distillation_run(tmp_path)

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(monitor_module.time, "sleep", interrupt)
    assert main(["monitor", str(run), "--follow"]) == 0
    out, err = capsys.readouterr()
    assert out.count("step 250/1000") == 1 and err == ""


def test_follow_on_a_terminal_redraws_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    run, _ = _distillation_run(tmp_path)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    sleeps = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(monitor_module.time, "sleep", sleep)
    assert main(["monitor", str(run), "--follow", "--interval", "2.5"]) == 0
    out = capsys.readouterr().out
    # unchanged or not, a terminal gets the block redrawn over the previous one at each refresh
    assert sleeps == [2.5, 2.5] and out.count("\x1b[H\x1b[2J") == 2 and out.startswith("\x1b[H\x1b[2J")


def test_a_history_rewritten_by_a_resume_is_read_again(tmp_path: Path) -> None:
    run, last = _distillation_run(tmp_path)
    monitor = Monitor(run)
    assert monitor.snapshot(now=last)["validation"]["count"] == 2
    history = run / "validation" / "history.jsonl"
    first = history.read_text().splitlines(keepends=True)[0]
    replacement = history.with_name("history.new")
    replacement.write_text(first)
    os.replace(replacement, history)  # as the resume writes it: atomically, a new file
    validation = monitor.snapshot(now=last)["validation"]
    assert (validation["count"], validation["step"], validation["best_step"]) == (1, 100, 100)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "absent", "error: no run directory at {path}"),
        (
            lambda d: (d / "file.txt", (d / "file.txt").write_text("x"))[0],
            "error: {path} is a file, not a run directory",
        ),
        (
            lambda d: (d / "empty", (d / "empty").mkdir())[0],
            "error: {path} is not a run directory: it holds no recipe.toml, train.jsonl or teacher/",
        ),
    ],
    ids=["missing", "file", "not-a-run"],
)
def test_bad_run_directories_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make: Any, message: str
) -> None:
    path = make(tmp_path)
    assert main(["monitor", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == message.format(path=path) + "\n"


def test_a_bad_interval_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run, _ = _distillation_run(tmp_path)
    assert main(["monitor", str(run), "--follow", "--interval", "0"]) == 2
    assert capsys.readouterr().err == "error: --interval must be a positive number of seconds (got 0)\n"


def test_follow_shows_a_run_being_written_and_exits_when_it_ends(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.toml").write_text(RECIPE.replace("steps = 1000", "steps = 60", 1))
    log, out_file, errors = run / "train.jsonl", tmp_path / "monitor.out", []

    def wait_for(text: str) -> None:
        """Until the monitor has printed ``text``: the writer paces itself on what the monitor
        saw, so the outcome does not depend on how fast either process runs."""
        deadline = time.time() + 60
        while text not in out_file.read_text() and time.time() < deadline:
            time.sleep(0.02)

    def write_run() -> None:
        try:
            wait_for("waiting for the first step")  # the monitor has seen the run before its first step
            with open(log, "a") as handle:
                handle.write(_line({"event": "run_start", "time": time.time(), "step": 0, "total_steps": 60}))
                handle.flush()
                for step in range(1, 61):
                    text = _line(_step(step, time.time()))
                    handle.write(text[:20])  # half a line now, the rest after a refresh may have read it
                    handle.flush()
                    if step % 20 == 0:
                        wait_for(f"step {step - 1}/60")  # it shows the last whole line, not the half one
                    handle.write(text[20:])
                    handle.flush()
                    if step % 20 == 0:
                        wait_for(f"step {step}/60")
                handle.write(_line({"event": "run_end", "time": time.time(), "status": "completed", "step": 60}))
            atomic_write_json(run / "summary.json", {"status": "completed", "final_step": 60, "wall_seconds": 3.5})
        except BaseException as exc:  # pragma: no cover - reported by the assertion below
            errors.append(exc)

    with open(out_file, "w") as stdout:
        process = subprocess.Popen(
            [sys.executable, "-m", "cvmkd_core.cli", "monitor", str(run), "--follow", "--interval", "0.1"],
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        writer = threading.Thread(target=write_run)
        writer.start()
        try:
            _, err = process.communicate(timeout=60)
        finally:
            writer.join()
            if process.poll() is None:
                process.kill()
    out = out_file.read_text()
    assert errors == []
    assert process.returncode == 0, err
    assert "waiting for the first step" in out.split("\n\n")[0]
    steps = [
        int(line.split()[1].split("/")[0]) for line in out.splitlines() if line.startswith("step ") and "/" in line
    ]
    assert len({s for s in steps if s > 0}) >= 3, out
    assert steps == sorted(steps) and steps[-1] == 60, out
    # the last block is the final one, and blocks are printed only when something changed
    blocks = out.strip().split("\n\n")
    assert "finished: completed at step 60" in blocks[-1]
    assert len(blocks) == len(set(blocks))
