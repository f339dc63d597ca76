"""Exports to CTranslate2: the converted model computes what the cvm model computes (the same
log-probabilities, the same greedy translations), `cvmkd export` and `cvmkd translate` work on it,
and a recipe's ``[[exports]]`` ends a run with its CTranslate2 student."""

from __future__ import annotations

import json
from pathlib import Path

import ctranslate2
import pytest
import torch

from cvmkd_core.cli import main
from cvmkd_core.errors import ModelError
from cvmkd_ctranslate2 import CTranslate2Config, CTranslate2Exporter, is_export
from cvmkd_ctranslate2.convert import convert
from cvmkd_ctranslate2.translate import CTranslate2Translator
from cvmkd_nmt.model.package import load_package
from cvmkd_nmt.model.presets import preset
from cvmkd_nmt.model.transformer import CvmTransformer
from cvmkd_nmt.model.translate import PackageTranslator
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


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained for 80 steps on the tiny corpus: its distributions are peaked, so
    greedy decoding is decided by clear margins, not by the last bit of a float."""
    import os

    root = tmp_path_factory.mktemp("ct2")
    write_tiny_corpus(root)
    (root / "teacher.toml").write_text(TEACHER)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["run", "teacher.toml", "--run-dir", "run", "--quiet"]) == 0
    finally:
        os.chdir(cwd)
    return root


def _sources(root: Path) -> list[str]:
    return [line.split("\t")[0] for line in (root / "corpus.tsv").read_text().splitlines()[:40]]


@pytest.mark.parametrize(("activation", "tie"), [("gelu", True), ("relu", False)])
def test_the_converted_model_gives_the_same_log_probabilities(tmp_path: Path, activation: str, tie: bool) -> None:
    torch.manual_seed(0)
    model = CvmTransformer(preset("tiny", vocab_size=50, activation=activation, tie_embeddings=tie)).eval()
    pieces = ["<pad>", "<s>", "</s>", "<unk>", *[f"w{i}" for i in range(46)]]
    convert(model, pieces, tmp_path / "ct2")
    translator = ctranslate2.Translator(str(tmp_path / "ct2"))
    sources = [[5, 6, 7, 8, 9], [10, 11, 12]]
    targets = [[13, 14, 15, 16], [17, 18]]
    scored = translator.score_batch(
        [[pieces[i] for i in s] for s in sources], [[pieces[i] for i in t] for t in targets]
    )
    for source, target, result in zip(sources, targets, scored):
        with torch.no_grad():
            logits = model(torch.tensor([source + [2]]), torch.tensor([[1, *target]]))
            expected = logits.log_softmax(-1)[0].gather(-1, torch.tensor(target + [2]).unsqueeze(-1)).squeeze(-1)
        assert result.log_probs == pytest.approx(expected.tolist(), abs=1e-4)


def test_float32_export_translates_as_the_package_does(trained: Path, tmp_path: Path) -> None:
    package = trained / "run" / "model"
    info = CTranslate2Exporter(CTranslate2Config(quantization="float32")).export(package, tmp_path / "ct2")
    assert is_export(tmp_path / "ct2") and info["quantization"] == "float32"
    meta = json.loads((tmp_path / "ct2" / "cvmkd.json").read_text())
    assert meta["export"]["source_weights_sha256"] == meta["weights_sha256"]
    model, tokenizer, _ = load_package(package)
    sources = _sources(trained)
    ours = PackageTranslator(model, tokenizer, torch.device("cpu")).translate(sources, batch_size=1)
    theirs = CTranslate2Translator(tmp_path / "ct2").translate(sources, batch_size=1)
    assert theirs == ours
    beam_ours = PackageTranslator(model, tokenizer, torch.device("cpu")).translate(sources, beam_size=4, batch_size=1)
    beam_theirs = CTranslate2Translator(tmp_path / "ct2").translate(sources, beam_size=4, batch_size=1)
    # beam search: the same search, but the two stop finished hypotheses slightly differently
    assert sum(a == b for a, b in zip(beam_theirs, beam_ours)) >= 0.75 * len(sources)


def test_export_and_translate_commands(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    package = str(trained / "run" / "model")
    out = tmp_path / "int8"
    assert main(["export", package, "--format", "ctranslate2", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"{out}: ctranslate2 (int8), ")
    (tmp_path / "in.txt").write_text("\n".join(_sources(trained)[:10]) + "\n\n")
    assert main(["translate", "--model", str(out), "-i", str(tmp_path / "in.txt"), "-o", str(tmp_path / "o.txt")]) == 0
    lines = (tmp_path / "o.txt").read_text().split("\n")
    assert len(lines) == 12 and lines[10] == "" and all(lines[:10])  # the empty line stays empty

    # an existing folder is replaced only on request; the format must be an installed one
    assert main(["export", package, "--format", "ctranslate2", "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: --out {out} exists already; pass --force to replace it\n"
    assert (
        main(["export", package, "--format", "ctranslate2", "--out", str(out), "--force", "--quantization", "int16"])
        == 0
    )
    assert json.loads((out / "cvmkd.json").read_text())["export"]["quantization"] == "int16"
    assert main(["export", package, "--format", "onnx", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("error: unknown exporter 'onnx'; available: ctranslate2")
    assert (
        main(["export", package, "--format", "ctranslate2", "--out", str(tmp_path / "y"), "--quantization", "int3"])
        == 2
    )
    assert "unknown CTranslate2 quantization 'int3'" in capsys.readouterr().err
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.*"))


def test_a_recipe_ends_with_its_ctranslate2_student(trained: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(trained)
    recipe = (
        TEACHER.replace('name = "t"', 'name = "e"').replace("steps = 80", "steps = 4")
        + '\n[[exports]]\nname = "ctranslate2"\nquantization = "int8"\n'
    )
    (trained / "e.toml").write_text(recipe)
    assert main(["run", "e.toml", "--run-dir", "e", "--quiet"]) == 0
    summary = json.loads((trained / "e" / "summary.json").read_text())
    folder = Path(summary["outputs"]["model-ctranslate2"])
    assert folder == Path("e") / "model-ctranslate2" and is_export(trained / folder)
    assert summary["extra"]["exports"]["ctranslate2"]["quantization"] == "int8"
    assert CTranslate2Translator(trained / folder).translate(_sources(trained)[:3])[0]
    # the export's metadata is stamped with the run's outcome, as every package of the run
    meta = json.loads((trained / folder / "cvmkd.json").read_text())
    assert meta["status"] == "completed" and meta["run"]["name"] == "e" and meta["export"]["format"] == "ctranslate2"


@pytest.mark.parametrize(
    ("exports", "error"),
    [
        (
            '[[exports]]\nname = "ctranslate2"\nfolder = "../victim"\n',
            "must be a relative path inside the run directory",
        ),
        ('[[exports]]\nname = "ctranslate2"\nfolder = "."\n', "must name a new folder inside the run directory"),
        ('[[exports]]\nname = "ctranslate2"\nfolder = "checkpoints"\n', "not one of the run's own, got 'checkpoints'"),
        ('[[exports]]\nname = "ctranslate2"\nfolder = "/tmp/x"\n', "must be a relative path inside the run directory"),
        (
            '[[exports]]\nname = "ctranslate2"\nfolder = "ct2"\n[[exports]]\nname = "ctranslate2"\nfolder = "ct2"\n',
            "exports: two entries write the folder 'ct2'",
        ),
    ],
)
def test_an_export_folder_outside_the_run_or_of_the_run_is_refused_before_anything_runs(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], exports: str, error: str
) -> None:
    monkeypatch.chdir(trained)
    victim = trained / "victim"
    victim.mkdir(exist_ok=True)
    (victim / "precious.txt").write_text("keep")
    (trained / "bad.toml").write_text(TEACHER.replace("steps = 80", "steps = 2") + "\n" + exports)
    assert main(["run", "bad.toml", "--run-dir", "bad", "--quiet"]) == 2
    assert error in capsys.readouterr().err
    assert (victim / "precious.txt").read_text() == "keep" and not (trained / "bad").exists()


def test_two_exports_go_to_two_folders_and_an_existing_folder_is_never_replaced(
    trained: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(trained)
    two = '[[exports]]\nname = "ctranslate2"\n[[exports]]\nname = "ctranslate2"\nquantization = "float32"\n'
    (trained / "two.toml").write_text(TEACHER.replace("steps = 80", "steps = 2") + "\n" + two)
    assert main(["run", "two.toml", "--run-dir", "two", "--quiet"]) == 0
    summary = json.loads((trained / "two" / "summary.json").read_text())
    assert {k: Path(v).name for k, v in summary["outputs"].items() if k.startswith("model-ctranslate2")} == {
        "model-ctranslate2-0": "model-ctranslate2-0",
        "model-ctranslate2-1": "model-ctranslate2-1",
    }
    quantized = {k: v["quantization"] for k, v in summary["extra"]["exports"].items()}
    assert quantized == {"ctranslate2-0": "int8", "ctranslate2-1": "float32"}
    # a folder that is not an export is left as it is, whoever asks
    keep = trained / "keep"
    keep.mkdir(exist_ok=True)
    (keep / "notes.txt").write_text("mine")
    exporter = CTranslate2Exporter(CTranslate2Config())
    with pytest.raises(ModelError, match="keep exists and is not a CTranslate2 export"):
        exporter.export(trained / "two" / "model", keep)
    assert (keep / "notes.txt").read_text() == "mine" and not list(trained.glob(".keep.*"))
