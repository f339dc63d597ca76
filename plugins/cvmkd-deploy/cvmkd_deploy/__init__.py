"""cvmkd-deploy: the deployment gate, targets for what ships, measured on the artefact itself.

A deployment target is quality, speed and size together. The ``[deploy]`` section states them for
one folder of the run (the CTranslate2 int8 export, a quantized student, the student package);
every target is optional, 0 (or an empty table) leaves it unchecked::

    [deploy]
    artefact = "model-ctranslate2"   # a folder of the run directory
    threads = 1                      # the threads it translates on
    batch_size = 32                  # the batch the throughput is measured at
    latency_sentences = 50           # test sentences timed one by one for the latency
    min_retention = {bleu = 0.90, composite = 0.90}   # share of the teacher's test score
    max_latency_ms = 50.0            # per sentence, batch 1
    min_words_per_second = 0.0       # target words per second at batch_size
    min_speedup = 0.0                # that throughput over the teacher's, measured alike
    max_size_mb = 40.0               # the folder, in MB (10^6 bytes)
    max_memory_mb = 0.0              # the translating process's peak resident memory
    action = "fail"                  # fail: a missed target exits 3; warn: reported only

At the end of the run, after the exports, the test evaluation and the quantizers, the artefact
translates the test split in a process of its own (:mod:`cvmkd_deploy.measure`: its memory is its
own, its threads set before the runtime starts), and so does the teacher, the same way, for the
ratios. The artefact's translations are scored with the run's metrics against the references;
retention is over the teacher's test scores. Each target gives one verdict line with the measured
value (``deployment gate failed: model-ctranslate2 latency 61.2 ms per sentence (batch 1, 1
thread), above the target of 50 ms``); the measurements, the ratios to the teacher, the machine and
the checks go to ``summary.json`` under ``deployment``. A missed target makes ``cvmkd run`` exit
with status 3, as the retention gate does, every output kept.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import attrs
import torch

from cvmkd_core.config import ConfigValueError, ge, gt, inside_run_dir, one_of
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.stash import StashKey
from cvmkd_core.state import RunState, RunSummary, Verdict
from cvmkd_validation.contract import TranslationTrainer
from cvmkd_validation.metrics import retention
from cvmkd_validation.records import EVALUATION_RECORD
from cvmkd_validation.validation import score_all, score_specs

log = logging.getLogger("cvmkd")

#: ``summary.json`` ``deployment``: the artefact's and the teacher's measurements, the checks
DEPLOYMENT: StashKey[dict[str, Any] | None] = StashKey("deployment", lambda: None)


def _shares(_instance: Any, _attribute: Any, value: dict[str, float]) -> None:
    for key, share in value.items():
        if isinstance(share, bool) or not isinstance(share, (int, float)) or share <= 0:
            raise ConfigValueError(f"{key}: a share of the teacher's score above 0 (0.9 is 90%), got {share!r}")


@attrs.frozen
class DeployConfig:
    """``[deploy]``: the deployment targets and the artefact they are measured on."""

    artefact: str = attrs.field(default="model", validator=inside_run_dir)
    """the folder of the run directory that ships: an export or a model package"""
    threads: int = attrs.field(default=1, validator=gt(0))
    batch_size: int = attrs.field(default=32, validator=gt(0))
    latency_sentences: int = attrs.field(default=50, validator=gt(0))
    min_retention: dict[str, float] = attrs.field(factory=dict, validator=_shares)
    max_latency_ms: float = attrs.field(default=0.0, validator=ge(0))
    min_words_per_second: float = attrs.field(default=0.0, validator=ge(0))
    min_speedup: float = attrs.field(default=0.0, validator=ge(0))
    max_size_mb: float = attrs.field(default=0.0, validator=ge(0))
    max_memory_mb: float = attrs.field(default=0.0, validator=ge(0))
    action: str = attrs.field(default="fail", validator=one_of("fail", "warn"))

    @property
    def active(self) -> bool:
        """Whether the recipe states any target."""
        return bool(
            self.min_retention
            or self.max_latency_ms
            or self.min_words_per_second
            or self.min_speedup
            or self.max_size_mb
            or self.max_memory_mb
        )


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def measure_folder(folder: Path, sources: list[str], config: DeployConfig) -> dict[str, Any]:
    """:mod:`cvmkd_deploy.measure` in a process of its own, on ``config.threads`` threads."""
    with tempfile.TemporaryDirectory(prefix="cvmkd-deploy-") as tmp:
        source_file, out_file = Path(tmp) / "sources.txt", Path(tmp) / "measured.json"
        source_file.write_text("".join(s.replace("\n", " ") + "\n" for s in sources), encoding="utf-8")
        threads = str(config.threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "CT2_INTER_THREADS": "1"}
        command = [
            sys.executable,
            "-m",
            "cvmkd_deploy.measure",
            "--folder",
            str(folder),
            "--sources",
            str(source_file),
            "--threads",
            threads,
            "--batch-size",
            str(config.batch_size),
            "--latency-sentences",
            str(config.latency_sentences),
            "--out",
            str(out_file),
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0 or not out_file.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"measuring {folder} failed (exit status {done.returncode}): {last}")
        return dict(json.loads(out_file.read_text(encoding="utf-8")))


def _check(name: str, what: str, value: float, target: float, unit: str, higher_is_better: bool) -> dict[str, Any]:
    passed = value >= target if higher_is_better else value <= target
    side = ("below" if higher_is_better else "above") if not passed else "within"
    shown = f"{what} {value:g}{unit}"
    line = f"deployment gate {'passed' if passed else 'failed'}: {name} {shown}, " + (
        f"{side} the target of {target:g}{unit}" if not passed else f"within the target of {target:g}{unit}"
    )
    return {"target": what, "value": value, "limit": target, "passed": passed, "line": line}


def judge(config: DeployConfig, name: str, measured: dict[str, Any]) -> list[dict[str, Any]]:
    """One check per stated target, on the artefact's measurements."""
    checks = []
    for key, share in config.min_retention.items():
        value = (measured.get("retention") or {}).get(key)
        if value is None:
            checks.append(
                {
                    "target": f"retention {key}",
                    "value": None,
                    "limit": share,
                    "passed": False,
                    "line": f"deployment gate failed: {name} retention of the teacher's {key} not measured "
                    "(no teacher score for it on the test split)",
                }
            )
            continue
        check = _check(name, f"retention of the teacher's {key}", round(100 * value, 2), 100 * share, "%", True)
        checks.append({**check, "target": f"retention {key}"})
    threads = f"{config.threads} thread{'s' if config.threads > 1 else ''}"
    for target, what, value_key, unit, higher in (
        (config.max_latency_ms, f"latency per sentence (batch 1, {threads})", "latency_ms", " ms", False),
        (
            config.min_words_per_second,
            f"throughput (batch {config.batch_size}, {threads})",
            "words_per_second",
            " words/s",
            True,
        ),
        (config.min_speedup, f"throughput over the teacher's (batch {config.batch_size})", "speedup", "x", True),
        (config.max_size_mb, "size", "size_mb", " MB", False),
        (config.max_memory_mb, "peak memory while translating", "peak_rss_mb", " MB", False),
    ):
        if not target:
            continue
        value = measured.get(value_key)
        if value is None:
            line = f"deployment gate failed: {name} {what} not measured"
            checks.append({"target": value_key, "value": None, "limit": target, "passed": False, "line": line})
            continue
        checks.append({**_check(name, what, float(value), target, unit, higher), "target": value_key})
    return checks


