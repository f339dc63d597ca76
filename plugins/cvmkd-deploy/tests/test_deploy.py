"""The deployment gate in real tiny distillations, through ``cvmkd run`` as a user runs it: the
student package is measured in a process of its own beside its teacher; impossible latency, size
and retention targets each fail with their line and exit status 3; reachable ones pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvmkd_core.cli import EXIT_VERDICT_FAILED, main
from cvmkd_deploy import DeployConfig, judge
from cvmkd_testing import TINY_KD_RECIPE, write_tiny_corpus


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the module's runs: the tiny teacher is trained once."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_cache: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_tiny_corpus(tmp_path)
    (tmp_path / "cache-dir").write_text(str(shared_cache))
    return tmp_path


def _run(root: Path, deploy: str, name: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, dict]:
    recipe = TINY_KD_RECIPE.replace('name = "tiny"', f'name = "{name}"')
    recipe = recipe.replace('cache_dir = "cache"', f'cache_dir = "{(root / "cache-dir").read_text()}"')
    (root / f"{name}.toml").write_text(recipe + deploy)
    status = main(["run", f"{name}.toml", "--quiet"])
    err = capsys.readouterr().err
    summary = json.loads((root / "runs" / name / "summary.json").read_text())
    return status, err, summary


def test_impossible_latency_size_and_retention_each_fail_with_their_line_and_exit_3(
    corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deploy = """
[deploy]
artefact = "model"
latency_sentences = 4
min_retention = {bleu = 50.0}
max_latency_ms = 0.0001
max_size_mb = 0.000001
"""
    status, err, summary = _run(corpus, deploy, "impossible", capsys)
    assert status == EXIT_VERDICT_FAILED
    deployment = summary["deployment"]
    assert deployment["passed"] is False and deployment["enforced"] is True
    measured, teacher = deployment["measured"], deployment["teacher"]
    # measured on the artefact itself, in a process of its own, beside the teacher measured alike
    assert measured["latency_ms"] > 0.0001 and measured["latency_sentences"] == 4
    # (the package's metadata is stamped with the run's outcome after the gate: a few bytes more)
    assert measured["size_mb"] == pytest.approx(
        sum(p.stat().st_size for p in (corpus / "runs" / "impossible" / "model").rglob("*") if p.is_file()) / 1e6,
        rel=0.02,
    )
    assert measured["peak_rss_mb"] >= measured["loaded_rss_mb"] > 0
    assert teacher is not None and teacher["words_per_second"] > 0
    assert measured["speedup"] == pytest.approx(measured["words_per_second"] / teacher["words_per_second"], rel=1e-2)
    assert deployment["machine"]["cpu"] and deployment["threads"] == 1
    # retention from the artefact's own translations, scored by the run's metrics
    evaluation = json.loads((corpus / "runs" / "impossible" / "evaluation.json").read_text())
    teacher_bleu = evaluation["teacher"]["scores"]["bleu"]
    if teacher_bleu > 0:
        assert measured["retention"]["bleu"] == pytest.approx(measured["scores"]["bleu"] / teacher_bleu)
    # one line per target, each with its measured value, printed on stderr
    lines = [c["line"] for c in deployment["checks"]]
    assert [c["target"] for c in deployment["checks"]] == ["retention bleu", "latency_ms", "size_mb"]
    assert all(not c["passed"] for c in deployment["checks"])
    assert lines[0].startswith("deployment gate failed: model retention of the teacher's bleu ")
    assert lines[0].endswith("%, below the target of 5000%")
    assert lines[1] == (
        f"deployment gate failed: model latency per sentence (batch 1, 1 thread) {measured['latency_ms']:g} ms, "
        "above the target of 0.0001 ms"
    )
    assert lines[2] == (f"deployment gate failed: model size {measured['size_mb']:g} MB, above the target of 1e-06 MB")
    for line in lines:
        assert line in err


def test_reachable_targets_pass_and_the_run_exits_0(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    deploy = """
[deploy]
latency_sentences = 2
max_latency_ms = 100000.0
max_size_mb = 1000.0
max_memory_mb = 100000.0
min_speedup = 0.0001
"""
    status, err, summary = _run(corpus, deploy, "reachable", capsys)
    assert status == 0, err
    deployment = summary["deployment"]
    assert deployment["passed"] is True
    assert [c["target"] for c in deployment["checks"]] == ["latency_ms", "speedup", "size_mb", "peak_rss_mb"]
    assert all(c["line"].startswith("deployment gate passed: model ") for c in deployment["checks"])
    assert "deployment gate" not in err  # passed verdicts are logged, not printed as failures


def test_a_missing_artefact_is_a_failed_verdict_naming_it(corpus: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, err, summary = _run(
        corpus, '\n[deploy]\nartefact = "model-ctranslate2"\nmax_size_mb = 10.0\n', "none", capsys
    )
    assert status == EXIT_VERDICT_FAILED
    assert "deployment gate failed: not measured: no artefact model-ctranslate2 in the run directory" in err
    assert summary["deployment"]["passed"] is False


def test_targets_are_judged_with_their_direction() -> None:
    config = DeployConfig(max_latency_ms=10.0, min_words_per_second=100.0, min_retention={"bleu": 0.9})
    measured = {"latency_ms": 9.5, "words_per_second": 99.0, "retention": {"bleu": 0.91}}
    checks = judge(config, "m", measured)
    assert [(c["target"], c["passed"]) for c in checks] == [
        ("retention bleu", True),
        ("latency_ms", True),
        ("words_per_second", False),
    ]
    assert checks[2]["line"] == (
        "deployment gate failed: m throughput (batch 32, 1 thread) 99 words/s, below the target of 100 words/s"
    )
    assert not DeployConfig().active and config.active
