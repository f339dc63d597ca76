"""Recipes: structuring, extends, --set overrides, and the catalogue of recipe errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cvmkd_core import hookimpl
from cvmkd_core.errors import RecipeError
from cvmkd_core.plugins import Plugins
from cvmkd_core.recipe import Recipe, apply_overrides, load_recipe, parse_override, read_recipe_tables
from cvmkd_testing import TOY_RECIPE


def test_defaults_are_made_explicit(write, toy_plugins: Plugins) -> None:
    recipe = load_recipe(write("r.toml", TOY_RECIPE), registry=toy_plugins.registry)
    table = recipe.to_dict()
    assert table["run"]["steps"] == 6
    assert table["run"]["precision"] == "auto"  # a default, written out
    assert table["distill"] == {"name": "toy", "learning_rate": 0.05, "target": 3.0, "sabotage_at_step": 0}
    assert table["loggers"] == [{"name": "jsonl", "file": "train.jsonl", "every": 0}]


def test_resolved_recipe_round_trips(write, toy_plugins: Plugins) -> None:
    recipe = load_recipe(write("r.toml", TOY_RECIPE), registry=toy_plugins.registry)
    again = load_recipe(write("again.toml", recipe.to_toml()), registry=toy_plugins.registry)
    assert again == recipe
    assert again.sha256() == recipe.sha256()


def test_component_settings_are_structured_by_the_component_config(write, toy_plugins: Plugins) -> None:
    path = write("r.toml", TOY_RECIPE + "\n[validation.options]\n")
    path = write(
        "r.toml",
        TOY_RECIPE.replace('name = "toy"\n\n[validation]', 'name = "toy"\nlearning_rate = 0.5\n\n[validation]'),
    )
    recipe = load_recipe(path, registry=toy_plugins.registry)
    assert recipe.distill.config.learning_rate == 0.5
    assert type(recipe.distill.config).__name__ == "ToyConfig"


def test_extends_merges_tables_and_overrides_keys(write, toy_plugins: Plugins) -> None:
    write("base.toml", TOY_RECIPE)
    child = write(
        "sub/child.toml",
        """
        extends = "../base.toml"
        [run]
        steps = 9
        """,
    )
    recipe = load_recipe(child, registry=toy_plugins.registry)
    assert recipe.run.steps == 9
    assert recipe.run.validate_every == 3  # from the base
    assert recipe.run.name == "toy"


def test_a_child_that_names_another_component_replaces_the_table(write) -> None:
    """Switching a component drops the old one's settings; keeping it merges them."""
    base = write(
        "base.toml",
        """
        [run]
        name = "base"
        steps = 5
        [corpus]
        name = "bible"
        direction = "fr-en"
        valid_size = 10
        [distill.loss]
        name = "kd"
        temperature = 6.0
        alpha = 0.8
        """,
    )
    child = write(
        "child.toml",
        """
        extends = "base.toml"
        [run]
        name = "child"
        [corpus]
        name = "files"
        train = "train.tsv"
        [distill.loss]
        name = "kd"
        temperature = 2.0
        """,
    )
    data = read_recipe_tables(child)
    assert data["corpus"] == {"name": "files", "train": "train.tsv"}  # no 'direction' of the bible
    assert data["distill"]["loss"] == {"name": "kd", "temperature": 2.0, "alpha": 0.8}  # same component: merged
    assert data["run"] == {"name": "child", "steps": 5}  # run.name is a setting, not a component
    again = apply_overrides(read_recipe_tables(base), ["corpus.name=files", "corpus.train=t.tsv", "run.name=x"])
    assert again["corpus"] == {"name": "files", "train": "t.tsv"}
    assert again["run"] == {"name": "x", "steps": 5}
    same = apply_overrides(read_recipe_tables(base), ["corpus.name=bible"])
    assert same["corpus"] == {"name": "bible", "direction": "fr-en", "valid_size": 10}


def test_extends_chain_and_cycle(write) -> None:
    write("a.toml", 'extends = "b.toml"\n[run]\nsteps = 1\n')
    write("b.toml", 'extends = "a.toml"\n')
    with pytest.raises(RecipeError, match="extends: cycle a.toml -> b.toml -> a.toml"):
        load_recipe(Path("a.toml").resolve())


