"""The one cattrs converter that turns recipe tables into frozen attrs config classes.

Types are strict (TOML already typed every value: a string is never silently read as a
number), unknown keys are refused, and every problem is collected with its recipe path, so a
user sees all mistakes at once: ``guard.threshold: must be > 0, got -1.0``.
Plugins use :func:`structure` and the validators below for their own config classes.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import attrs
import cattrs
from cattrs.errors import (
    BaseValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.gen import make_dict_structure_fn, override

from cvmkd_core.errors import RecipeError


class ConfigValueError(ValueError):
    """A value was read but is not acceptable; its message is shown to the user as-is."""


def describe(value: Any) -> str:
    """How a received value is shown in messages: its TOML type and, for scalars, the value."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        return f"string {value!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if value is None:
        return "nothing"
    return f"{type(value).__name__} {value!r}"


# --- validators: attrs validators whose messages say what was received -------------------------


def _validator(check: Callable[[Any], bool], message: str) -> Callable[[Any, Any, Any], None]:
    def validate(_instance: Any, _attribute: Any, value: Any) -> None:
        if value is not None and not check(value):
            raise ConfigValueError(f"{message}, got {value!r}")

    return validate


def gt(bound: float) -> Callable[[Any, Any, Any], None]:
    return _validator(lambda v: v > bound, f"must be > {bound}")


def ge(bound: float) -> Callable[[Any, Any, Any], None]:
    return _validator(lambda v: v >= bound, f"must be >= {bound}")


def between(low: float, high: float, *, high_open: bool = False) -> Callable[[Any, Any, Any], None]:
    if high_open:
        return _validator(lambda v: low <= v < high, f"must be in [{low}, {high})")
    return _validator(lambda v: low <= v <= high, f"must be in [{low}, {high}]")


def inside_run_dir(_instance: Any, _attribute: Any, value: str) -> None:
    """A file a component writes into the run directory: a relative path that stays inside it."""
    from pathlib import PurePosixPath, PureWindowsPath

    if (
        not value
        or "\\" in value
        or PurePosixPath(value).is_absolute()
        or PureWindowsPath(value).is_absolute()
        or ".." in PurePosixPath(value).parts
    ):
        raise ConfigValueError(f"must be a relative path inside the run directory, got {value!r}")


def one_of(*choices: Any) -> Callable[[Any, Any, Any], None]:
    shown = ", ".join(repr(c) for c in choices)
    return _validator(lambda v: v in choices, f"must be one of {shown}")


def non_empty(_instance: Any, _attribute: Any, value: Any) -> None:
    if value is not None and len(value) == 0:
        raise ConfigValueError("must not be empty")


# --- the converter ------------------------------------------------------------------------------


def _strict_int(value: Any, _type: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigValueError(f"expected an integer, got {describe(value)}")
    return value


def _strict_float(value: Any, _type: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigValueError(f"expected a number, got {describe(value)}")
    return float(value)


def _strict_str(value: Any, _type: Any) -> str:
    if not isinstance(value, str):
        raise ConfigValueError(f"expected a string, got {describe(value)}")
    return value


def _strict_bool(value: Any, _type: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigValueError(f"expected true or false, got {describe(value)}")
    return value


def _is_list(t: Any) -> bool:
    return typing.get_origin(t) in (list, list)


def _is_dict(t: Any) -> bool:
    return typing.get_origin(t) in (dict, dict) or t is dict


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=True, detailed_validation=True)
    conv.register_structure_hook(int, _strict_int)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(bool, _strict_bool)
    conv.register_structure_hook(Any, lambda v, _t: v)

    def list_hook_factory(t: Any) -> Callable[[Any, Any], Any]:
        (item_type,) = typing.get_args(t) or (Any,)
        item_hook = conv.get_structure_hook(item_type)

        def structure_list(value: Any, _t: Any) -> list[Any]:
            if not isinstance(value, list):
                raise ConfigValueError(f"expected an array, got {describe(value)}")
            out, errors = [], []
            for index, item in enumerate(value):
                try:
                    out.append(item_hook(item, item_type))
                except Exception as exc:  # collected with its index, like cattrs does
                    exc.__notes__ = [  # type: ignore[attr-defined]  # PEP 678 notes, as cattrs adds them
                        *getattr(exc, "__notes__", []),
                        IterableValidationNote(f"Structuring @ index {index}", index, item_type),
                    ]
                    errors.append(exc)
            if errors:
                raise IterableValidationError("while structuring an array", errors, t)
            return out

        return structure_list

    def dict_hook_factory(t: Any) -> Callable[[Any, Any], Any]:
        def structure_dict(value: Any, _t: Any) -> dict[str, Any]:
            if not isinstance(value, dict):
                raise ConfigValueError(f"expected a table, got {describe(value)}")
            return dict(value)

        return structure_dict

    def attrs_hook_factory(cls: type) -> Callable[[Any, Any], Any]:
        attrs.resolve_types(cls)
        overrides: dict[str, Any] = {}
        for field in attrs.fields(cls):
            if field.validator is None:
                continue
            overrides[field.name] = override(struct_hook=_validated_hook(conv, field))
        inner: Callable[[Any, Any], Any] = make_dict_structure_fn(
            cls, conv, _cattrs_forbid_extra_keys=True, **overrides
        )
        defaults = _default_component_names(cls)

        def structure_attrs(value: Any, _t: Any) -> Any:
            if not isinstance(value, dict):
                raise ConfigValueError(f"expected a table, got {describe(value)}")
            # a component's settings without its name (``--set guard.threshold=1`` on a recipe
            # with no [guard] table) keep the component the field chooses by default
            missing = {k: n for k, n in defaults.items() if isinstance(value.get(k), dict) and "name" not in value[k]}
            if missing:
                value = {**value, **{k: {"name": n, **value[k]} for k, n in missing.items()}}
            return inner(value, cls)

        return structure_attrs

    conv.register_structure_hook_factory(_is_list, list_hook_factory)
    conv.register_structure_hook_factory(_is_dict, dict_hook_factory)
    conv.register_structure_hook_factory(attrs.has, attrs_hook_factory)
    return conv


def _default_component_names(cls: type) -> dict[str, str]:
    """``{field: name}`` for the fields of ``cls`` whose default is a component reference (an
    object with a ``kind`` and a ``name``, as the recipe's ``ComponentRef`` classes are)."""
    names: dict[str, str] = {}
    for field in attrs.fields(cls):
        default = field.default
        if not isinstance(default, attrs.Factory) or default.takes_self:  # type: ignore[arg-type]
            continue
        try:
            value = default.factory()
        except Exception:  # a factory that needs more than nothing: not a component reference
            continue
        if isinstance(getattr(type(value), "kind", None), str) and isinstance(getattr(value, "name", None), str):
            names[field.name] = value.name
    return names


def _validated_hook(conv: cattrs.Converter, field: attrs.Attribute) -> Callable[[Any, Any], Any]:
    """Structure one field, then run its attrs validator, so every field's problem is reported
    (attrs itself stops at the first failing validator)."""

    def hook(value: Any, t: Any) -> Any:
        result = conv.structure(value, t)
        field.validator(None, field, result)  # type: ignore[misc]
        return result

    return hook


converter: cattrs.Converter = _make_converter()


# --- errors -------------------------------------------------------------------------------------


def _format_exception(exc: BaseException, type_: type | None) -> str:
    if isinstance(exc, ConfigValueError):
        return str(exc)
    if isinstance(exc, ForbiddenExtraKeysError):
        known = sorted(f.name for f in attrs.fields(exc.cl)) if attrs.has(exc.cl) else []
        keys = ", ".join(repr(k) for k in sorted(exc.extra_fields))
        noun = "key" if len(exc.extra_fields) == 1 else "keys"
        return f"unknown {noun} {keys}; known keys: {', '.join(known) or 'none'}"
    if isinstance(exc, KeyError):
        return "required key is missing"
    return f"invalid value ({exc})"


def _format_path(path: str) -> str:
    if path.startswith("$."):
        path = path[2:]
    elif path.startswith("$"):
        path = path[1:]
    return path.replace("['", ".").replace("']", "")


def error_lines(exc: BaseException, path: str) -> list[str]:
    """One ``path: message`` line per problem inside a cattrs error group (or single error)."""
    lines = []
    for entry in cattrs.transform_error(exc, path="$." + path if path else "$", format_exception=_format_exception):
        message, _, where = entry.rpartition(" @ ")
        where = _format_path(where)
        lines.append(f"{where}: {message}" if where else message)
    return lines


def structure(data: Any, cls: type, path: str = "") -> Any:
    """Structure ``data`` into ``cls``; raise :class:`RecipeError` listing every problem.

    ``path`` is where ``data`` sits in the recipe (``"guard"``), so messages point there.
    """
    problems = structure_collect(data, cls, path)
    if isinstance(problems, list):
        raise RecipeError(problems)
    return problems


def structure_collect(data: Any, cls: type, path: str = "") -> Any:
    """Like :func:`structure`, but return the list of problems instead of raising."""
    try:
        return converter.structure(data, cls)
    except (BaseValidationError, ConfigValueError, KeyError) as exc:
        return error_lines(exc, path)
    except (ValueError, TypeError) as exc:
        # a cross-field check in __attrs_post_init__ (for example d_model % n_heads)
        prefix = f"{path}: " if path else ""
        return [f"{prefix}{exc}"]


def unstructure(obj: Any) -> Any:
    return converter.unstructure(obj)
