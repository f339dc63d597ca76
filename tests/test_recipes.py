"""Every recipe shipped under recipes/ passes `cvmkd check` with the bundled plugins: a renamed
option, component or registered model breaks a test, not a user's first run."""

from __future__ import annotations

from pathlib import Path

import pytest

from cvmkd_core.cli import main

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").rglob("*.toml"))


def test_there_are_recipes() -> None:
    names = {p.name for p in RECIPES}
    assert {"default.toml", "quick.toml", "teacher.toml", "no-teacher.toml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_recipe_checks(recipe: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(recipe)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.startswith(f"ok: {recipe}")


def test_the_default_distils_the_shipped_teacher() -> None:
    from cvmkd_core.recipe import load_recipe

    for name in ("default.toml", "quick.toml"):
        (recipe,) = [p for p in RECIPES if p.name == name]
        assert load_recipe(recipe).to_dict()["teacher"]["checkpoint"] == "bible-fr-en"