def test_set_overrides(write, toy_plugins: Plugins) -> None:
    recipe = load_recipe(
        write("r.toml", TOY_RECIPE),
        overrides=["run.steps=12", "distill.learning_rate=0.2", "run.name=other-run", 'validation.metrics=["exact"]'],
        registry=toy_plugins.registry,
    )
    assert recipe.run.steps == 12
    assert recipe.run.name == "other-run"  # not TOML: read as a plain string
    assert recipe.distill.config.learning_rate == 0.2


def test_set_turns_a_bare_component_name_into_a_table() -> None:
    data = apply_overrides({"distill": "toy"}, ["distill.learning_rate=0.3"])
    assert data == {"distill": {"name": "toy", "learning_rate": 0.3}}


@pytest.mark.parametrize("text", ["run.steps", "=3", "run..steps=3", "run.st eps=3"])
def test_malformed_set(text: str) -> None:
    with pytest.raises(RecipeError, match="--set"):
        parse_override(text)


def test_a_recipe_without_components_structures_without_a_registry(write) -> None:
    recipe = load_recipe(write("r.toml", "[run]\nsteps = 5\n"))
    assert isinstance(recipe, Recipe)
    assert recipe.run.steps == 5


# The catalogue: each malformed recipe and exactly the lines it must produce.
CATALOGUE = [
    (
        "negative steps",
        "[run]\nsteps = -1\n",
        ["run.steps: must be > 0, got -1"],
    ),
    (
        "string for an integer",
        '[run]\nsteps = "ten"\n',
        ["run.steps: expected an integer, got string 'ten'"],
    ),
    (
        "float for an integer",
        "[run]\nvalidate_every = 2.5\n",
        ["run.validate_every: expected an integer, got float 2.5"],
    ),
    (
        "boolean for a number",
        '[distill]\nname = "toy"\nlearning_rate = true\n',
        ["distill.learning_rate: expected a number, got boolean true"],
    ),
    (
        "unknown key in a section",
        "[run]\nstep = 10\n",
        [
            "run: unknown key 'step'; known keys: cache_dir, device, hook_files, keep_checkpoints, log_every, name, "
            "output_dir, precision, seed, steps, validate_every"
        ],
    ),
    (
        "unknown top-level section",
        "[trainning]\nsteps = 10\n",
        ["recipe: unknown key 'trainning'; known keys: distill, guard, loggers, reports, run, validation"],
    ),
    (
        "value not among the choices",
        '[run]\nprecision = "fp8"\n',
        ["run.precision: must be one of 'auto', 'bf16', 'fp16', 'fp32', got 'fp8'"],
    ),
    (
        "unknown component",
        '[distill]\nname = "toyy"\n',
        ["distill: unknown trainer 'toyy'; available: toy"],
    ),
    (
        "unknown metric in a list",
        '[validation]\nmetrics = ["exact", "blue"]\n',
        ["validation.metrics[1]: unknown metric 'blue'; available: exact"],
    ),
    (
        "component setting out of range",
        '[distill]\nname = "toy"\nlearning_rate = -1.0\n',
        ["distill.learning_rate: must be > 0, got -1.0"],
    ),
    (
        "unknown component setting",
        '[distill]\nname = "toy"\nlr = 0.1\n',
        ["distill: unknown key 'lr'; known keys: learning_rate, sabotage_at_step, target"],
    ),
    (
        "settings for a component that takes none",
        '[[validation.metrics]]\nname = "exact"\nlowercase = true\n',
        ["validation.metrics[0]: metric 'exact' takes no settings, got 'lowercase'"],
    ),
    (
        # a table without its name keeps the default component (kd), here not installed
        "component table without a name",
        "[distill]\nlearning_rate = 0.1\n",
        ["distill: unknown trainer 'kd'; available: toy"],
    ),
    (
        "list entry without a name",
        "[[reports]]\ntitle = 4\n",
        ["reports[0]: missing 'name': which reporter to use"],
    ),
    (
        "table where a list is expected",
        '[validation]\nmetrics = "exact"\n',
        ["validation.metrics: expected an array, got string 'exact'"],
    ),
    (
        "a section given as a value",
        "run = 5\n",
        ["run: expected a table, got integer 5"],
    ),
    (
        "invalid run name",
        '[run]\nname = "../escape"\n',
        ["run.name: must be letters, digits, '.', '_' or '-' (a folder name), got '../escape'"],
    ),
    (
        "three mistakes at once",
        '[run]\nsteps = 0\nseed = -3\n[distill]\nname = "toy"\nlearning_rate = -1.0\n',
        [
            "run.steps: must be > 0, got 0",
            "run.seed: must be >= 0, got -3",
            "distill.learning_rate: must be > 0, got -1.0",
        ],
    ),
]


