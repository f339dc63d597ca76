"""The shipped teacher: registered by name, a complete float16 package within its size budget,
metadata that says how it was trained and what it scores, a translator that translates; and
build.py, which makes such a package from a teacher run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from cvmkd_core.cli import main
from cvmkd_core.plugins import build_plugins
from cvmkd_core.recipe import load_recipe
from cvmkd_nmt.model.package import WEIGHTS, load_package, read_metadata, resolve_package
from cvmkd_nmt.model.translate import translate
from cvmkd_teacher_bible import NAME, PACKAGE

ROOT = Path(__file__).resolve().parents[3]
BUILD = Path(__file__).resolve().parents[1] / "build.py"


def _build_module() -> Any:
    """build.py is a script beside the package, not an importable module: load it from its file."""
    spec = importlib.util.spec_from_file_location("teacher_build", BUILD)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_name_resolves_to_the_shipped_package() -> None:
    registry = build_plugins().registry
    assert NAME == "bible-fr-en"
    assert resolve_package(NAME, registry) == PACKAGE


def test_the_package_is_a_float16_teacher_within_budget() -> None:
    size = (PACKAGE / WEIGHTS).stat().st_size
    assert size <= 40 * 1024 * 1024
    meta = read_metadata(PACKAGE)
    assert meta["role"] == "teacher" and meta["stored_dtype"] == "float16"
    assert meta["corpus"]["name"] == "bible:fr-en"
    # 2 bytes a parameter: the file is the weights, stored once (tied embeddings)
    assert size == pytest.approx(2 * meta["parameters"], rel=0.01)


def test_metadata_says_how_it_was_trained_and_what_it_scores() -> None:
    meta = read_metadata(PACKAGE)
    training = meta["training"]
    # two stages: recipes/teacher.toml (on a GPU), then recipes/teacher-continue.toml from its weights
    (first,) = training["stages"]
    stages = [(first["recipe"], "teacher.toml"), (meta["recipe"], "teacher-continue.toml")]
    for recorded, name in stages:
        recipe = load_recipe(ROOT / "recipes" / name).to_dict()
        for key in (
            "max_tokens",
            "learning_rate",
            "warmup_steps",
            "label_smoothing",
            "average_checkpoints",
        ):
            assert recorded["distill"][key] == recipe["distill"][key], (name, key)
        assert recorded["distill"]["model"] == recipe["distill"]["model"], name
    assert meta["recipe"]["distill"]["schedule"] == "linear"  # annealed to zero over the second stage
    assert meta["initialised_from"]["weights_sha256"] == first["weights_sha256"]
    assert training["steps"] == meta["final_step"] == training["invocations"][-1]["to_step"]
    assert training["total_steps"] == first["steps"] + training["steps"]
    assert training["training_seconds"] > 0 and first["training_seconds"] > 0
    assert [v["step"] for v in training["validation"]] == sorted(v["step"] for v in training["validation"])
    test = training["test"]
    assert test["sentences"] == 1000 and set(test["by_beam_size"]) == {"1", "5"}
    assert meta["test_scores"] == test["by_beam_size"]["1"]
    assert len(meta["source_revision"]["commit"]) == 40


def test_it_translates_french_into_english() -> None:
    model, tokenizer, _ = load_package(PACKAGE)
    (out,) = translate(model, tokenizer, ["Au commencement, Dieu créa les cieux et la terre."])
    words = set(out.lower().replace(",", " ").replace(".", " ").split())
    assert {"god", "heavens", "earth"} <= words


@pytest.mark.slow
def test_build_makes_a_half_precision_package_from_a_teacher_run(
    write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cvmkd_testing import write_tiny_corpus

    monkeypatch.chdir(tmp_path)
    write_tiny_corpus(tmp_path)
    recipe = write(
        "teacher.toml",
        """
[run]
name = "t"
steps = 8
validate_every = 4
keep_checkpoints = 2
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
warmup_steps = 2
average_checkpoints = 2
test_beam_sizes = [1, 2]

[distill.model]
name = "cvm"
preset = "tiny"

