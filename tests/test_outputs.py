"""What a finished run hands its user: model packages with their full metadata, teacher and
student size and speed side by side, and ``cvmkd translate`` on every package (fp32 and each
quantized variant), with one-line errors for damaged packages and bad options."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from cvmkd_core.cli import main
from cvmkd_core.session import open_session, run_session
from cvmkd_nmt.model.package import load_package
from cvmkd_nmt.model.translate import translate
from cvmkd_testing import TINY_KD_RECIPE, write_tiny_corpus

RECIPE = (
    TINY_KD_RECIPE
    + """
[guard]
name = "guard"
retention_threshold = 0.01

[[quantize]]
name = "dynamic-int8"
max_bleu_loss = 100.0
max_composite_loss = 1.0

[[quantize]]
name = "nbit"
bits = 4
max_bleu_loss = 100.0
max_composite_loss = 1.0
"""
)

SOURCES = ["le chat mange", "", "le petit chien voit le chat", "le chien"]


@pytest.fixture(scope="module")
def finished_run(
    tmp_path_factory: pytest.TempPathFactory, tiny_kd_cache: Path
) -> Iterator[tuple[Path, dict[str, Any]]]:
    root = tmp_path_factory.mktemp("outputs")
    write_tiny_corpus(root)
    (root / "recipe.toml").write_text(RECIPE.replace('cache_dir = "cache"', f'cache_dir = "{tiny_kd_cache}"'))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        summary, run_dir = run_session(open_session(root / "recipe.toml", []))
        assert summary.status == "completed"
        yield root / run_dir, json.loads((root / run_dir / "summary.json").read_text())
    torch.set_num_threads(threads)


def _packages(run_dir: Path) -> list[Path]:
    return [run_dir / "model", run_dir / "model-dynamic-int8", run_dir / "model-nbit"]


def test_every_package_records_the_run_its_scores_and_the_gate(finished_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, summary = finished_run
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    quantized = {q["name"]: q for q in summary["quantized"]}
    for package in _packages(run_dir):
        meta = json.loads((package / "metadata.json").read_text())
        assert meta["recipe"]["run"]["name"] == "tiny" and re.fullmatch(r"[0-9a-f]{64}", meta["recipe_sha256"])
        assert meta["cvmkd_version"] and {"cvmkd-kd", "cvmkd-metrics-sacrebleu", "cvmkd-guard"} <= set(meta["plugins"])
        assert re.fullmatch(r"[0-9a-f]{64}", meta["teacher"]["weights_sha256"])
        assert meta["run"]["iterations_executed"] == summary["iterations_executed"] == 12
        assert meta["run"]["status"] == "completed" and meta["run"]["wall_seconds"] == summary["wall_seconds"]
        assert meta["hardware"]["torch"] == torch.__version__
        gate = summary["gate"]
        assert meta["gate"]["verdict"] == gate["verdict"] and meta["gate"]["run_passed"] is gate["passed"]
        assert meta["gate"]["checks"] and meta["gate"]["passed"] is all(c["passed"] for c in meta["gate"]["checks"])
        revision = meta["source_revision"]
        if (Path(__file__).parents[1] / ".git").exists():  # the tests run from a git checkout of cvmkd
            head = subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
            ).stdout.strip()
            assert revision is not None and revision["commit"] == head
        if package.name == "model":
            assert meta["quantization"] == {"scheme": "none", "bits": 32}
            assert meta["test_scores"] == evaluation["student"]["scores"]
            assert meta["retention"] == evaluation["retention"]
            assert [c["model"] for c in meta["gate"]["checks"]] == ["student"] * len(meta["gate"]["checks"])
        else:
            name = package.name[len("model-") :]
            assert meta["quantization"]["scheme"] == quantized[name]["scheme"] == meta["scheme"]
            assert meta["test_scores"] == quantized[name]["scores"]
            assert meta["retention"] == quantized[name]["retention"]
            assert {c["model"] for c in meta["gate"]["checks"]} == {name}
        load_package(package)  # stamping the metadata left the weights' recorded sha256 valid


def test_teacher_and_student_size_and_speed_are_measured_side_by_side(
    finished_run: tuple[Path, dict[str, Any]],
) -> None:
    run_dir, _ = finished_run
    models = json.loads((run_dir / "evaluation.json").read_text())["models"]
    student_meta = json.loads((run_dir / "model" / "metadata.json").read_text())
    assert models["student"]["parameters"] == student_meta["parameters"]
    assert models["teacher"]["parameters"] == student_meta["teacher"]["parameters"]
    assert models["student"]["file_bytes"] == (run_dir / "model" / "model.safetensors").stat().st_size
    root = run_dir.parent.parent  # the run was made there; the recorded paths are relative to it
    assert (
        models["teacher"]["file_bytes"] == (root / student_meta["teacher"]["path"] / "model.safetensors").stat().st_size
    )
    for who in ("teacher", "student"):
        assert models[who]["latency"]["batch_size"] == 1 and models[who]["throughput"]["batch_size"] == 32
        assert models[who]["latency"]["tokens_per_second"] > 0 and models[who]["throughput"]["tokens_per_second"] > 0
    # the quantization baseline is the same measurement, not a second one
    baseline = json.loads((run_dir / "quantization.json").read_text())["baseline"]
    assert baseline["throughput"] == models["student"]["throughput"]


def test_translate_file_to_file_matches_the_library_for_every_package(
    finished_run: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir, _ = finished_run
    source = tmp_path / "in.txt"
    source.write_text("\n".join(SOURCES) + "\n", encoding="utf-8")
    for package in _packages(run_dir):
        out = tmp_path / f"{package.name}.txt"
        assert main(["translate", "--model", str(package), "-i", str(source), "-o", str(out), "--batch-size", "2"]) == 0
        lines = out.read_text(encoding="utf-8").split("\n")[:-1]
        model, tokenizer, _ = load_package(package)
        expected = translate(model, tokenizer, [s for s in SOURCES if s])
        assert len(lines) == len(SOURCES) and lines[1] == ""  # one line out per line in, blanks kept
        assert [line for s, line in zip(SOURCES, lines) if s] == expected
        assert main(["translate", "--model", str(package), "-i", str(source), "-o", str(out), "--beam-size", "3"]) == 0
        assert len(out.read_text(encoding="utf-8").split("\n")[:-1]) == len(SOURCES)


def test_translate_reads_stdin_and_writes_stdout(finished_run: tuple[Path, dict[str, Any]]) -> None:
    run_dir, _ = finished_run
    package = run_dir / "model-dynamic-int8"
    done = subprocess.run(
        [sys.executable, "-m", "cvmkd_core.cli", "translate", "--model", str(package)],
        input="\n".join(SOURCES) + "\n",
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    model, tokenizer, _ = load_package(package)
    assert done.stdout.split("\n")[:-1][0] == translate(model, tokenizer, [SOURCES[0]])[0]
    assert len(done.stdout.split("\n")[:-1]) == len(SOURCES)
    assert "translated 4 lines" in done.stderr


def _copy_package(package: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / package.name
    shutil.copytree(package, copy)
    return copy


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-100]),
            "model.safetensors is damaged (sha256 mismatch)",
        ),
        (lambda p: (p / "tokenizer.model").unlink(), "tokenizer.model is missing"),
        (lambda p: (p / "quantization.json").write_text("{"), "quantization.json is damaged"),
        (lambda p: (p / "config.json").write_text("[1"), "config.json is damaged"),
    ],
)
def test_translate_refuses_a_damaged_package_in_one_line_and_keeps_the_output(
    finished_run: tuple[Path, dict[str, Any]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Any,
    message: str,
) -> None:
    run_dir, _ = finished_run
    package = _copy_package(run_dir / "model-nbit", tmp_path)
    damage(package)
    source, out = tmp_path / "in.txt", tmp_path / "out.txt"
    source.write_text("le chat\n")
    out.write_text("earlier work\n")
    assert main(["translate", "--model", str(package), "-i", str(source), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: model package ") and message in err[0]
    assert out.read_text() == "earlier work\n"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch-size", "0"], "error: --batch-size must be at least 1 (got 0)"),
        (["--beam-size", "-1"], "error: --beam-size must be at least 1 (got -1)"),
        (["-i", "missing.txt"], "error: --input missing.txt: no such file"),
    ],
)
def test_translate_option_errors(
    finished_run: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    run_dir, _ = finished_run
    assert main(["translate", "--model", str(run_dir / "model"), *args]) == 2
    assert capsys.readouterr().err.strip() == message


def test_translate_says_when_there_is_no_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["translate", "--model", str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no model package at {tmp_path / 'nothing'}"
    (tmp_path / "half").mkdir()
    assert main(["translate", "--model", str(tmp_path / "half")]) == 2
    assert capsys.readouterr().err.strip() == f"error: model package {tmp_path / 'half'}: model.safetensors is missing"


def test_translate_of_non_utf8_input_is_one_line(
    finished_run: tuple[Path, dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_dir, _ = finished_run
    source = tmp_path / "latin1.txt"
    source.write_bytes("le chat \xe9\n".encode("latin-1"))
    assert main(["translate", "--model", str(run_dir / "model"), "-i", str(source), "-o", str(tmp_path / "o.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --input {source}: line 1: invalid UTF-8 (byte 0xe9 at column 9)"
    assert not (tmp_path / "o.txt").exists() and not list(tmp_path.glob(".o.txt.*"))
