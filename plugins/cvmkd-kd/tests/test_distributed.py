"""Training on two CPU processes with torchrun (gloo): the same loss curve as one process at the
same global batch, rank 0 alone writing, and a run whose rank was killed resumes. Real
subprocesses, one thread each."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cvmkd_testing import TINY_KD_RECIPE, write_tiny_corpus

#: the shared tiny distillation recipe, validated every 4 steps, in float32 so that one and two
#: processes can be compared closely
SETTINGS = ["--set", "run.validate_every=4", "--set", "run.precision=fp32", "--set", "run.keep_checkpoints=2"]

#: kills rank 1 with SIGKILL after the given step; kept on every rank (cvmkd_all_ranks)
KILLER = """
import os, signal
from cvmkd_core import hookimpl

cvmkd_all_ranks = True

@hookimpl
def cvmkd_step_end(state, result):
    if state.recipe.distill.name == "kd" and state.world.rank == 1 and state.step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
"""

#: the tolerance of the loss-curve comparison: float32 sums in another order, nothing more
RELATIVE = 1e-4


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CVMKD_DISABLE_PLUGIN_AUTOLOAD"}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", CVMKD_DIST_BACKEND="gloo")
    return env


def _single(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "cvmkd_core", "run", "recipe.toml", "--quiet", *SETTINGS, *args]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _torchrun(cwd: Path, *args: str, processes: int = 2) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "cvmkd_core",
        "run",
        "recipe.toml",
        "--quiet",
        *SETTINGS,
        *args,
    ]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "train.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r and "event" not in r}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder (and one teacher, cached by the first run) for every test here."""
    path = tmp_path_factory.mktemp("distributed")
    write_tiny_corpus(path)
    (path / "recipe.toml").write_text(TINY_KD_RECIPE)
    return path


@pytest.fixture(scope="module")
def single(workdir: Path) -> Path:
    done = _single(workdir, "--run-dir", "runs/single")
    assert done.returncode == 0, done.stderr
    return workdir / "runs/single"


@pytest.fixture(scope="module")
def two(workdir: Path, single: Path) -> Path:
    done = _torchrun(workdir, "--run-dir", "runs/two")
    assert done.returncode == 0, done.stdout + done.stderr
    return workdir / "runs/two"


@pytest.mark.slow
def test_two_processes_follow_the_loss_curve_of_one_at_the_same_global_batch(single: Path, two: Path) -> None:
    one, both = _losses(single), _losses(two)
    assert sorted(one) == sorted(both) == list(range(1, 13))
    for step in one:
        assert both[step] == pytest.approx(one[step], rel=RELATIVE), step
    # the weights agree closely, not exactly: Adam divides each gradient by its own running
    # scale, so the last bits of near-zero gradients (summed in another order) move them a little
    a, b = load_file(single / "model/model.safetensors"), load_file(two / "model/model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=5e-3, msg=name)


@pytest.mark.slow
def test_rank_0_alone_writes_and_the_summary_records_the_world(two: Path) -> None:
    summary = json.loads((two / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == 12
    assert summary["extra"]["world_size"] == 2
    assert summary["extra"]["distributed"] == {"world_size": 2, "backend": "gloo"}
    trainer = summary["extra"]["trainer"]["distributed"]
    assert trainer["global_batch"] == 8 and trainer["per_rank"] == "4-4 sentences"
    # one line per step and per validation: nothing written twice
    assert len(_losses(two)) == 12
    history = (two / "validation/history.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in history] == [4, 8, 12]


@pytest.mark.slow
def test_a_killed_rank_leaves_a_resumable_run(workdir: Path, two: Path) -> None:
    (workdir / "killer.py").write_text(KILLER.format(step=6))
    killed = _torchrun(workdir, "--run-dir", "runs/killed", "--plugin", "killer.py")
    assert killed.returncode != 0
    run_dir = workdir / "runs/killed"
    manifest = json.loads((run_dir / "checkpoints/manifest.json").read_text())
    assert [c["step"] for c in manifest["checkpoints"]][-1] == 4

    resumed = _torchrun(workdir, "--run-dir", "runs/killed", "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_step"] == 12
    assert summary["extra"]["world_size"] == 2
    expected = [json.loads(r)["scores"] for r in (two / "validation/history.jsonl").read_text().splitlines()]
    got = [json.loads(r)["scores"] for r in (run_dir / "validation/history.jsonl").read_text().splitlines()]
    assert len(got) == len(expected) == 3
    for resumed_scores, whole_scores in zip(got, expected):
        assert resumed_scores == pytest.approx(whole_scores, rel=1e-6)
    assert _losses(run_dir)[12] == pytest.approx(_losses(two)[12], rel=RELATIVE)


# --- the GPU paths: run where a CUDA GPU exists, skipped (and saying why) elsewhere ------------

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpu = pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU; this machine has none")
needs_two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs two CUDA GPUs for NCCL; this machine has {GPUS}")


def _gpu_env() -> dict[str, str]:
    env = _env()
    env.pop("CVMKD_DIST_BACKEND")
    return env


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_a_gpu(workdir: Path, precision: str) -> None:
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    run_dir = workdir / f"runs/gpu-{precision}"
    command = [
        sys.executable,
        "-m",
        "cvmkd_core",
        "run",
        "recipe.toml",
        "--quiet",
        *SETTINGS,
        "--run-dir",
        str(run_dir),
    ]
    command += ["--set", "run.device=cuda", "--set", f"run.precision={precision}"]
    done = subprocess.run(command, cwd=workdir, env=_gpu_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["extra"]["trainer"]["precision"] == precision
    assert summary["extra"]["trainer"]["device"].startswith("cuda")
    losses = _losses(run_dir)
    assert len(losses) == 12 and all(v == v and abs(v) < 1e4 for v in losses.values())  # finite
    if precision == "fp16":  # the loss scaler's state is checkpointed with the weights
        checkpoint = torch.load(sorted((run_dir / "checkpoints").glob("*.pt"))[-1], weights_only=False)
        assert "scaler" in checkpoint["trainer"]


@pytest.mark.cuda
@needs_two_gpus
def test_two_gpu_processes_with_nccl(workdir: Path, single: Path) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "cvmkd_core", "run", "recipe.toml", "--quiet", *SETTINGS, "--run-dir", "runs/nccl"]
    command += ["--set", "run.device=cuda"]
    done = subprocess.run(command, cwd=workdir, env=_gpu_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads((workdir / "runs/nccl/summary.json").read_text())
    assert summary["extra"]["distributed"] == {"world_size": 2, "backend": "nccl"}
    one, both = _losses(single), _losses(workdir / "runs/nccl")
    for step in one:  # the CPU's float32 against the GPU's: TF32 and other kernels
        assert both[step] == pytest.approx(one[step], rel=1e-2), step
