"""The whole distillation pipeline on a tiny corpus made here: teacher trained through the loop
and cached, student distilled, model package written, test split scored for both."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from cvmkd_core.errors import ModelError
from cvmkd_core.session import open_session, run_session
from cvmkd_kd.loss import cxx_compiler
from cvmkd_nmt.model.package import load_package
from cvmkd_testing import TINY_KD_RECIPE, write_tiny_corpus

# the shared tiny recipe, scored with all three sacrebleu metrics and tested for significance
RECIPE = TINY_KD_RECIPE.replace(
    'metrics = ["bleu", "chrf"]\nsignificance_samples = 0', 'metrics = ["bleu", "chrf", "ter"]'
)
assert RECIPE != TINY_KD_RECIPE


@pytest.fixture
def tiny_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_tiny_corpus(tmp_path)
    (tmp_path / "recipe.toml").write_text(RECIPE)
    torch.set_num_threads(1)  # tiny models run faster on one thread
    return tmp_path


def _run(path: Path, *overrides: str) -> tuple[dict, Path]:
    summary, run_dir = run_session(open_session(path / "recipe.toml", list(overrides)))
    assert summary.status == "completed"
    return json.loads((run_dir / "summary.json").read_text()), run_dir


def test_teacher_is_trained_cached_and_reused(tiny_corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cvmkd")
    summary, run_dir = _run(tiny_corpus)
    teacher = summary["extra"]["trainer"]["teacher"]
    assert teacher["source"] == "trained"
    # the teacher ran through the same loop: its own run folder, log, checkpoints and model
    stage = run_dir / "teacher"
    steps = [
        json.loads(line)["step"] for line in (stage / "train.jsonl").read_text().splitlines() if '"event"' not in line
    ]
    assert steps == list(range(1, 11))
    assert (stage / "checkpoints" / "manifest.json").is_file()
    cached = Path(teacher["path"])
    assert (cached / "model.safetensors").is_file()

    caplog.clear()
    summary2, _ = _run(tiny_corpus, "run.name=again")
    assert summary2["extra"]["trainer"]["teacher"]["source"] == "cache"
    assert summary2["extra"]["trainer"]["teacher"]["path"] == str(cached)
    assert any("reusing the cached teacher" in r.getMessage() for r in caplog.records)
    assert any("reusing cached teacher outputs" in r.getMessage() for r in caplog.records)
    assert not (tiny_corpus / "runs/again/teacher").exists()


def test_student_logs_every_step_and_is_packaged_and_scored(tiny_corpus: Path) -> None:
    summary, run_dir = _run(tiny_corpus)
    rows = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "event" not in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for key in (
        "loss",
        "kd",
        "ce",
        "token_accuracy",
        "teacher_agreement",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "seconds_per_step",
    ):
        assert all(isinstance(r[key], float) for r in steps), key
    assert steps[0]["lr"] == pytest.approx(1e-3 / 2)  # warmup of 2 steps
    history = [json.loads(line) for line in (run_dir / "validation" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [6, 12]
    assert set(history[-1]["scores"]) == {"bleu", "chrf", "ter", "composite"}

    model, tokenizer, metadata = load_package(run_dir / "model")
    assert metadata["role"] == "student" and metadata["final_step"] == 12
    assert metadata["teacher"]["source"] == "trained"
    assert tokenizer.vocab_size == model.config.vocab_size == 40
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["split"] == "test" and evaluation["sentences"] == 8
    assert (
        set(evaluation["student"]["scores"])
        == set(evaluation["teacher"]["scores"])
        == {"bleu", "chrf", "ter", "composite"}
    )
    chrf = evaluation["retention"]["chrf"]
    assert chrf == pytest.approx(evaluation["student"]["scores"]["chrf"] / evaluation["teacher"]["scores"]["chrf"])
    assert evaluation["student"]["analysis"]["sentences"] == 8


def test_validation_records_compare_with_the_teacher_and_the_previous_validation(tiny_corpus: Path) -> None:
    _, run_dir = _run(tiny_corpus)
    first, last = [json.loads(line) for line in (run_dir / "validation" / "history.jsonl").read_text().splitlines()]
    teacher = json.loads((run_dir / "validation" / "teacher.json").read_text())
    hypotheses = (run_dir / "validation" / last["details"]["hypotheses"]).read_text().splitlines()
    assert len(hypotheses) == teacher["sources"] == last["details"]["sentences"] == 8
    for record in (first, last):
        details = record["details"]
        assert details["teacher"]["scores"] == teacher["scores"]
        assert details["retention"]["chrf"] == pytest.approx(record["scores"]["chrf"] / teacher["scores"]["chrf"])
        assert set(details["analysis"]["errors"]) >= {"length", "worst", "loops", "empty", "copies", "unknown_tokens"}
    assert "delta_previous" not in first["details"] and "significance" not in first["details"]
    details = last["details"]
    assert details["previous_step"] == 6
    assert details["delta_previous"]["bleu"] == pytest.approx(last["scores"]["bleu"] - first["scores"]["bleu"])
    assert set(details["significance"]["scores"]) == {"bleu", "chrf", "ter"}
    assert details["analysis"]["errors"]["changes"]["against_step"] == 6
    assert details["signatures"]["bleu"].startswith("nrefs:1|")
    cached = list((run_dir.parent.parent / "cache" / "teacher-translations").glob("*.txt"))
    assert len(cached) == 2  # the validation and the test sentences


def test_a_teacher_can_be_loaded_from_a_package(tiny_corpus: Path) -> None:
    _, first = _run(tiny_corpus)
    summary, _ = _run(tiny_corpus, "run.name=loaded", f"teacher.checkpoint={first / 'teacher' / 'model'}")
    assert summary["extra"]["trainer"]["teacher"]["source"] == "loaded"


def test_a_student_shorter_than_its_teacher_trains_on_cached_outputs_cut_like_its_batches(
    tiny_corpus: Path,
) -> None:
    """The cached top-k outputs are cut where the student's batches are: a student with a
    shorter ``max_len`` than its teacher trains (it failed with "rebuild it", forever)."""
    _, first = _run(tiny_corpus)
    teacher = first / "teacher" / "model"
    short = ("student.model.max_len=6", f"teacher.checkpoint={teacher}", 'distill.teacher_outputs="cached"')
    summary, _ = _run(tiny_corpus, "run.name=short", *short)
    outputs = summary["extra"]["trainer"]["teacher"]["outputs"]
    assert outputs["reused"] is False
    again, _ = _run(tiny_corpus, "run.name=short-again", *short)
    reused = again["extra"]["trainer"]["teacher"]["outputs"]
    assert reused["path"] == outputs["path"] and reused["reused"] is True


def test_a_damaged_teacher_package_is_refused(tiny_corpus: Path) -> None:
    _, first = _run(tiny_corpus)
    package = first / "teacher" / "model"
    weights = package / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ModelError, match="model.safetensors is damaged"):
        run_session(open_session(tiny_corpus / "recipe.toml", ["run.name=bad", f"teacher.checkpoint={package}"]))


def test_same_seed_same_student(tiny_corpus: Path) -> None:
    _, a = _run(tiny_corpus, "run.name=a")
    _, b = _run(tiny_corpus, "run.name=b")
    la = [json.loads(x).get("loss") for x in (a / "train.jsonl").read_text().splitlines()]
    lb = [json.loads(x).get("loss") for x in (b / "train.jsonl").read_text().splitlines()]
    assert la == lb


@pytest.mark.skipif(cxx_compiler() is None, reason="no C++ compiler: torch.compile cannot build CPU kernels")
def test_compiled_loss_trains_as_the_eager_one(tiny_corpus: Path) -> None:
    summary, eager = _run(tiny_corpus, "run.name=eager")
    assert summary["extra"]["trainer"]["compiled_loss"] is False  # "auto": 12 steps are too few to pay
    summary, compiled = _run(tiny_corpus, "run.name=compiled", "distill.compile=on")
    assert summary["extra"]["trainer"]["compiled_loss"] is True
    rows = [[json.loads(x) for x in (d / "train.jsonl").read_text().splitlines()] for d in (eager, compiled)]
    losses = [[r["loss"] for r in run if "event" not in r] for run in rows]
    assert len(losses[0]) == len(losses[1]) == 12
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)
