"""Students of a Hugging Face teacher's own family (``[student.model] name = "hf"``): built from the
teacher's configuration at smaller sizes, distilled, saved as a folder ``transformers`` loads,
translated by ``cvmkd translate``, and exported to CTranslate2 through its own converter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cvmkd_core.cli import main
from cvmkd_hf.student import HfStudentSpec, spread, student_config
from cvmkd_testing import write_tiny_corpus

from .test_hf_teacher import RECIPE, tiny_m2m100, tiny_marian, tiny_t5

#: how a run names each test teacher (a multilingual one with its language pair)
TEACHER = {
    "marian": ["--set", "teacher.checkpoint=marian"],
    "t5": ["--set", "teacher.checkpoint=t5"],
    "m2m100": [
        "--set",
        "teacher.checkpoint=m2m100",
        "--set",
        "teacher.source_lang=fr",
        "--set",
        "teacher.target_lang=en",
    ],
}

STUDENT = """
[student.model]
name = "hf"
n_encoder_layers = 1
n_decoder_layers = 1
d_ff = 32
init = "teacher"
"""


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tiny_corpus(tmp_path)
    tiny_marian(tmp_path)
    tiny_t5(tmp_path)
    tiny_m2m100(tmp_path)
    recipe = RECIPE.replace('[student.model]\nname = "cvm"\npreset = "tiny"\n', STUDENT)
    assert 'name = "hf"' in recipe
    (tmp_path / "hf.toml").write_text(recipe)
    return tmp_path


def test_the_sizes_are_named_as_each_family_names_them() -> None:
    marian = {"model_type": "marian", "d_model": 512, "encoder_layers": 6, "decoder_layers": 6,
              "encoder_attention_heads": 8, "decoder_attention_heads": 8, "encoder_ffn_dim": 2048,
              "decoder_ffn_dim": 2048, "dropout": 0.1, "vocab_size": 9}  # fmt: skip
    config = student_config(marian, HfStudentSpec(d_model=256, n_heads=4, n_decoder_layers=2, d_ff=1024), 100)
    assert (config["d_model"], config["encoder_attention_heads"], config["decoder_attention_heads"]) == (256, 4, 4)
    assert (config["encoder_layers"], config["decoder_layers"]) == (6, 2)
    assert (config["encoder_ffn_dim"], config["decoder_ffn_dim"], config["vocab_size"]) == (1024, 1024, 100)
    t5 = {"model_type": "t5", "d_model": 512, "d_kv": 64, "num_heads": 8, "num_layers": 6,
          "num_decoder_layers": 6, "d_ff": 2048, "dropout_rate": 0.1}  # fmt: skip
    config = student_config(t5, HfStudentSpec(d_model=128, n_heads=4, n_encoder_layers=3, dropout=0.0), 50)
    assert (config["d_kv"], config["num_layers"], config["num_decoder_layers"], config["dropout_rate"]) == (
        32,
        3,
        3,
        0.0,
    )
    assert spread(6, 3) == [0, 2, 5] and spread(12, 1) == [0] and spread(2, 4) == [0, 0, 1, 1]


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["marian", "t5", "m2m100"])
def test_a_student_of_the_teachers_family_is_distilled_saved_and_translates(
    workdir: Path, teacher: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    assert main(["run", "hf.toml", "--run-dir", "run", "--quiet", *TEACHER[teacher]]) == 0, capsys.readouterr().err
    summary = json.loads((workdir / "run" / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert set(summary["evaluation"]["scores"]) >= {"student", "teacher"}
    initialised = summary["extra"]["trainer"]["initialised"]
    # the teacher's one layer per stack, embeddings included, copied where the shapes match (d_ff differs)
    assert initialised["layers"] == {"encoder": [0], "decoder": [0]} and initialised["tensors_copied"] > 4

    package = workdir / "run" / "model"
    meta = json.loads((package / "metadata.json").read_text())
    assert meta["format"] == "huggingface" and meta["role"] == "student"
    assert set(meta["files_sha256"]) >= {"config.json", "model.safetensors", "tokenizer_config.json"}
    # a normal Hugging Face folder: transformers loads model and tokenizer from it as they are
    model = AutoModelForSeq2SeqLM.from_pretrained(str(package), local_files_only=True)
    AutoTokenizer.from_pretrained(str(package), local_files_only=True)
    original = json.loads((workdir / teacher / "config.json").read_text())
    assert model.config.model_type == original["model_type"] and model.config.vocab_size == original["vocab_size"]
    assert sum(p.numel() for p in model.parameters()) < meta["teacher"]["parameters"]
    if teacher == "marian":  # what Marian's decoder starts from stays zero, as Marian expects
        assert model.get_input_embeddings().weight[original["pad_token_id"]].abs().max() == 0
    if teacher == "m2m100":  # the student speaks the teacher's language pair without being told
        assert json.loads((package / "cvmkd-languages.json").read_text()) == {"source_lang": "fr", "target_lang": "en"}

    (workdir / "in.txt").write_text("le chat\nun grand chien\n")
    capsys.readouterr()
    assert main(["translate", "--model", str(package), "-i", "in.txt"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.slow
@pytest.mark.parametrize("teacher", ["marian", "m2m100"])
def test_the_student_exports_to_ctranslate2_with_the_same_probabilities(
    workdir: Path, teacher: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ctranslate2 = pytest.importorskip("ctranslate2")
    pytest.importorskip("cvmkd_ctranslate2")
    from cvmkd_hf.model import HfLoader

    assert main(["run", "hf.toml", "--run-dir", "run", "--quiet", *TEACHER[teacher]]) == 0, capsys.readouterr().err
    package = workdir / "run" / "model"
    assert main(["export", str(package), "--format", "ctranslate2", "--quantization", "float32", "--out", "ct2"]) == 0
    exported = json.loads((workdir / "ct2" / "cvmkd.json").read_text())
    assert exported["export"]["converter"].endswith("TransformersConverter")
    assert exported["weights_sha256"] == json.loads((package / "metadata.json").read_text())["weights_sha256"]

    # teacher-forced log-probabilities of the same pairs agree with those of transformers
    model, tokenizer, _ = HfLoader.load(package)
    pairs = [("le chat", "the cat"), ("un grand chien noir", "a big black dog")]
    src_ids = [tokenizer.encode([s])[0] + [tokenizer.eos_id] for s, _ in pairs]
    tgt_ids = [tokenizer.encode_targets([t])[0] for _, t in pairs]
    translator = ctranslate2.Translator(str(workdir / "ct2"))
    scored = translator.score_batch(
        [tokenizer._tok.convert_ids_to_tokens(s) for s in src_ids],
        [tokenizer._tok.convert_ids_to_tokens(t) for t in tgt_ids],
    )
    for s, t, result in zip(src_ids, tgt_ids, scored):
        # transformers' own logits over the folder (CTranslate2 drops Marian's pad from the vocabulary)
        decoder_ids = torch.tensor([[model.decoder_start, *t]])
        with torch.no_grad():
            logits = model.model(input_ids=torch.tensor([s]), decoder_input_ids=decoder_ids).logits
        if teacher == "marian":
            logits[..., tokenizer.pad_id] = float("-inf")
        expected = logits.log_softmax(-1)[0, torch.arange(len(t) + 1), torch.tensor([*t, tokenizer.eos_id])]
        assert result.log_probs == pytest.approx(expected.tolist(), abs=1e-3)

    (workdir / "in.txt").write_text("le chat\nun grand chien\n")
    capsys.readouterr()
    assert main(["translate", "--model", "ct2", "-i", "in.txt"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    assert main(["export", str(package), "--format", "ctranslate2", "--out", "ct2-int8"]) == 0  # int8 by default
    assert json.loads((workdir / "ct2-int8" / "cvmkd.json").read_text())["export"]["quantization"] == "int8"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            ["--set", "teacher.checkpoint=", "--set", "teacher.steps=2", "--set", "tokenizer.vocab_size=40"],
            "the teacher must be a Hugging Face folder",
        ),
        (["--set", 'quantize=[{name = "dynamic-int8"}]'], "[[quantize]] works on cvm students"),
        (["--set", "student.model.config={no_such_key = 1}"], "has no key 'no_such_key'"),
        (
            [
                "--set",
                "student.tokenizer=own",
                "--set",
                "tokenizer.vocab_size=30",
                "--set",
                'distill.loss={name = "ce"}',
            ],
            "speaks its teacher's tokenizer",
        ),
    ],
)
def test_a_student_that_cannot_be_built_is_one_line(
    workdir: Path, change: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", "hf.toml", "--run-dir", "run", "--quiet", *change]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_an_edited_student_folder_is_refused(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "hf.toml", "--run-dir", "run", "--quiet"]) == 0, capsys.readouterr().err
    config = workdir / "run" / "model" / "config.json"
    config.write_text(config.read_text().replace('"d_model": 32', '"d_model": 33'))
    (workdir / "in.txt").write_text("le chat\n")
    capsys.readouterr()
    assert main(["translate", "--model", "run/model", "-i", "in.txt"]) == 2
    err = capsys.readouterr().err
    assert "config.json does not match the sha256 recorded" in err
