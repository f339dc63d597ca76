"""Build the plugin manager: built-ins, then the ``cvmkd`` entry points, then hook files.

Environment switches (in the spirit of pytest and llm):

- ``CVMKD_DISABLE_PLUGIN_AUTOLOAD=1``: load no entry-point plugins, except those named in
  ``CVMKD_PLUGINS`` (comma-separated entry-point or distribution names);
- ``CVMKD_BLOCK_PLUGINS=a,b``: never load these plugins (entry-point or distribution names;
  built-ins can be blocked by their name too, ``cvmkd.jsonl`` for example).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import types
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import attrs
import pluggy

from cvmkd_core import hookspecs
from cvmkd_core.errors import CvmkdError, PluginLoadError
from cvmkd_core.registry import Registrar, Registry

ENTRY_POINT_GROUP = "cvmkd"
ENV_DISABLE_AUTOLOAD = "CVMKD_DISABLE_PLUGIN_AUTOLOAD"
ENV_PLUGINS = "CVMKD_PLUGINS"
ENV_BLOCK = "CVMKD_BLOCK_PLUGINS"

#: The core's own plugins, registered exactly like third-party ones, in this order.
DEFAULT_PLUGINS: tuple[tuple[str, str], ...] = (("cvmkd.jsonl", "cvmkd_core.builtins.jsonl_logger"),)


@attrs.define
class PluginInfo:
    """One plugin the manager knows about, loaded or not."""

    name: str
    source: str  # builtin | entrypoint | file | component
    module: str = ""
    distribution: str | None = None
    version: str | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        if self.distribution:
            return f"{self.name} ({self.distribution} {self.version})"
        return self.name


def _split_env(name: str) -> set[str]:
    return {part.strip() for part in os.environ.get(name, "").split(",") if part.strip()}


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


class Plugins:
    """The plugin manager, the component registry, and what was loaded from where."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        # every plugin, as it is registered, may declare hooks of its own
        self.pm.hook.cvmkd_addhooks.call_historic(kwargs={"pluginmanager": self.pm})
        self.registry = Registry()
        self.infos: dict[str, PluginInfo] = {}
        self._blocked = _split_env(ENV_BLOCK)
        self._undeclared: set[str] = set()
        #: how this manager was built, so :meth:`fresh` can build another like it
        self.hook_files: list[Path] = []
        self.entry_points = True
        self.extra: list[tuple[str, Any]] = []

    # --- loading --------------------------------------------------------------------------------

    def _register(self, plugin: Any, info: PluginInfo) -> None:
        try:
            self.pm.register(plugin, name=info.name)
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(f"plugin {info.label}: {_explain(self.pm, plugin, exc)}") from None
        except ValueError as exc:  # the same name registered twice
            raise PluginLoadError(f"plugin {info.label}: {exc}") from None
        self.infos[info.name] = info

    def load_builtins(self) -> None:
        for name, module_name in DEFAULT_PLUGINS:
            if name in self._blocked:
                continue
            module = importlib.import_module(module_name)
            from cvmkd_core import __version__

            info = PluginInfo(
                name=name, source="builtin", module=module_name, distribution="cvmkd", version=__version__
            )
            self._register(module, info)

    def load_entry_points(self) -> None:
        only = _split_env(ENV_PLUGINS)
        autoload = not _truthy(ENV_DISABLE_AUTOLOAD)
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            names = {ep.name, dist} - {None}
            if names & self._blocked:
                continue
            if not autoload and not names & only:
                continue
            if ep.name in self.infos:
                continue  # the same distribution seen twice on sys.path
            info = PluginInfo(name=ep.name, source="entrypoint", module=ep.value, distribution=dist, version=version)
            try:
                plugin = ep.load()
            except Exception as exc:  # reported, and an error once the recipe needs it
                info.error = f"{type(exc).__name__}: {exc}"
                self.infos[ep.name] = info
                self.registry.load_failures[info.label] = info.error
                warnings.warn(f"cvmkd plugin {info.label} failed to load: {info.error}", stacklevel=2)
                continue
            self._register(plugin, info)

    def load_hook_file(self, path: str | Path) -> None:
        """Load a Python file of ``@hookimpl`` functions as a plugin (``--plugin FILE``)."""
        path = Path(path)
        if not path.is_file():
            raise PluginLoadError(f"no such hook file: {path}")
        name = f"file:{path.resolve()}"
        if name in self.infos:
            return
        module_name = f"cvmkd_hookfile_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise PluginLoadError(f"hook file {path}: not a Python module")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[module_name]
            raise PluginLoadError(f"hook file {path} failed to import: {type(exc).__name__}: {exc}") from None
        self._register(module, PluginInfo(name=name, source="file", module=str(path)))
        self._call_register(name, module)

    def check_pending(self) -> None:
        """A hook implementation that matches no hook (a misspelt name), or a component of a
        kind no loaded plugin declares is a warning, and an error once a recipe names it."""
        self._warn_undeclared()
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            plugin_name = self.pm.get_name(exc.plugin) or repr(exc.plugin)
            info = self.infos.get(plugin_name)
            label = info.label if info else plugin_name
            raise PluginLoadError(f"plugin {label}: {_explain(self.pm, exc.plugin, exc)}") from None

    # --- registration ---------------------------------------------------------------------------

    def _call_register(self, name: str, plugin: Any) -> None:
        impls = [i for i in self.pm.hook.cvmkd_register.get_hookimpls() if i.plugin is plugin]
        if not impls:
            return
        (impl,) = impls
        kwargs = {"register": Registrar(self.registry, name)}
        try:
            impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
        except CvmkdError:
            raise
        except Exception as exc:
            info = self.infos.get(name)
            raise PluginLoadError(
                f"plugin {info.label if info else name}: cvmkd_register failed: {type(exc).__name__}: {exc}"
            ) from None

    def register_components(self) -> None:
        for name, plugin in list(self.pm.list_name_plugin()):
            self._call_register(name, plugin)

    def add_plugin(self, plugin: Any, name: str, source: str = "component") -> None:
        """Register a plugin object after start-up (component instances, tests); its components
        are registered too. Plugins added from outside a run (``source != "component"``) are
        carried over by :meth:`fresh`."""
        self._register(
            plugin,
            PluginInfo(
                name=name,
                source=source,
                module=plugin.__name__ if isinstance(plugin, types.ModuleType) else type(plugin).__module__,
            ),
        )
        if source != "component":
            self.extra.append((name, plugin))
        self._call_register(name, plugin)
        self._warn_undeclared()

    def _warn_undeclared(self) -> None:
        problems = {}
        for plugin, problem in self.registry.undeclared().items():
            info = self.infos.get(plugin)
            problems[info.label if info else plugin] = problem
        for label in self._undeclared - set(problems):  # a plugin added since declared the kind
            self.registry.load_failures.pop(label, None)
        for label, problem in problems.items():
            if self.registry.load_failures.get(label) != problem:
                self.registry.load_failures[label] = problem
                warnings.warn(f"cvmkd plugin {label} {problem}", stacklevel=2)
        self._undeclared = set(problems)

    def fresh(self) -> Plugins:
        """A new manager with the same plugins and none of this run's component instances
        (used to run a stage, a run inside the run, through the same hooks)."""
        other = build_plugins(self.hook_files, entry_points=self.entry_points)
        for name, plugin in self.extra:
            other.add_plugin(plugin, name=name, source="extra")
        return other

    def remove_plugin(self, name: str) -> None:
        plugin = self.pm.get_plugin(name)
        if plugin is not None:
            self.pm.unregister(plugin)
        self.infos.pop(name, None)
        self.extra = [(n, p) for n, p in self.extra if n != name]

    # --- description ----------------------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """Every plugin: name, version, hooks implemented, components registered (``cvmkd plugins``)."""
        out = []
        for name, info in self.infos.items():
            plugin = self.pm.get_plugin(name)
            hooks = sorted(c.name for c in self.pm.get_hookcallers(plugin) or []) if plugin is not None else []
            out.append(
                {
                    "name": name,
                    "source": info.source,
                    "module": info.module,
                    "distribution": info.distribution,
                    "version": info.version,
                    "hooks": hooks,
                    "components": [
                        {"kind": c.kind, "name": c.name, "description": c.description}
                        for c in self.registry.by_plugin(name)
                    ],
                    "error": info.error,
                }
            )
        return out


