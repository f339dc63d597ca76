"""Recipes: TOML files that name the components of a run and their settings.

Loading goes: read TOML → merge the chain of ``extends`` → apply ``--set`` overrides →
structure into frozen attrs classes. Component sections (``[guard]``,
``[[reports]]``...) name a registered component; each is structured by that
component's own config class. All problems are collected and raised together as one
:class:`~cvmkd_core.errors.RecipeError`, one line per problem with its path.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import attrs
import tomli_w

from cvmkd_core.config import (
    ConfigValueError,
    converter,
    describe,
    error_lines,
    ge,
    gt,
    one_of,
    structure_collect,
)
from cvmkd_core.errors import ComponentError, RecipeError
from cvmkd_core.registry import Registry

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

EXTENDS_KEY = "extends"
RECIPE_HOOK_FILES_KEY = "hook_files"

# The registry components are resolved against while a recipe is being structured.
_active_registry: contextvars.ContextVar[Registry | None] = contextvars.ContextVar("cvmkd_registry", default=None)


@contextlib.contextmanager
def resolving_with(registry: Registry | None) -> Iterator[None]:
    token = _active_registry.set(registry)
    try:
        yield
    finally:
        _active_registry.reset(token)


# --- component references -----------------------------------------------------------------------


@attrs.frozen
class ComponentRef:
    """A recipe's choice of one component: its name, and its settings.

    In a recipe either a bare name (``guard = "guard"``) or a table with ``name`` and the
    component's own keys (``[guard]`` ``name = "guard"`` ``threshold = 0.05``).
    After resolution ``config`` holds the component's structured config object.
    """

    kind: ClassVar[str] = ""
    name: str
    #: the settings as written in the recipe; ``config`` is what counts once resolved
    options: dict[str, Any] = attrs.field(factory=dict, eq=False)
    config: Any = None

    def to_table(self) -> dict[str, Any]:
        """The reference as a recipe table, with the component's defaults made explicit."""
        settings = _unstructure_recipe(self.config) if self.config is not None else dict(self.options)
        return {"name": self.name, **_drop_none(settings)}


@functools.cache
def component_ref(kind: str) -> type[ComponentRef]:
    """The attrs class of a recipe's reference to a component of ``kind`` (of
    :data:`~cvmkd_core.registry.KINDS`, or a kind a plugin declares), as a field type:
    ``loss: component_ref("loss")``."""
    cls = type(f"{kind.title()}Ref", (ComponentRef,), {"kind": kind, "__module__": __name__})
    return attrs.frozen(cls)


TrainerRef = component_ref("trainer")
DetectorRef = component_ref("detector")
ReporterRef = component_ref("reporter")
LoggerRef = component_ref("logger")


def _structure_ref(value: Any, cls: type[ComponentRef]) -> ComponentRef:
    if isinstance(value, str):
        name, options = value, {}
    elif isinstance(value, dict):
        if "name" not in value:
            raise ConfigValueError(f"missing 'name': which {cls.kind} to use")
        name = value["name"]
        if not isinstance(name, str):
            raise ConfigValueError(f"name: expected a string, got {describe(name)}")
        options = {k: v for k, v in value.items() if k != "name"}
    else:
        raise ConfigValueError(f"expected a {cls.kind} name or a table with 'name', got {describe(value)}")
    registry = _active_registry.get()
    if registry is None:
        return cls(name=name, options=options)
    try:
        component = registry.get(cls.kind, name)
    except ComponentError as exc:
        raise ConfigValueError(str(exc)) from None
    if component.config is None:
        if options:
            keys = ", ".join(repr(k) for k in sorted(options))
            raise ConfigValueError(f"{cls.kind} {name!r} takes no settings, got {keys}")
        return cls(name=name, options={}, config=None)
    # Structured by the component's own config class; nested errors keep their path.
    config: Any = converter.structure(options, component.config)
    return cls(name=name, options=options, config=config)