[validation]
metrics = ["bleu", "chrf"]
significance_samples = 0
""",
    )
    assert main(["run", str(recipe), "--run-dir", "run", "--quiet"]) == 0
    build = _build_module()
    dest = tmp_path / "shipped"
    assert build.main(["run", "--dest", str(dest), "--revision", "0" * 40]) == 0

    model, _, meta = load_package(dest)
    original, _, _ = load_package(tmp_path / "run" / "model")
    assert meta["stored_dtype"] == "float16"
    assert (dest / WEIGHTS).stat().st_size < (tmp_path / "run" / "model" / WEIGHTS).stat().st_size * 0.6
    for (name, a), (_, b) in zip(model.state_dict().items(), original.state_dict().items()):
        assert a.dtype == b.dtype and a.half().float().equal(b.half().float()), name
    evaluation = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    training = meta["training"]
    assert training["steps"] == 8 and len(training["validation"]) == 2
    assert training["test"]["by_beam_size"]["1"] == evaluation["teacher"]["scores"]
    assert training["test"]["by_beam_size"]["2"] == evaluation["teacher"]["by_beam_size"]["2"]["scores"]
    # the run's own record of the code it ran wins; --revision fills it in where there is none
    recorded = read_metadata(tmp_path / "run" / "model")["source_revision"]
    assert meta["source_revision"] == (
        recorded or {"commit": "0" * 40, "dirty": False, "recorded_by": "build.py --revision"}
    )
    assert "stages" not in training

    # a second stage continues from the first's package; the build records both, in order
    argv = ["run", str(recipe), "--run-dir", "more", "--quiet", "--set", "run.steps=4"]
    assert main([*argv, "--set", 'distill.init_from="run/model"', "--set", "distill.average_checkpoints=1"]) == 0
    assert build.main(["run", "more", "--dest", str(dest), "--revision", "0" * 40]) == 0
    meta = read_metadata(dest)
    (first,) = meta["training"]["stages"]
    assert first["run"] == "run" and first["steps"] == 8 and first["recipe"]["distill"]["average_checkpoints"] == 2
    assert meta["initialised_from"]["weights_sha256"] == first["weights_sha256"]
    assert meta["training"]["steps"] == 4 and meta["training"]["total_steps"] == 12
    # stages given in the wrong order do not chain
    assert build.main(["more", "run", "--dest", str(tmp_path / "wrong")]) == 2
    assert not (tmp_path / "wrong").exists()


def test_build_refuses_a_folder_that_is_not_a_teacher_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build = _build_module()
    assert build.main([str(tmp_path), "--dest", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path) in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_ship_targets_puts_a_runs_teacher_translations_in_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    import torch

    from cvmkd_testing import TINY_KD_RECIPE, write_tiny_corpus

    spec = importlib.util.spec_from_file_location("ship_targets", BUILD.with_name("ship_targets.py"))
    assert spec and spec.loader
    ship = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ship)

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    write_tiny_corpus(tmp_path)
    sequence = '\n[distill.sequence]\ntargets = "teacher"\n'
    (tmp_path / "train.toml").write_text(TINY_KD_RECIPE)
    assert main(["run", "train.toml", "--run-dir", "first", "--quiet"]) in (0, 3)
    teacher = json.loads((tmp_path / "first" / "summary.json").read_text())["extra"]["trainer"]["teacher"]
    shutil.copytree(teacher["path"], tmp_path / "teacher")
    loaded = TINY_KD_RECIPE.replace("[teacher]\n", '[teacher]\ncheckpoint = "teacher"\n') + sequence
    (tmp_path / "loaded.toml").write_text(loaded)
    assert main(["run", "loaded.toml", "--run-dir", "second", "--quiet"]) in (0, 3)
    made = json.loads((tmp_path / "second" / "summary.json").read_text())["extra"]["trainer"]["teacher"]
    assert made["sequence_kd"]["translated"] > 0

    capsys.readouterr()
    assert ship.main(["second", "--dest", "teacher"]) == 0
    assert "translations" in capsys.readouterr().out
    shipped = list((tmp_path / "teacher" / "sequence-kd").glob("*.txt.gz"))
    assert len(shipped) == 1
    shutil.rmtree(made["sequence_kd"]["path"])  # the run's own cache of them is gone
    assert main(["run", "loaded.toml", "--run-dir", "third", "--quiet"]) in (0, 3)
    used = json.loads((tmp_path / "third" / "summary.json").read_text())["extra"]["trainer"]["teacher"]
    assert used["sequence_kd"]["source"] == "package" and used["sequence_kd"]["translated"] == 0
    assert used["sequence_kd"]["made_with"]["run"] == "second"
    capsys.readouterr()
    assert ship.main(["first", "--dest", "teacher"]) == 2  # a run that trained its own teacher
    assert "trains its own teacher" in capsys.readouterr().err
