"""A distillation run killed with SIGKILL and resumed ends exactly where the uninterrupted run
ends; a first Ctrl-C stops after the step with a resumable checkpoint. Real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cvmkd_testing import write_tiny_corpus

RECIPE = """
[run]
name = "tiny"
steps = 16
validate_every = 4
seed = 5
cache_dir = "cache"
keep_checkpoints = 1

[corpus]
name = "files"
train = "corpus.tsv"
valid_size = 8
test_size = 8

[tokenizer]
vocab_size = 40

[teacher]
steps = 8
validate_every = 8
batch_size = 16
learning_rate = 3e-3
warmup_steps = 2

[teacher.model]
name = "cvm"
preset = "tiny"

[student.model]
name = "cvm"
preset = "tiny"
d_model = 16
n_heads = 2

[distill]
name = "kd"
batch_size = 8
warmup_steps = 2
topk = 4

[distill.loss]
name = "kd"
temperature = 2.0

[validation]
metrics = ["bleu", "chrf"]
significance_samples = 50
"""

#: kills its own process with SIGKILL, no clean-up of any kind, after the given step
KILLER = """
import os, signal
from cvmkd_core import hookimpl

@hookimpl
def cvmkd_step_end(state, result):
    if state.recipe.distill.name == "kd" and state.step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
"""

#: sends itself SIGINT (a Ctrl-C) once, after the given step; ``twice`` sends a second one
INTERRUPTER = """
import os, signal
from cvmkd_core import hookimpl

@hookimpl
def cvmkd_step_end(state, result):
    if state.recipe.distill.name == "kd" and state.step == {step}:
        os.kill(os.getpid(), signal.SIGINT)
        if {twice}:
            os.kill(os.getpid(), signal.SIGINT)
"""


#: slows every student step down, so that another process can act while the run trains
SLOW = """
import time
from cvmkd_core import hookimpl

@hookimpl
def cvmkd_step_end(state, result):
    if state.recipe.distill.name == "kd":
        time.sleep({seconds})
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    write_tiny_corpus(tmp_path)
    (tmp_path / "recipe.toml").write_text(RECIPE)
    return tmp_path


