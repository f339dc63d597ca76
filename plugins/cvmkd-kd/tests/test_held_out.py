"""A student run checks that its validation and test sentences lie outside the loaded teacher's
training data, by rebuilding the teacher's split from the corpus settings its package records."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cvmkd_core.cli import main
from cvmkd_testing import write_tiny_corpus

TEACHER = """
[run]
name = "t"
steps = 4
validate_every = 4

[corpus]
name = "files"
train = "corpus.tsv"
valid_size = 10
test_size = 10

[tokenizer]
vocab_size = 40

[distill]
name = "teacher"
batch_size = 16

[distill.model]
name = "cvm"
preset = "tiny"

[validation]
metrics = ["chrf"]
significance_samples = 0
"""

STUDENT = """
[run]
name = "s"
steps = 2
validate_every = 2

[corpus]
name = "files"
train = "corpus.tsv"
valid_size = 10
test_size = 10

[teacher]
checkpoint = "teacher/model"

[student.model]
name = "cvm"
preset = "tiny"

[distill]
name = "kd"
batch_size = 16
topk = 4

[validation]
metrics = ["chrf"]
significance_samples = 0
"""


def _held_out(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())["extra"]["trainer"]["teacher"]["held_out"]


@pytest.mark.slow
def test_the_student_split_is_checked_against_the_teachers_training_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    write_tiny_corpus(tmp_path)
    (tmp_path / "t.toml").write_text(TEACHER)
    (tmp_path / "s.toml").write_text(STUDENT)
    assert main(["run", "t.toml", "--run-dir", "teacher", "--quiet"]) == 0

    assert main(["run", "s.toml", "--run-dir", "same", "--quiet"]) == 0
    same = _held_out(tmp_path / "same")
    assert same == {
        "checked": True,
        "teacher_train_pairs": 100,
        "valid_in_teacher_train": 0,
        "test_in_teacher_train": 0,
    }

    caplog.set_level(logging.WARNING, logger="cvmkd")
    assert main(["run", "s.toml", "--run-dir", "other", "--quiet", "--set", "corpus.seed=99"]) == 0
    other = _held_out(tmp_path / "other")
    assert other["checked"] and other["test_in_teacher_train"] > 0 and other["valid_in_teacher_train"] > 0
    assert any("the teacher trained on" in r.getMessage() for r in caplog.records)


def test_a_teacher_without_its_corpus_is_not_checked(tiny_teacher_package: Path, tmp_path: Path) -> None:
    from cvmkd_kd.student import teacher_held_out
    from cvmkd_nmt.model.package import read_metadata

    found = teacher_held_out(None, read_metadata(tiny_teacher_package), None)  # type: ignore[arg-type]
    assert found == {"checked": False, "reason": "the teacher package does not record its corpus"}
