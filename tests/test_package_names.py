"""A model package a plugin ships is accepted by its registered name wherever a package folder
is: ``[teacher] checkpoint = NAME`` and ``cvmkd translate --model NAME``; ``cvmkd plugins`` lists
it. A folder of a registered name is used only when written as a path (``./name``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvmkd_core.cli import main
from cvmkd_core.errors import ModelError
from cvmkd_core.plugins import build_plugins
from cvmkd_nmt.model.package import resolve_package
from cvmkd_testing import TINY_KD_RECIPE

HOOKS = """
from cvmkd_core import hookimpl

@hookimpl
def cvmkd_register(register):
    register.package("tiny-fr-en", {path!r})
"""


@pytest.fixture
def named(tiny_teacher_package: Path, tmp_path: Path) -> Path:
    hooks = tmp_path / "ship.py"
    hooks.write_text(HOOKS.format(path=str(tiny_teacher_package)))
    return hooks


@pytest.fixture(autouse=True)
def _nmt_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin that declares the ``package`` kind, and no other."""
    monkeypatch.setenv("CVMKD_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("CVMKD_PLUGINS", "nmt")


def test_a_registered_name_resolves_and_a_folder_is_used_only_when_written_as_a_path(
    named: Path, tiny_teacher_package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    registry = build_plugins([named]).registry
    assert resolve_package("tiny-fr-en", registry) == tiny_teacher_package
    # a folder of the registered name in the working directory shadows nothing, and says so
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny-fr-en").mkdir()
    with caplog.at_level("WARNING", logger="cvmkd"):
        assert resolve_package("tiny-fr-en", registry) == tiny_teacher_package
    assert "the folder" in caplog.text and "is not used (write ./tiny-fr-en to use it)" in caplog.text
    # written as a path, the folder is what is meant
    assert resolve_package("./tiny-fr-en", registry) == Path("tiny-fr-en")
    assert resolve_package(tmp_path / "tiny-fr-en", registry) == tmp_path / "tiny-fr-en"
    # a bare word no plugin registered is a folder
    (tmp_path / "mine").mkdir()
    assert resolve_package("mine", registry) == Path("mine")
    with pytest.raises(
        ModelError, match=r"^no model package at nope, and no registered model named 'nope' \(tiny-fr-en\)$"
    ):
        resolve_package("nope", registry)


def test_plugins_lists_the_package(
    named: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CVMKD_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert main(["plugins", "--json", "--plugin", str(named)]) == 0
    listed = {p["name"]: p for p in json.loads(capsys.readouterr().out)}
    (entry,) = [p for p in listed.values() if p["source"] == "file"]
    assert entry["components"][0]["kind"] == "package" and entry["components"][0]["name"] == "tiny-fr-en"


def test_translate_and_distil_from_a_registered_name(
    named: Path,
    tiny_teacher_package: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cvmkd_core.plugins

    with_ship = build_plugins([named])
    monkeypatch.setattr(cvmkd_core.plugins, "build_plugins", lambda *a, **k: with_ship)  # as if installed
    source = tmp_path / "in.txt"
    source.write_text("le chat\n")
    assert main(["translate", "--model", "tiny-fr-en", "-i", str(source), "-o", str(tmp_path / "out.txt")]) == 0
    by_folder = tmp_path / "by-folder.txt"
    assert main(["translate", "--model", str(tiny_teacher_package), "-i", str(source), "-o", str(by_folder)]) == 0
    assert (tmp_path / "out.txt").read_text() == by_folder.read_text()
    monkeypatch.undo()

    recipe = TINY_KD_RECIPE.replace('train = "corpus.tsv"', f'train = "{tiny_teacher_package.parent / "corpus.tsv"}"')
    recipe = recipe.replace("[teacher]\n", '[teacher]\ncheckpoint = "tiny-fr-en"\n', 1)
    (tmp_path / "r.toml").write_text(recipe)
    monkeypatch.chdir(tmp_path)
    assert main(["run", "r.toml", "--plugin", str(named), "--quiet"]) == 0
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    teacher = summary["extra"]["trainer"]["teacher"]
    assert teacher["source"] == "loaded" and teacher["path"] == str(tiny_teacher_package)
    assert not (tmp_path / "runs" / "tiny" / "teacher").exists()  # loaded, not trained