@pytest.mark.parametrize("label,text,expected", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_recipe_error_catalogue(label: str, text: str, expected: list[str], write, toy_plugins: Plugins) -> None:
    path = write("bad.toml", text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, registry=toy_plugins.registry)
    assert info.value.problems == expected
    assert info.value.lines() == [f"{path}: {line}" for line in expected]


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("[run\nsteps = 1\n", "invalid TOML: "),
        ("[run]\nsteps = 1\nsteps = 2\n", "invalid TOML: "),
    ],
)
def test_malformed_toml(text: str, fragment: str, write) -> None:
    path = write("bad.toml", text)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    (line,) = info.value.lines()
    assert line.startswith(f"{path}: {fragment}")
    assert "line" in line  # tomllib names the line and column


def test_missing_and_non_utf8_recipe(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such recipe file: .*nope.toml"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(b'[run]\nname = "caf\xe9"\n')
    with pytest.raises(RecipeError, match=r"latin1.toml: line 2, column 12: not valid UTF-8 \(byte 0xe9\)"):
        load_recipe(bad)


def test_a_default_component_gets_its_own_default_components(write) -> None:
    """No [distill] section: the default trainer "kd" and, inside it, its default loss "kd"
    are both resolved and configured (a default within a default needs a further pass)."""
    from cvmkd_core.plugins import build_plugins
    from cvmkd_core.recipe import load_recipe

    plugins = build_plugins()
    recipe = load_recipe(write("r.toml", '[run]\nname = "x"\n'), registry=plugins.registry)
    assert recipe.distill.name == "kd"
    assert recipe.distill.config.loss.name == "kd"
    assert recipe.distill.config.loss.config.temperature == 6.0


class Slots:
    """A plugin owning two recipe slots: one metric, and an array of them."""

    @hookimpl
    def cvmkd_register(self, register: Any) -> None:
        register.slot("judge", "metric")
        register.slot("judges", "metric", many=True)


def test_a_plugin_owns_recipe_slots_that_select_components(write, toy_plugins: Plugins) -> None:
    toy_plugins.add_plugin(Slots(), name="slots", source="test")
    try:
        recipe = load_recipe(write("r.toml", TOY_RECIPE), registry=toy_plugins.registry)
        assert recipe.section("judge") is None and recipe.section("judges") == []
        text = 'judge = "exact"\n' + TOY_RECIPE + '\n[[judges]]\nname = "exact"\n[[judges]]\nname = "exact"\n'
        recipe = load_recipe(write("slots.toml", text), registry=toy_plugins.registry)
        assert recipe.section("judge").name == "exact" and len(recipe.section("judges")) == 2
        assert [(label, path) for label, path, _ in recipe.selected("metric")][:3] == [
            ("exact", "judge"),
            ("exact-0", "judges[0]"),
            ("exact-1", "judges[1]"),
        ]
        assert recipe.to_dict()["judges"] == [{"name": "exact"}, {"name": "exact"}]
        bad = 'judge = "nope"\n' + TOY_RECIPE + '\n[[judges]]\nlabel = "x"\n'
        with pytest.raises(RecipeError) as info:
            load_recipe(write("bad.toml", bad), registry=toy_plugins.registry)
        assert info.value.problems == [
            "judge: unknown metric 'nope'; available: exact",
            "judges[0]: missing 'name': which metric to use",
        ]
    finally:
        toy_plugins.remove_plugin("slots")
