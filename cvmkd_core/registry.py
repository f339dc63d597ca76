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

KINDS: tuple[str, ...] = (
    "loss",
    "metric",
    "detector",
    "quantizer",
    "reporter",
    "corpus",
    "model",
    "logger",
    "trainer",
    "section",
    "package",
    "exporter",
    "loader",
)


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

    def loss(self, name: str, factory: Callable[..., Any], config: type | None = None) -> None:
        """A distillation loss: ``factory(config)`` returns a callable computing the loss."""
        self._add("loss", name, factory, config)

    def metric(self, name: str, factory: Callable[..., Any], config: type | None = None) -> None:
        """A quality metric scored on the student's translations."""
        self._add("metric", name, factory, config)

    def detector(self, name: str, factory: Callable[..., Any], config: type | None = None) -> None:
        """A degradation detector deciding on rollbacks."""
        self._add("detector", name, factory, config)

    def quantizer(self, name: str, factory: Callable[..., Any], config: type | None = None) -> None:
        """A quantization backend."""
        self._add("quantizer", name, factory, config)

    def reporter(self, name: str, factory: Callable[..., Any], config: type | None = None) -> None:
        """A report writer run at finalize."""
        self._add("reporter", name, factory, config)

    def corpus(self, name: str, factory: Callable[..., Any], config: type | None = None) -> None:
        """A parallel-corpus source."""
        self._add("corpus", name, factory, config)

    def model(self, name: str, factory: Callable[..., Any], config: type | None = None) -> None:
        """A model architecture."""
        self._add("model", name, factory, config)

    def logger(self, name: str, factory: Callable[..., Any], config: type | None = None) -> None:
        """A metrics logger (JSONL, TensorBoard, ...)."""
        self._add("logger", name, factory, config)

    def trainer(self, name: str, factory: Callable[..., Any], config: type | None = None) -> None:
        """A trainer: builds models and data at run start and performs the step."""
        self._add("trainer", name, factory, config)

    def exporter(self, name: str, factory: Callable[..., Any], config: type | None = None) -> None:
        """An export format (``cvmkd export --format NAME``, ``[[exports]]``): ``factory(config)``
        returns an object with ``export(package, out, quantization=None) -> dict``,
        ``recognizes(folder) -> bool`` and ``translator(folder, device)`` for ``cvmkd translate``."""
        self._add("exporter", name, factory, config)

    def loader(self, name: str, factory: Callable[..., Any]) -> None:
        """A model format read from a folder (a Hugging Face ``save_pretrained`` folder, say):
        ``factory()`` returns an object with ``recognizes(folder) -> bool`` and
        ``load(folder, device) -> (model, tokenizer, metadata)``; wherever a model package is
        accepted (``[teacher] checkpoint``, ``cvmkd translate --model``) such a folder is too."""
        self._add("loader", name, factory, None)

    def package(self, name: str, path: str | Path) -> None:
        """A model shipped with the plugin (a pre-trained teacher): a folder accepted by name
        wherever a model folder is (``[teacher] checkpoint = "bible-fr-en"``)."""
        folder = Path(path)
        self._add("package", name, lambda: folder, None)

    def section(self, name: str, config: type) -> None:
        """A top-level recipe table this plugin owns (``[teacher]``, ``[tokenizer]``): structured
        by ``config``, an attrs class whose fields all have defaults; read it with
        ``recipe.section(name)``."""
        self._add("section", name, config, config)