@hookimpl
def cvmkd_finalize(state: RunState, summary: RunSummary) -> None:
    """Measure the artefact and the teacher, and judge each target (after the finalize phases)."""
    config: DeployConfig = state.recipe.section("deploy")
    if not config.active:
        return
    trainer = state.trainer
    record = state.stash.get(EVALUATION_RECORD, None)
    enforced = config.action == "fail"
    if summary.status not in ("completed", "stopped") or not isinstance(trainer, TranslationTrainer):
        return
    if trainer.role == "teacher":  # a teacher the run trains first is not what ships
        return
    test = trainer.test_data(state)
    folder = state.run_dir / config.artefact
    problem = None
    if test is None or record is None:
        problem = "the run scored no test split"
    elif not folder.is_dir():
        problem = f"no artefact {config.artefact} in the run directory (an [[exports]] entry or a quantizer writes it)"
    if problem is not None:
        line = f"deployment gate failed: not measured: {problem}"
        summary[DEPLOYMENT] = {"artefact": config.artefact, "passed": False, "checks": [], "verdict": line}
        summary.verdicts.append(Verdict(line=line, failed=True, enforced=enforced))
        log.warning("%s", line)
        return
    assert test is not None and record is not None
    sources, references, split = test
    log.info(
        "deployment gate: measuring %s on %d %s sentences (%d threads)", folder, len(sources), split, config.threads
    )
    from cvmkd_nmt.hardware import describe_hardware

    measured = measure_folder(folder, sources, config)
    hypotheses = measured.pop("hypotheses")
    measured["size_mb"] = round(folder_mb(folder), 3)
    scores = score_all(state, hypotheses, references, sources)
    teacher_scores = (record.get("teacher") or {}).get("scores") or {}
    measured["scores"] = scores
    measured["retention"] = retention(scores, teacher_scores, score_specs(state)) if teacher_scores else {}
    teacher: dict[str, Any] | None = None
    teacher_folder = trainer.teacher_folder(state)
    if teacher_folder is not None and Path(teacher_folder).is_dir():
        teacher = measure_folder(Path(teacher_folder), sources, config)
        teacher.pop("hypotheses")
        teacher["size_mb"] = round(folder_mb(Path(teacher_folder)), 3)
        measured["speedup"] = round(measured["words_per_second"] / max(teacher["words_per_second"], 1e-9), 3)
        measured["latency_ratio"] = round(measured["latency_ms"] / max(teacher["latency_ms"], 1e-9), 3)
        measured["size_ratio"] = round(measured["size_mb"] / max(teacher["size_mb"], 1e-9), 4)
    checks = judge(config, config.artefact, measured)
    failed = [c for c in checks if not c["passed"]]
    summary[DEPLOYMENT] = {
        "artefact": config.artefact,
        "split": split,
        "sentences": len(sources),
        "machine": describe_hardware(torch.device("cpu")),
        "threads": config.threads,
        "batch_size": config.batch_size,
        "measured": measured,
        "teacher": teacher,
        "checks": checks,
        "passed": not failed,
        "enforced": enforced,
    }
    for check in checks:
        if check["passed"]:
            log.info("%s", check["line"])
        else:
            log.warning("%s", check["line"])
        summary.verdicts.append(Verdict(line=check["line"], failed=not check["passed"], enforced=enforced))


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.section("deploy", DeployConfig)


__all__ = ["DEPLOYMENT", "DeployConfig", "folder_mb", "judge", "measure_folder"]
