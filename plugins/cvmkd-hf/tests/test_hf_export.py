"""``cvmkd export MODEL --format huggingface``: a cvm package as a Pegasus folder that transformers
loads, computing what the cvm model computes; and that folder as the Hugging Face teacher of a run
whose Pegasus student is exported to CTranslate2 and translates as transformers does."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cvmkd_core.cli import main
from cvmkd_nmt.model.package import load_package
from cvmkd_testing import write_tiny_corpus

TEACHER = """
[run]
name = "t"
steps = 80
validate_every = 80
seed = 3

[corpus]
name = "files"
train = "corpus.tsv"
valid_size = 8
test_size = 8

[tokenizer]
vocab_size = 40

[distill]
name = "teacher"
batch_size = 16
learning_rate = 3e-3
warmup_steps = 5

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
steps = 4
validate_every = 4
cache_dir = "cache"

[corpus]
name = "files"
train = "corpus.tsv"
valid_size = 8
test_size = 8

[teacher]
checkpoint = "hf"

[student.model]
name = "hf"
init = "teacher"

[distill]
name = "kd"
batch_size = 16
learning_rate = 1e-5
topk = 4
warmup_steps = 2

[validation]
metrics = ["chrf"]
significance_samples = 0

[[exports]]
name = "ctranslate2"
quantization = "float32"
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny cvm model trained for 80 steps (peaked distributions: greedy decoding is decided by
    clear margins), and its Hugging Face export in ``hf/``."""
    root = tmp_path_factory.mktemp("hfexport")
    write_tiny_corpus(root)
    (root / "teacher.toml").write_text(TEACHER)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["run", "teacher.toml", "--run-dir", "run", "--quiet"]) == 0
        assert main(["export", "run/model", "--format", "huggingface", "--out", "hf"]) == 0
    finally:
        os.chdir(cwd)
    return root


def _sources(root: Path) -> list[str]:
    return [line.split("\t")[0] for line in (root / "corpus.tsv").read_text().splitlines()[:40]]


@pytest.mark.slow
def test_transformers_loads_the_export_and_computes_the_same_log_probabilities(exported: Path) -> None:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    model, tokenizer, _ = load_package(exported / "run" / "model")
    hf = AutoModelForSeq2SeqLM.from_pretrained(str(exported / "hf"), local_files_only=True).eval()
    hf_tokenizer = AutoTokenizer.from_pretrained(str(exported / "hf"), local_files_only=True)
    assert hf.config.model_type == "pegasus"
    pairs = [line.split("\t") for line in (exported / "corpus.tsv").read_text().splitlines()[:20]]
    for source, target in pairs:
        ids = tokenizer.encode([source])[0] + [tokenizer.eos_id]
        # the same pieces and ids, the end-of-sentence mark added as cvm models read it
        assert hf_tokenizer([source])["input_ids"][0] == ids
        tgt_in = torch.tensor([[model.config.bos_id, *tokenizer.encode([target])[0]]])
        with torch.no_grad():
            ours = model(torch.tensor([ids]), tgt_in).log_softmax(-1)
            theirs = hf(input_ids=torch.tensor([ids]), decoder_input_ids=tgt_in).logits.log_softmax(-1)
        assert (ours - theirs).abs().max() < 1e-4
    meta = json.loads((exported / "hf" / "metadata.json").read_text())
    assert meta["format"] == "huggingface" and meta["export"]["architecture"] == "pegasus"
    assert (
        meta["export"]["source_weights_sha256"]
        == json.loads((exported / "run" / "model" / "metadata.json").read_text())["weights_sha256"]
    )


@pytest.mark.slow
def test_the_export_translates_as_the_package_does(exported: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (exported / "in.txt").write_text("\n".join(_sources(exported)) + "\n")
    capsys.readouterr()
    assert main(["translate", "--model", str(exported / "run" / "model"), "-i", str(exported / "in.txt")]) == 0
    ours = capsys.readouterr().out.splitlines()
    assert main(["translate", "--model", str(exported / "hf"), "-i", str(exported / "in.txt")]) == 0
    theirs = capsys.readouterr().out.splitlines()
    assert len(ours) == 40 and sum(a == b for a, b in zip(ours, theirs)) >= 38


@pytest.mark.slow
def test_the_export_teaches_a_pegasus_student_that_ctranslate2_runs(
    exported: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("cvmkd_ctranslate2")
    monkeypatch.chdir(tmp_path)
    write_tiny_corpus(tmp_path)
    os.symlink(exported / "hf", tmp_path / "hf")
    (tmp_path / "s.toml").write_text(STUDENT)
    assert main(["run", "s.toml", "--run-dir", "run", "--quiet"]) == 0, capsys.readouterr().err
    (tmp_path / "in.txt").write_text("\n".join(_sources(tmp_path)) + "\n")
    capsys.readouterr()
    assert main(["translate", "--model", "run/model", "-i", "in.txt"]) == 0
    pytorch = capsys.readouterr().out.splitlines()
    assert main(["translate", "--model", "run/model-ctranslate2", "-i", "in.txt"]) == 0
    ctranslate2 = capsys.readouterr().out.splitlines()
    # CTranslate2 starts the Pegasus decoder where the model says (here <s>), not from pad
    config = json.loads((tmp_path / "run" / "model-ctranslate2" / "config.json").read_text())
    assert config["decoder_start_token"] == "<s>"
    assert len(pytorch) == 40 and sum(a == b for a, b in zip(pytorch, ctranslate2)) >= 38


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--quantization", "int8"], "a Hugging Face export keeps the float weights"),
        (["--from-hf"], "is a Hugging Face folder already"),
    ],
)
def test_an_export_that_cannot_be_made_is_one_line(
    exported: Path, args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = exported / ("hf" if "--from-hf" in args else "run/model")
    args = [a for a in args if a != "--from-hf"]
    out = exported / "again"
    capsys.readouterr()
    assert main(["export", str(source), "--format", "huggingface", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists(), err