converter.register_structure_hook_func(lambda t: isinstance(t, type) and issubclass(t, ComponentRef), _structure_ref)


# --- the core sections --------------------------------------------------------------------------

_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _valid_run_name(_instance: Any, _attribute: Any, value: str) -> None:
    if not _RUN_NAME.match(value):
        raise ConfigValueError(f"must be letters, digits, '.', '_' or '-' (a folder name), got {value!r}")


@attrs.frozen
class RunConfig:
    """``[run]``: how long the run is, where it writes, and on what hardware."""

    name: str = attrs.field(default="run", validator=_valid_run_name)
    output_dir: str = "runs"
    steps: int = attrs.field(default=1000, validator=gt(0))
    validate_every: int = attrs.field(default=1000, validator=gt(0))
    seed: int = attrs.field(default=0, validator=ge(0))
    device: str = attrs.field(default="auto", validator=one_of("auto", "cpu", "cuda"))
    precision: str = attrs.field(default="auto", validator=one_of("auto", "bf16", "fp16", "fp32"))
    log_every: int = attrs.field(default=1, validator=gt(0))
    keep_checkpoints: int = attrs.field(default=2, validator=ge(1))
    hook_files: list[str] = attrs.field(factory=list)
    cache_dir: str = ""
    """where plugins cache what they build once and reuse (trained models, their outputs...); empty: <output_dir>/.cache"""

    def cache_path(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else Path(self.output_dir) / ".cache"


@attrs.frozen
class Recipe:
    """A whole recipe. Sections not given take the defaults shown in ``docs/recipes.md``."""

    run: RunConfig = attrs.field(factory=RunConfig)
    #: the trainer: the component that builds the run and performs the step
    distill: TrainerRef = attrs.field(factory=lambda: TrainerRef(name="kd"))  # type: ignore[valid-type]
    #: the degradation detector (``cvmkd_check_degradation``)
    guard: DetectorRef | None = None  # type: ignore[valid-type]
    reports: list[ReporterRef] = attrs.field(factory=list)  # type: ignore[valid-type]
    loggers: list[LoggerRef] = attrs.field(factory=lambda: [LoggerRef(name="jsonl")])  # type: ignore[valid-type]
    #: the tables plugins own (``register.section``, ``register.slot``), structured by their
    #: config classes or as references to components
    sections: dict[str, Any] = attrs.field(factory=dict)

    def section(self, name: str) -> Any:
        """The structured ``[name]`` table of a plugin-owned section (its defaults when absent)."""
        try:
            return self.sections[name]
        except KeyError:
            known = ", ".join(sorted(self.sections)) or "none"
            raise RecipeError(f"no recipe section {name!r} is registered; registered sections: {known}") from None

    def component_refs(self) -> list[tuple[str, ComponentRef]]:
        """Every component reference in the recipe with its path, nested ones included."""
        return list(_walk_refs(self, ""))

    def selected(self, kind: str) -> list[tuple[str, str, ComponentRef]]:
        """``(label, path, ref)`` of every component of ``kind``, in recipe order. The label is
        the name, or ``name-<index>`` when entries of one list share a name."""
        refs = [(path, ref) for path, ref in self.component_refs() if ref.kind == kind]
        names = [ref.name for _, ref in refs]
        out = []
        for path, ref in refs:
            label = ref.name
            if names.count(ref.name) > 1 and path.endswith("]"):
                label = f"{ref.name}-{path[path.rindex('[') + 1 : -1]}"
            out.append((label, path, ref))
        return out

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain tables, defaults made explicit; the inverse of loading."""
        return _drop_none(_unstructure_recipe(self))

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def sha256(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()


def _unstructure_recipe(value: Any) -> Any:
    if isinstance(value, Recipe):
        tables = {
            f.name: _unstructure_recipe(getattr(value, f.name)) for f in attrs.fields(Recipe) if f.name != "sections"
        }
        return {**tables, **{k: _unstructure_recipe(v) for k, v in sorted(value.sections.items())}}
    if isinstance(value, ComponentRef):
        return _unstructure_recipe(value.to_table())
    if attrs.has(type(value)):
        return {f.name: _unstructure_recipe(getattr(value, f.name)) for f in attrs.fields(type(value))}
    if isinstance(value, dict):
        return {k: _unstructure_recipe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_unstructure_recipe(v) for v in value]
    return value


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def _walk_refs(value: Any, path: str) -> Iterator[tuple[str, ComponentRef]]:
    if isinstance(value, ComponentRef):
        yield path, value
        if value.config is not None:
            yield from _walk_refs(value.config, path)
    elif isinstance(value, Recipe):
        for f in attrs.fields(Recipe):
            if f.name != "sections":
                yield from _walk_refs(getattr(value, f.name), f.name)
        for name, table in sorted(value.sections.items()):
            yield from _walk_refs(table, name)
    elif attrs.has(type(value)):
        for f in attrs.fields(type(value)):
            yield from _walk_refs(getattr(value, f.name), f"{path}.{f.name}" if path else f.name)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _walk_refs(item, f"{path}[{i}]")


# --- reading, extending, overriding --------------------------------------------------------------


def read_toml(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError(f"no such recipe file: {path}") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe path is a directory: {path}") from None
    except OSError as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise RecipeError(
            f"{path}: line {line}, column {column}: not valid UTF-8 (byte 0x{raw[exc.start]:02x})"
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path}: invalid TOML: {exc}") from None


#: tables whose ``name`` key is a setting, not the choice of a component
NOT_COMPONENT_TABLES = frozenset({("run",)})


def _switches_component(path: tuple[str, ...], base: Any, value: Any) -> bool:
    """A component table that names another component: its settings belong to the old one."""
    return (
        path not in NOT_COMPONENT_TABLES
        and isinstance(base, dict)
        and isinstance(value, dict)
        and "name" in value
        and "name" in base
        and value["name"] != base["name"]
    )


def deep_merge(base: dict[str, Any], override: dict[str, Any], _path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Tables merge key by key; any other value (arrays included) replaces the base's. A
    component table that names a different component (``[guard] name = "mine"`` over
    ``name = "guard"``) replaces the base's table instead of merging into it."""
    merged = dict(base)
    for key, value in override.items():
        path = (*_path, key)
        if (
            isinstance(value, dict)
            and isinstance(merged.get(key), dict)
            and not _switches_component(path, merged[key], value)
        ):
            merged[key] = deep_merge(merged[key], value, path)
        else:
            merged[key] = value
    return merged


def read_recipe_tables(path: Path, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe and the recipes it extends, merged; ``extends`` is relative to the file."""
    path = path.resolve()
    if path in _chain:
        cycle = " -> ".join(p.name for p in (*_chain, path))
        raise RecipeError(f"{_chain[-1]}: extends: cycle {cycle}")
    data = read_toml(path)
    parent = data.pop(EXTENDS_KEY, None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise RecipeError(f"{path}: extends: expected a file name, got {describe(parent)}")
    parent_path = path.parent / parent
    if not parent_path.is_file():
        raise RecipeError(f"{path}: extends: no such recipe file: {parent_path}")
    base = read_recipe_tables(parent_path, (*_chain, path))
    return deep_merge(base, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``section.key=value``: the value is read as TOML (``6.0``, ``true``, ``["a"]``),
    falling back to a plain string (``name=my-run``)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {text!r}: expected section.key=value")
    parts = key.split(".")
    if any(not p or not re.match(r"^[A-Za-z0-9_-]+$", p) for p in parts):
        raise RecipeError(f"--set {text!r}: invalid key {key!r}")
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        table = data
        for depth, part in enumerate(parts[:-1]):
            current = table.get(part)
            if isinstance(current, str) and depth + 1 < len(parts):
                # a component given by bare name becomes a table so its settings can be set
                current = {"name": current}
            if current is None:
                current = {}
            if not isinstance(current, dict):
                where = ".".join(parts[: depth + 1])
                raise RecipeError(f"--set {text!r}: {where} is not a table")
            table[part] = current = dict(current)
            table = current
        if parts[-1] == "name" and tuple(parts[:-1]) not in NOT_COMPONENT_TABLES and table.get("name", value) != value:
            table.clear()  # another component: the old one's settings do not apply to it
        table[parts[-1]] = value
    return data


_CORE_TABLES = frozenset(f.name for f in attrs.fields(Recipe) if f.name != "sections")


def _structure_with_sections(data: dict[str, Any], registry: Registry | None) -> Any:
    """The core's tables structured as :class:`Recipe`, every other table by the config class
    of the plugin that registered it as a section; a list of problems when any."""
    core = {k: v for k, v in data.items() if k in _CORE_TABLES}
    rest = {k: v for k, v in data.items() if k not in _CORE_TABLES}
    problems: list[str] = []
    result = structure_collect(core, Recipe)
    if isinstance(result, list):
        problems.extend(result)
    if registry is None:  # nothing to structure plugin tables with: keep them as read
        return result if problems else attrs.evolve(result, sections=rest)
    sections: dict[str, Any] = {}
    for name in registry.names("slot"):
        kind, many = registry.get("slot", name).factory()
        table = rest.pop(name, None)
        if table is None:
            sections[name] = [] if many else None
            continue
        value = structure_collect(table, list[component_ref(kind)] if many else component_ref(kind), name)  # type: ignore[misc,arg-type]
        if isinstance(value, list) and value and isinstance(value[0], str):  # the problems found
            problems.extend(line if line.startswith(f"{name}") else f"{name}: {line}" for line in value)
        else:
            sections[name] = value
    names = sorted([*registry.names("section"), *registry.names("slot")])
    for name in registry.names("section"):
        table = rest.pop(name, {})
        if not isinstance(table, dict):
            problems.append(f"{name}: expected a table, got {describe(table)}")
            continue
        value = structure_collect(table, registry.get("section", name).config, name)  # type: ignore[union-attr,arg-type]
        if isinstance(value, list):
            problems.extend(line if line.startswith(f"{name}") else f"{name}: {line}" for line in value)
        else:
            sections[name] = value
    for name in sorted(rest):
        known = ", ".join(sorted([*_CORE_TABLES, *names]))
        problems.append(f"unknown key {name!r}; known keys: {known}")
    if problems:
        return problems
    return attrs.evolve(result, sections=sections)


def structure_recipe(data: dict[str, Any], registry: Registry | None) -> Recipe:
    """Structure merged tables into a :class:`Recipe`, resolving components in ``registry``."""
    with resolving_with(registry):
        result = _structure_with_sections(data, registry)
        # Further passes over the recipe with defaults made explicit: components chosen by a
        # default are resolved and configured exactly like the ones the recipe names. A default
        # component may itself default another (the default trainer's default loss), so repeat
        # until nothing changes; nesting is shallow, a few passes suffice.
        for _ in range(8):
            if isinstance(result, list) or registry is None:
                break
            before = result.to_dict()
            result = _structure_with_sections(before, registry)
            if not isinstance(result, list) and result.to_dict() == before:
                break
    if isinstance(result, list):
        lines = [line if not line.startswith("unknown key") else f"recipe: {line}" for line in result]
        raise RecipeError(lines)
    return result


def load_recipe(path: str | Path, overrides: list[str] | None = None, registry: Registry | None = None) -> Recipe:
    """Read, merge, override and structure a recipe; raise RecipeError naming every problem."""
    path = Path(path)
    data = read_recipe_tables(path)
    data = apply_overrides(data, list(overrides or []))
    try:
        return structure_recipe(data, registry)
    except RecipeError as exc:
        raise RecipeError(exc.problems, source=str(path)) from None


__all__ = [
    "ComponentRef",
    "component_ref",
    "RunConfig",
    "Recipe",
    "load_recipe",
    "structure_recipe",
    "error_lines",
]
