"""A teacher run continues from a package's weights (``[distill] init_from``): it starts where the
package ended, speaks the package's tokenizer, records where it came from, and refuses a model
that is not the package's architecture with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvmkd_core.cli import main
from cvmkd_nmt.model.package import read_metadata
from cvmkd_testing import write_tiny_corpus

RECIPE = """
[run]
name = "t"
steps = {steps}
validate_every = 20
seed = 3

[corpus]
name = "files"
train = "corpus.tsv"
valid_size = 8
test_size = 8

[tokenizer]
vocab_size = {vocab}

[distill]
name = "teacher"
batch_size = 16
learning_rate = {lr}
warmup_steps = 2
{extra}

[distill.model]
name = "cvm"
preset = "tiny"

[validation]
metrics = ["chrf"]
significance_samples = 0
"""


def _ce(run: Path) -> list[float]:
    """The cross-entropy of every logged step."""
    events = [json.loads(x) for x in (run / "train.jsonl").read_text().splitlines()]
    return [float(e["ce"]) for e in events if "ce" in e]


@pytest.fixture
def trained(write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    write_tiny_corpus(tmp_path)
    recipe = write("first.toml", RECIPE.format(steps=60, vocab=40, lr=3e-3, extra=""))
    assert main(["run", str(recipe), "--run-dir", "first", "--quiet"]) == 0
    return tmp_path / "first"


@pytest.mark.slow
def test_training_continues_from_the_package(write, trained: Path, tmp_path: Path) -> None:
    # another vocabulary size in [tokenizer]: the package's tokenizer wins, or its weights would not fit
    extra = 'init_from = "first/model"'
    recipe = write("again.toml", RECIPE.format(steps=3, vocab=48, lr=1e-4, extra=extra))
    assert main(["run", str(recipe), "--run-dir", "again", "--quiet"]) == 0
    fresh = write("fresh.toml", RECIPE.format(steps=3, vocab=40, lr=1e-4, extra=""))
    assert main(["run", str(fresh), "--run-dir", "fresh", "--quiet"]) == 0

    continued = _ce(tmp_path / "again")[0]
    assert continued < _ce(tmp_path / "fresh")[0] - 1.0
    assert continued == pytest.approx(_ce(trained)[-1], abs=0.6)

    first, again = read_metadata(trained / "model"), read_metadata(tmp_path / "again" / "model")
    assert again["tokenizer_sha256"] == first["tokenizer_sha256"]
    start = again["initialised_from"]
    assert start["weights_sha256"] == first["weights_sha256"] and start["final_step"] == 60
    assert start["package"] == "first/model"


def test_a_different_architecture_is_refused_in_one_line(
    write, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = write("wide.toml", RECIPE.format(steps=3, vocab=40, lr=3e-3, extra='init_from = "first/model"'))
    capsys.readouterr()
    assert main(["run", str(recipe), "--run-dir", "wide", "--quiet", "--set", "distill.model.d_model=48"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "init_from" in err and "d_model (48 here, 32 there)" in err


def test_a_missing_package_is_refused_in_one_line(
    write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_tiny_corpus(tmp_path)
    recipe = write("none.toml", RECIPE.format(steps=3, vocab=40, lr=3e-3, extra='init_from = "nowhere/model"'))
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "none"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nowhere/model" in err
