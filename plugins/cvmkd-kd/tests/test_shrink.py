"""[student] init = "teacher" (shrink and fine-tune): the student starts as a thinner copy of the
teacher, layer by layer as :func:`teacher_layers` maps them, and a run records the mapping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cvmkd_core.cli import main
from cvmkd_core.errors import ModelError
from cvmkd_kd.student import init_from_teacher, teacher_layers
from cvmkd_nmt.model import preset
from cvmkd_nmt.model.transformer import CvmTransformer
from cvmkd_testing import write_tiny_corpus


def test_the_layers_are_evenly_spaced_with_the_first_and_the_last() -> None:
    assert teacher_layers(6, 6) == [0, 1, 2, 3, 4, 5]
    assert teacher_layers(3, 6) == [0, 2, 5]  # round(2.5) is 2: Python rounds half to even
    assert teacher_layers(2, 6) == [0, 5]
    assert teacher_layers(1, 6) == [0]
    assert teacher_layers(4, 12) == [0, 4, 7, 11]
    with pytest.raises(ModelError, match="a student of 7 layers cannot start from a teacher of 6"):
        teacher_layers(7, 6)


def test_every_student_weight_is_the_teacher_weight_its_layer_maps_to() -> None:
    torch.manual_seed(0)
    teacher = CvmTransformer(preset("tiny", vocab_size=50, n_encoder_layers=3, n_decoder_layers=3))
    student = CvmTransformer(preset("tiny", vocab_size=50, n_encoder_layers=2, n_decoder_layers=1))
    mapping = init_from_teacher(student, teacher)
    assert mapping == {"teacher": True, "encoder_layers": [0, 2], "decoder_layers": [0]}
    ours, theirs = student.state_dict(), teacher.state_dict()
    for name, value in ours.items():
        expected = (
            name.replace("encoder_layers.1.", "encoder_layers.2.") if name.startswith("encoder_layers.1.") else name
        )
        assert torch.equal(value, theirs[expected]), name
    # the copy is the student's own: training it leaves the teacher as it was
    with torch.no_grad():
        student.src_embed.weight.add_(1.0)
    assert not torch.equal(student.src_embed.weight, teacher.src_embed.weight)


def test_a_student_of_another_width_is_refused_naming_the_difference() -> None:
    teacher = CvmTransformer(preset("tiny", vocab_size=50))
    student = CvmTransformer(preset("tiny", vocab_size=50, d_model=16))
    with pytest.raises(ModelError, match=r"d_model \(16 here, 32 in the teacher\)"):
        init_from_teacher(student, teacher)


RECIPE = """
[run]
name = "s"
steps = 4
validate_every = 4
seed = 3
cache_dir = "cache"

[corpus]
name = "files"
train = "corpus.tsv"
valid_size = 8
test_size = 8

[tokenizer]
vocab_size = 40

[teacher]
steps = 60
validate_every = 60
batch_size = 16
learning_rate = 3e-3
warmup_steps = 2

[teacher.model]
name = "cvm"
preset = "tiny"

[student]
init = "{init}"

[student.model]
name = "cvm"
preset = "tiny"
n_decoder_layers = 1

[distill]
name = "kd"
batch_size = 16
warmup_steps = 2

[distill.loss]
name = "ce"

[validation]
metrics = ["chrf"]
significance_samples = 0
"""


def _first_ce(run: Path) -> float:
    events = [json.loads(x) for x in (run / "train.jsonl").read_text().splitlines()]
    return next(float(e["ce"]) for e in events if "ce" in e)


@pytest.mark.slow
def test_a_student_started_from_the_teacher_begins_where_the_teacher_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_tiny_corpus(tmp_path, pairs=200)
    for init in ("random", "teacher"):
        (tmp_path / f"{init}.toml").write_text(RECIPE.format(init=init))
        assert main(["run", f"{init}.toml", "--run-dir", init, "--quiet"]) == 0
    # the same teacher (cached by the first run), the same batches: the copy starts far lower
    assert _first_ce(tmp_path / "teacher") < 0.8 * _first_ce(tmp_path / "random")
    summary = json.loads((tmp_path / "teacher" / "summary.json").read_text())
    assert summary["extra"]["trainer"]["initialised_from"] == {
        "teacher": True,
        "encoder_layers": [0, 1],
        "decoder_layers": [0],
    }
    metadata = json.loads((tmp_path / "teacher" / "model" / "metadata.json").read_text())
    assert metadata["initialised_from"]["decoder_layers"] == [0]