def add_hookspecs(pm: pluggy.PluginManager, module: Any) -> None:
    """Declare ``module``'s hooks once, however many plugins of one distribution ask for it in
    their ``cvmkd_addhooks``."""
    caller = getattr(pm.hook, next(n for n in dir(module) if pm.parse_hookspec_opts(module, n)), None)
    if caller is None or caller.spec is None:
        pm.add_hookspecs(module)


def _explain(pm: pluggy.PluginManager, plugin: Any, exc: pluggy.PluginValidationError) -> str:
    """pluggy's validation messages span several lines; say the same in one."""
    for attr in dir(plugin):
        if not attr.startswith("cvmkd_"):
            continue
        function = getattr(plugin, attr, None)
        if function is None or getattr(function, "cvmkd_impl", None) is None:
            continue
        caller = getattr(pm.hook, attr, None)
        if caller is None or caller.spec is None:
            return f"unknown hook {attr!r} (a misspelt name?); hooks are listed in docs/hooks.md"
        accepted = list(inspect.signature(caller.spec.function).parameters)
        given = list(inspect.signature(function).parameters)
        extra = [a for a in given if a not in accepted]
        if extra:
            return (
                f"hook {attr}() declares {', '.join(repr(a) for a in extra)}, which the hook does not "
                f"provide; it provides: {', '.join(accepted)}"
            )
    return " ".join(str(exc).split())


def build_plugins(hook_files: Iterable[str | Path] = (), *, entry_points: bool = True) -> Plugins:
    """Built-ins, then entry points, then hook files; then check_pending and registration."""
    plugins = Plugins()
    plugins.hook_files = [Path(p) for p in hook_files]
    plugins.entry_points = entry_points
    plugins.load_builtins()
    if entry_points:
        plugins.load_entry_points()
    plugins.register_components()
    for path in hook_files:
        plugins.load_hook_file(path)
    plugins.check_pending()
    return plugins
