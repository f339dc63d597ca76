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
    assert [c["step"] for c in manifest["checkpoints"]] == [8]

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
    assert "interrupted at step 6; continue with: cvmkd run recipe.toml --resume --run-dir runs/x" in stopped.stderr
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
    assert stopped.stderr.strip().splitlines()[-1] == "error: interrupted"
    summary = json.loads((workdir / "runs/y" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["final_step"] == 6
    manifest = json.loads((workdir / "runs/y" / "checkpoints" / "manifest.json").read_text())
    assert [c["step"] for c in manifest["checkpoints"]] == [4]  # no checkpoint at the interrupt
    assert time.perf_counter() - started < 120
