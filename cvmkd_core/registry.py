"""Named components that plugins register and recipes select by name.

A component is a factory (usually a class) plus an optional attrs config class that structures
the component's own recipe section. Components are looked up by kind and name, never by the
order plugins were installed in.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import attrs

from cvmkd_core.errors import ComponentError

#: The loop's own kinds of component, with what a component of the kind is. Plugins declare the
#: kinds they own (``register.kind(name, description)``: a trainer's losses, say); ``register.<kind>(name, factory, config=None)`` adds a component of any declared
#: kind, and a recipe refers to one with ``component_ref(kind)``.
KINDS: dict[str, str] = {
    "trainer": "a trainer: builds models and data at run start and performs the step",
    "detector": "a degradation detector deciding on rollbacks",
    "reporter": "a report writer run at finalize",
    "logger": "a logger of the step records and run events (JSONL, TensorBoard, ...)",
    "section": "a top-level recipe table a plugin owns, structured by its config class",
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
        #: every declared kind, with its description and the plugin that declared it
        self.kinds: dict[str, tuple[str, str]] = {kind: (text, "cvmkd") for kind, text in KINDS.items()}
        self._components: dict[str, dict[str, Component]] = {kind: {} for kind in KINDS}
        #: components of a kind no plugin has declared yet (plugins register in any order)
        self._waiting: list[Component] = []
        #: plugin names that failed to load, with their error, so "unknown component" can say why
        self.load_failures: dict[str, str] = {}

    def declare(self, kind: str, description: str, plugin: str) -> None:
        """A plugin's own kind of component; components of it registered earlier join it."""
        if kind in self.kinds:
            owner = self.kinds[kind][1]
            raise ComponentError(f"component kind {kind!r} is declared twice: by {owner!r} and by {plugin!r}")
        self.kinds[kind] = (description, plugin)
        self._components[kind] = {}
        waiting, self._waiting = self._waiting, []
        for component in waiting:
            self.add(component)

    def undeclared(self) -> dict[str, str]:
        """Once every plugin has registered: ``{plugin: problem}`` for the components and slots of
        a kind nobody declared (a misspelt ``register.metrc``, or the plugin that owns the kind
        is not loaded). They wait: a plugin added later that declares the kind takes them in."""
        slots = [c for c in self._components["slot"].values() if c.factory()[0] not in self.kinds]
        problems: dict[str, str] = {}
        for component in [*self._waiting, *slots]:
            kind = component.factory()[0] if component.kind == "slot" else component.kind
            problems.setdefault(
                component.plugin,
                f"registered {component.kind} {component.name!r} of component kind {kind!r}, which no "
                f"loaded plugin declares (kinds: {', '.join(self.kinds)})",
            )
        return problems

    def add(self, component: Component) -> None:
        if component.kind not in self.kinds:
            self._waiting.append(component)
            return
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
        return sorted(self._components.get(kind, {}))

    def all(self) -> list[Component]:
        return [c for kind in self.kinds for c in self._components[kind].values()]

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
        """Add a component of ``kind`` (a kind of :data:`KINDS` or one a plugin declares);
        ``register.logger(...)`` and the like are this with the kind filled in."""
        self._add(kind, name, factory, config)

    def __getattr__(self, kind: str) -> Callable[..., None]:
        if kind.startswith("_"):
            raise AttributeError(kind)

        def add(name: str, factory: Any, config: type | None = None) -> None:
            # a value that is not callable (a folder) is registered as itself
            self._add(kind, name, factory if callable(factory) else (lambda: factory), config)

        return add

    def kind(self, name: str, description: str) -> None:
        """Declare a kind of component this plugin owns (the contract its components meet is the
        plugin's to state); other plugins then register components of it."""
        self._registry.declare(name, description, self._plugin)

    def slot(self, name: str, kind: str, many: bool = False) -> None:
        """A top-level recipe key this plugin owns that selects components of ``kind``: one
        (``[name]`` with ``name = "..."``, or a bare name; absent: None) or, with ``many``, an
        array of tables (``[[name]]``; absent: empty). Read it with ``recipe.section(name)``."""
        self._add("slot", name, lambda: (kind, many), None)

    def section(self, name: str, config: type) -> None:
        """A top-level recipe table this plugin owns, structured by ``config`` (an attrs class
        whose fields all have defaults); read it with ``recipe.section(name)``."""
        self._add("section", name, config, config)
