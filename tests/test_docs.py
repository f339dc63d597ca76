"""Documentation stays complete: every hook and every core recipe key is documented."""

from __future__ import annotations

import inspect
from pathlib import Path

import attrs

from cvmkd_core import hookspecs
from cvmkd_core.recipe import ComponentRef, Recipe
from cvmkd_validation import hookspecs as validation_hookspecs

DOCS = Path(__file__).resolve().parent.parent / "docs"


#: the core's hooks, and those the bundled plugins declare (``cvmkd_addhooks``)
SPEC_MODULES = (hookspecs, validation_hookspecs)


def _hooks() -> list[tuple[str, object]]:
    return [
        (name, obj)
        for module in SPEC_MODULES
        for name, obj in inspect.getmembers(module, inspect.isfunction)
        if name.startswith("cvmkd_") and obj.__module__ == module.__name__
    ]


def _hook_names() -> list[str]:
    return [name for name, _ in _hooks()]


def test_every_hook_has_a_section_in_the_hooks_reference() -> None:
    text = (DOCS / "hooks.md").read_text()
    names = _hook_names()
    assert len(names) >= 12
    missing = [n for n in names if f"## `{n}(" not in text]
    assert missing == []


def test_every_hook_is_typed_and_has_a_docstring() -> None:
    for name, spec in _hooks():
        assert inspect.getdoc(spec), name
        assert all(p.annotation is not inspect.Parameter.empty for p in inspect.signature(spec).parameters.values()), (
            name
        )


def test_every_core_recipe_key_is_in_the_recipes_reference() -> None:
    text = (DOCS / "recipes.md").read_text()
    attrs.resolve_types(Recipe)
    missing = []
    for section in attrs.fields(Recipe):
        if section.name == "sections":  # the plugin-owned tables; each plugin documents its own
            continue
        if f"`[{section.name}]`" not in text and f"`[[{section.name}]]`" not in text:
            missing.append(section.name)
        if isinstance(section.type, type) and attrs.has(section.type) and not issubclass(section.type, ComponentRef):
            for field in attrs.fields(section.type):
                if f"`{section.name}.{field.name}`" not in text:
                    missing.append(f"{section.name}.{field.name}")
    assert missing == []