def _cvmkd(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CVMKD_DISABLE_PLUGIN_AUTOLOAD"}
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "cvmkd_core.cli", "run", "recipe.toml", "--quiet", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _start(cwd: Path, *args: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k != "CVMKD_DISABLE_PLUGIN_AUTOLOAD"}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "cvmkd_core.cli", "run", "recipe.toml", "--quiet", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_student_step(run_dir: Path, step: int, process: subprocess.Popen[str]) -> None:
    """Until the student's train log has reached ``step`` (the teacher stage logs elsewhere)."""
    deadline = time.monotonic() + 240
    log = run_dir / "train.jsonl"
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        lines = log.read_text().splitlines() if log.is_file() else []
        if any(json.loads(x).get("step", 0) >= step and "loss" in json.loads(x) for x in lines if x.strip()):
            return
        time.sleep(0.1)
    raise AssertionError(f"no step {step} in {log}")


def _history(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "validation" / "history.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_run_killed_with_sigkill_and_resumed_ends_like_the_uninterrupted_run(workdir: Path) -> None:
    whole = _cvmkd(workdir, "--run-dir", "runs/whole")
    assert whole.returncode == 0, whole.stderr

    (workdir / "killer.py").write_text(KILLER.format(step=10))
    killed = _cvmkd(workdir, "--run-dir", "runs/killed", "--plugin", "killer.py")
    assert killed.returncode == -signal.SIGKILL
    killed_dir = workdir / "runs/killed"
    assert not (killed_dir / "summary.json").exists()  # never finalized
    manifest = json.loads((killed_dir / "checkpoints" / "manifest.json").read_text())
    kept = [c["step"] for c in manifest["checkpoints"]]
    assert kept[-1] == 8 and set(kept) <= {4, 8}  # the last one, and the best if it was step 4

    resumed = _cvmkd(workdir, "--run-dir", "runs/killed", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((killed_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == 16
    assert summary["iterations_executed"] == 16  # the two lost iterations are not counted twice

    a = load_file(workdir / "runs/whole/model/model.safetensors")
    b = load_file(killed_dir / "model/model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name
    expected, got = _history(workdir / "runs/whole"), _history(killed_dir)
    assert [r["step"] for r in got] == [4, 8, 12, 16]
    assert [r["scores"] for r in got] == [r["scores"] for r in expected]
    events = [json.loads(line) for line in (killed_dir / "train.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "resume" and e.get("step") == 8 for e in events)


@pytest.mark.slow
def test_a_first_ctrl_c_stops_after_the_step_with_a_checkpoint_and_the_run_resumes(workdir: Path) -> None:
    (workdir / "interrupt.py").write_text(INTERRUPTER.format(step=6, twice=False))
    stopped = _cvmkd(workdir, "--run-dir", "runs/x", "--plugin", "interrupt.py")
    assert stopped.returncode == 130
    # the hint repeats the command exactly, plugin files and --set options included
    hint = "continue with: cvmkd run recipe.toml --plugin interrupt.py --resume --run-dir runs/x"
    assert f"interrupted at step 6; {hint}" in stopped.stderr
    run_dir = workdir / "runs/x"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["final_step"] == 6
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    assert [c["step"] for c in manifest["checkpoints"]][-1] == 6

    resumed = _cvmkd(workdir, "--run-dir", "runs/x", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == summary["iterations_executed"] == 16
    assert [r["step"] for r in _history(run_dir)] == [4, 8, 12, 16]


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once(workdir: Path) -> None:
    (workdir / "interrupt.py").write_text(INTERRUPTER.format(step=6, twice=True))
    started = time.perf_counter()
    stopped = _cvmkd(workdir, "--run-dir", "runs/y", "--plugin", "interrupt.py")
    assert stopped.returncode == 130
    hint = "continue with: cvmkd run recipe.toml --plugin interrupt.py --resume --run-dir runs/y"
    assert stopped.stderr.strip().splitlines()[-1] == f"error: interrupted; {hint}"
    summary = json.loads((workdir / "runs/y" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["final_step"] == 6
    manifest = json.loads((workdir / "runs/y" / "checkpoints" / "manifest.json").read_text())
    assert [c["step"] for c in manifest["checkpoints"]] == [4]  # no checkpoint at the interrupt
    assert time.perf_counter() - started < 120


def _weights_equal(a_dir: Path, b_dir: Path) -> None:
    a = load_file(a_dir / "model/model.safetensors")
    b = load_file(b_dir / "model/model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] == b[name]).all(), name


@pytest.mark.slow
def test_sigterm_stops_like_a_first_ctrl_c_and_the_run_resumes_to_the_same_weights(workdir: Path) -> None:
    whole = _cvmkd(workdir, "--run-dir", "runs/whole")
    assert whole.returncode == 0, whole.stderr

    # what `timeout -s TERM`, Slurm and Kubernetes do: SIGTERM to a run in the middle of training
    (workdir / "slow.py").write_text(SLOW.format(seconds=0.3))
    run_dir = workdir / "runs/t"
    process = _start(workdir, "--run-dir", "runs/t", "--plugin", "slow.py")
    _wait_for_student_step(run_dir, 5, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["extra"]["signal"] == "SIGTERM"
    stopped_at = summary["final_step"]
    assert 5 <= stopped_at < 16
    assert f"interrupted at step {stopped_at}; continue with: cvmkd run recipe.toml --plugin slow.py --resume" in err
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    assert manifest["checkpoints"][-1]["step"] == stopped_at

    resumed = _cvmkd(workdir, "--run-dir", "runs/t", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    _weights_equal(workdir / "runs/whole", run_dir)
    # the run's wall time counts both invocations (the first up to its checkpoint)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["wall_seconds"] > summary["extra"]["invocation_seconds"] + 0.3 * 5


#: holds the student after step 2 until the file ``release`` exists (at most two minutes)
HOLD = """
import os, time
from cvmkd_core import hookimpl

@hookimpl
def cvmkd_step_end(state, result):
    if state.recipe.distill.name == "kd" and state.step == 2:
        deadline = time.monotonic() + 120
        while not os.path.exists("release") and time.monotonic() < deadline:
            time.sleep(0.05)
"""


@pytest.mark.slow
def test_one_writer_per_run_directory(workdir: Path) -> None:
    (workdir / "hold.py").write_text(HOLD)
    run_dir = workdir / "runs/race"
    first = _start(workdir, "--run-dir", "runs/race", "--plugin", "hold.py")
    _wait_for_student_step(run_dir, 1, first)
    # the first run is training (held after its step 2) while two others try the same folder
    second = _cvmkd(workdir, "--run-dir", "runs/race", "--resume")
    fresh = _cvmkd(workdir, "--run-dir", "runs/race")
    (workdir / "release").touch()
    out, err = first.communicate(timeout=240)
    assert first.returncode == 0, err
    for refused in (second, fresh):
        assert refused.returncode == 2
        line = refused.stderr.strip()
        assert line.count("\n") == 0 and f"runs/race is in use by process {first.pid}" in line, line
    steps = [json.loads(x)["step"] for x in (run_dir / "train.jsonl").read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, 17))
    assert [r["step"] for r in _history(run_dir)] == [4, 8, 12, 16]
    # the lock goes with its process: the finished run can be resumed (and has nothing left to do)
    again = _cvmkd(workdir, "--run-dir", "runs/race", "--resume")
    assert again.returncode == 0, again.stderr


@pytest.mark.slow
def test_resume_refuses_a_changed_recipe_and_allows_more_steps(workdir: Path) -> None:
    (workdir / "interrupt.py").write_text(INTERRUPTER.format(step=6, twice=False))
    run_dir = workdir / "runs/r"
    assert _cvmkd(workdir, "--run-dir", "runs/r", "--plugin", "interrupt.py").returncode == 130
    kept = {name: (run_dir / name).read_bytes() for name in ("recipe.toml", "summary.json", "train.jsonl")}

    changed = _cvmkd(
        workdir,
        "--run-dir",
        "runs/r",
        "--resume",
        "--set",
        "distill.learning_rate=0.37",
        "--set",
        "student.model.d_model=24",
    )
    assert changed.returncode == 2
    line = changed.stderr.strip()
    assert line.count("\n") == 0 and line.startswith("error: cannot resume runs/r: the recipe differs")
    assert "distill.learning_rate 0.001 -> 0.37" in line and "student.model.d_model" in line
    assert {name: (run_dir / name).read_bytes() for name in kept} == kept  # nothing written

    longer = _cvmkd(workdir, "--run-dir", "runs/r", "--resume", "--set", "run.steps=20")
    assert longer.returncode == 0, longer.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == 20
    assert "steps = 20" in (run_dir / "recipe.toml").read_text()
    events = [json.loads(x) for x in (run_dir / "train.jsonl").read_text().splitlines()]
    (resume,) = [e for e in events if e.get("event") == "resume"]
    assert resume["changes"] == {"run.steps": {"from": 16, "to": 20}}


#: a Ctrl-C once training is over, while the run scores the student on the test split
FINALIZE_INTERRUPTER = """
import os, signal
from cvmkd_core import hookimpl

@hookimpl(tryfirst=True)
def cvmkd_evaluate(state, summary):
    if state.recipe.distill.name == "kd":
        os.kill(os.getpid(), signal.SIGINT)
"""


@pytest.mark.slow
def test_a_ctrl_c_while_finalizing_stops_at_once_and_resume_finishes_the_outputs(workdir: Path) -> None:
    (workdir / "late.py").write_text(FINALIZE_INTERRUPTER)
    stopped = _cvmkd(workdir, "--run-dir", "runs/f", "--plugin", "late.py")
    assert stopped.returncode == 130
    assert stopped.stderr.strip().splitlines()[-1].startswith("error: interrupted; continue with: cvmkd run")
    run_dir = workdir / "runs/f"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["extra"]["failed_in"], summary["final_step"]) == ("interrupted", "evaluate", 16)
    meta = json.loads((run_dir / "model/metadata.json").read_text())
    assert meta["status"] == "interrupted" and "test_scores" not in meta

    resumed = _cvmkd(workdir, "--run-dir", "runs/f", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["evaluation"]["scores"]["student"]
    assert json.loads((run_dir / "model/metadata.json").read_text())["status"] == "completed"


def test_a_cached_teacher_is_published_whole_and_never_half_copied(tmp_path: Path) -> None:
    import errno

    from cvmkd_kd.student import _publish

    def teacher(name: str, text: str) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.safetensors").write_text(text)
        return folder

    target = tmp_path / "abc123"
    _publish(teacher(".a", "first"), target)
    assert (target / "model.safetensors").read_text() == "first"
    _publish(teacher(".b", "second"), target)  # a damaged or older copy is replaced whole
    assert (target / "model.safetensors").read_text() == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["abc123"]  # nothing left aside

    # another run publishes between the two renames: its copy is kept, this one dropped
    late = teacher(".c", "third")
    original = Path.rename

    def racing(self: Path, to: Path) -> Path:
        if self == late:
            to.mkdir()
            (to / "model.safetensors").write_text("other run")
            raise OSError(errno.ENOTEMPTY, "Directory not empty")
        return original(self, to)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Path, "rename", racing)
        _publish(late, target)
    assert (target / "model.safetensors").read_text() == "other run"
