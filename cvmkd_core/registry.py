"""Named components that plugins register and recipes select by name.

A component is a factory (usually a class) plus an optional attrs config class that structures
the component's own recipe section. Components are looked up by kind and name, never by the
order plugins were installed in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

from cvmkd_core.errors import ComponentError

#: Every kind of component, listed once, with what a component of the kind is: ``register.<kind>
#: (name, factory, config=None)`` adds one (``package``, ``section`` and ``loader`` take other
#: arguments, below), and a recipe refers to one with ``component_ref(kind)``.
KINDS: dict[str, str] = {
    "loss": "a training loss: factory(config) returns a callable computing the loss",
    "metric": "a quality metric scored on the model's output",
    "detector": "a degradation detector deciding on rollbacks",
    "quantizer": "a quantization backend",
    "reporter": "a report writer run at finalize",
    "corpus": "a source of training and held-out data",
    "model": "a model architecture",
    "logger": "a metrics logger (JSONL, TensorBoard, ...)",
    "trainer": "a trainer: builds models and data at run start and performs the step",
    "section": "a top-level recipe table a plugin owns, structured by its config class",
    "package": "a model folder shipped with a plugin, accepted by name wherever a model folder is",
    "exporter": "an export format: export(package, out, quantization=None), recognizes(folder), translator(folder, device)",
    "loader": "a model format read from a folder: recognizes(folder), load(folder, device)",
    "slot": "a top-level recipe table, or array of tables, a plugin owns that selects components of one kind",
}


@attrs.frozen
class Component:
    """One registered component."""

    kind: str
    name: str
    factory: Callable[..., Any]
    config: type | None
    plugin: str
    description: str = ""

    def make_config(self, options: dict[str, Any] | None = None) -> Any:
        """The component's default config (``None`` when it takes no settings)."""
        if self.config is None:
            return None
        return self.config(**(options or {}))

    def create(self, options: dict[str, Any] | None = None) -> Any:
        """An instance: ``factory(config)`` with ``options`` over the defaults, or ``factory()``."""
        return self.factory(self.make_config(options)) if self.config is not None else self.factory()


class Registry:
    """All components, by kind and name."""

    def __init__(self) -> None:
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        #: plugin names that failed to load, with their error, so "unknown component" can say why
        self.load_failures: dict[str, str] = {}

    def add(self, component: Component) -> None:
        if component.kind not in self._components:
            raise ComponentError(
                f"plugin {component.plugin!r} registered unknown component kind "
                f"{component.kind!r}; kinds are: {', '.join(KINDS)}"
            )
        if component.config is not None and not attrs.has(component.config):
            raise ComponentError(
                f"plugin {component.plugin!r}: config of {component.kind} {component.name!r} "
                f"must be an attrs class, got {component.config!r}"
            )
        existing = self._components[component.kind].get(component.name)
        if existing is not None:
            raise ComponentError(
                f"{component.kind} {component.name!r} is registered twice: by plugin "
                f"{existing.plugin!r} and by plugin {component.plugin!r}"
            )
        self._components[component.kind][component.name] = component

    def get(self, kind: str, name: str) -> Component:
        try:
            return self._components[kind][name]
        except KeyError:
            pass
        available = ", ".join(sorted(self._components.get(kind, {}))) or "none"
        message = f"unknown {kind} {name!r}; available: {available}"
        if self.load_failures:
            failed = "; ".join(f"{p} ({why})" for p, why in sorted(self.load_failures.items()))
            message += f"; plugins that failed to load: {failed}"
        raise ComponentError(message)

    def names(self, kind: str) -> list[str]:
        return sorted(self._components[kind])

    def all(self) -> list[Component]:
        return [c for kind in KINDS for c in self._components[kind].values()]

    def by_plugin(self, plugin: str) -> list[Component]:
        return [c for c in self.all() if c.plugin == plugin]


class Registrar:
    """What ``cvmkd_register(register)`` receives: one method per kind, owner filled in."""

    def __init__(self, registry: Registry, plugin: str) -> None:
        self._registry = registry
        self._plugin = plugin

    def _add(self, kind: str, name: str, factory: Callable[..., Any], config: type | None) -> None:
        doc = inspect.getdoc(factory) or ""
        self._registry.add(
            Component(
                kind=kind,
                name=name,
                factory=factory,
                config=config,
                plugin=self._plugin,
                description=doc.splitlines()[0] if doc else "",
            )
        )

    def component(self, kind: str, name: str, factory: Callable[..., Any], config: type | None = None) -> None:
        """Add a component of ``kind`` (one of :data:`KINDS`); ``register.metric(...)`` and the
        like are this with the kind filled in."""
        self._add(kind, name, factory, config)

    def __getattr__(self, kind: str) -> Callable[..., None]:
        if kind not in KINDS:
            raise AttributeError(f"register has no method {kind!r}; the kinds are {', '.join(KINDS)}")
        return lambda name, factory, config=None: self._add(kind, name, factory, config)

    def loader(self, name: str, factory: Callable[..., Any]) -> None:
        """A model format read from a folder: ``factory()`` returns an object with
        ``recognizes(folder) -> bool`` and ``load(folder, device)``."""
        self._add("loader", name, factory, None)

    def package(self, name: str, path: str | Path) -> None:
        """A model folder shipped with the plugin, accepted by name wherever a folder is."""
        folder = Path(path)
        self._add("package", name, lambda: folder, None)

    def slot(self, name: str, kind: str, many: bool = False) -> None:
        """A top-level recipe key this plugin owns that selects components of ``kind``: one
        (``[name]`` with ``name = "..."``, or a bare name; absent: None) or, with ``many``, an
        array of tables (``[[name]]``; absent: empty). Read it with ``recipe.section(name)``."""
        if kind not in KINDS:
            raise ComponentError(f"plugin {self._plugin!r}: slot {name!r} selects unknown kind {kind!r}")
        self._add("slot", name, lambda: (kind, many), None)

    def section(self, name: str, config: type) -> None:
        """A top-level recipe table this plugin owns, structured by ``config`` (an attrs class
        whose fields all have defaults); read it with ``recipe.section(name)``."""
        self._add("section", name, config, config)
