"""The plugin manager: built-ins, entry points, hook files, registration rules, env switches."""

from __future__ import annotations

import types
from typing import Any

import pytest

from cvmkd_core import hookimpl
from cvmkd_core.errors import ComponentError, PluginLoadError
from cvmkd_core.plugins import DEFAULT_PLUGINS, build_plugins
from cvmkd_testing import ExactMatch


class OneDetector:
    def __init__(self, name: str = "same") -> None:
        self.name = name

    @hookimpl
    def cvmkd_register(self, register: Any) -> None:
        register.detector(self.name, ExactMatch)


def test_builtins_are_plugins_like_any_other() -> None:
    plugins = build_plugins(entry_points=False)
    described = {p["name"]: p for p in plugins.describe()}
    for name, module in DEFAULT_PLUGINS:
        assert described[name]["source"] == "builtin"
        assert described[name]["module"] == module
        assert described[name]["distribution"] == "cvmkd"
    assert {"kind": "logger", "name": "jsonl"}.items() <= described["cvmkd.jsonl"]["components"][0].items()
    assert "cvmkd.validation" not in described  # validation is a plugin distribution now


def test_a_plugin_registered_for_one_test_and_unregistered_after() -> None:
    plugins = build_plugins(entry_points=False)
    plugins.add_plugin(OneDetector(), name="one", source="test")
    try:
        assert plugins.registry.get("detector", "same").plugin == "one"
        assert any(p["name"] == "one" for p in plugins.describe())
    finally:
        plugins.remove_plugin("one")
    assert plugins.pm.get_plugin("one") is None
    assert all(p["name"] != "one" for p in plugins.describe())


def test_a_duplicate_component_name_names_both_plugins() -> None:
    plugins = build_plugins(entry_points=False)
    plugins.add_plugin(OneDetector(), name="first", source="test")
    with pytest.raises(
        ComponentError, match="detector 'same' is registered twice: by plugin 'first' and by plugin 'second'"
    ):
        plugins.add_plugin(OneDetector(), name="second", source="test")


def test_an_unknown_component_lists_the_available_ones() -> None:
    plugins = build_plugins(entry_points=False)
    plugins.add_plugin(OneDetector("zeta"), name="z", source="test")
    plugins.add_plugin(OneDetector("alpha"), name="a", source="test")
    with pytest.raises(ComponentError, match=r"unknown detector 'beta'; available: alpha, zeta"):
        plugins.registry.get("detector", "beta")


def test_a_misspelt_hook_fails_at_start(write) -> None:
    path = write(
        "typo.py",
        """
        from cvmkd_core import hookimpl

        @hookimpl
        def cvmkd_stpe_end(state, result):
            pass
        """,
    )
    with pytest.raises(
        PluginLoadError,
        match=r"plugin file:.*typo.py: unknown hook 'cvmkd_stpe_end' \(a misspelt name\?\); hooks are listed in docs/hooks.md$",
    ):
        build_plugins([path], entry_points=False)


def test_a_hook_with_an_unknown_argument_is_refused(write) -> None:
    path = write(
        "badarg.py",
        """
        from cvmkd_core import hookimpl

        @hookimpl
        def cvmkd_step_end(state, reslt):
            pass
        """,
    )
    with pytest.raises(
        PluginLoadError,
        match=r"badarg.py: hook cvmkd_step_end\(\) declares .reslt., which the hook does not provide; it provides: state, result$",
    ):
        build_plugins([path], entry_points=False)


def test_hook_file_errors(write, tmp_path) -> None:
    with pytest.raises(PluginLoadError, match="no such hook file: .*missing.py"):
        build_plugins([tmp_path / "missing.py"], entry_points=False)
    broken = write("broken.py", "import no_such_module_here\n")
    with pytest.raises(PluginLoadError, match=r"hook file .*broken.py failed to import: ModuleNotFoundError"):
        build_plugins([broken], entry_points=False)


def test_a_hook_file_may_register_components(write) -> None:
    path = write(
        "mine.py",
        """
        from cvmkd_core import hookimpl
        from cvmkd_testing import ExactMatch

        @hookimpl
        def cvmkd_register(register):
            register.detector("mine", ExactMatch)
        """,
    )
    plugins = build_plugins([path], entry_points=False)
    assert plugins.registry.get("detector", "mine").plugin.endswith("mine.py")


# --- entry points -------------------------------------------------------------------------------


class FakeEntryPoint:
    def __init__(self, name: str, dist: str, version: str, obj: Any = None, error: Exception | None = None) -> None:
        self.name, self.value = name, f"{dist.replace('-', '_')}:plugin"
        self.dist = types.SimpleNamespace(name=dist, version=version)
        self._obj, self._error = obj, error

    def load(self) -> Any:
        if self._error is not None:
            raise self._error
        return self._obj


@pytest.fixture
def fake_entry_points(monkeypatch: pytest.MonkeyPatch):
    points: list[FakeEntryPoint] = []
    monkeypatch.setattr(
        "cvmkd_core.plugins.importlib.metadata.entry_points",
        lambda group: [p for p in points if group == "cvmkd"],
    )
    return points


def test_entry_point_plugins_are_loaded_with_their_distribution(fake_entry_points) -> None:
    fake_entry_points.append(FakeEntryPoint("good", "cvmkd-good", "1.2.3", obj=OneDetector("good")))
    plugins = build_plugins()
    info = plugins.infos["good"]
    assert (info.source, info.distribution, info.version) == ("entrypoint", "cvmkd-good", "1.2.3")
    assert plugins.registry.get("detector", "good").plugin == "good"


def test_a_plugin_that_fails_to_import_is_reported_with_its_distribution(fake_entry_points) -> None:
    fake_entry_points.append(
        FakeEntryPoint("bad", "cvmkd-bad", "0.4.0", error=ImportError("no module named 'sacrebleu'"))
    )
    with pytest.warns(UserWarning, match=r"cvmkd plugin bad \(cvmkd-bad 0.4.0\) failed to load: ImportError"):
        plugins = build_plugins()
    (described,) = [p for p in plugins.describe() if p["name"] == "bad"]
    assert described["error"] == "ImportError: no module named 'sacrebleu'"
    # once a recipe needs a component, the failure is part of the error
    with pytest.raises(ComponentError, match=r"unknown metric 'bleu'.*failed to load: bad \(cvmkd-bad 0.4.0\)"):
        plugins.registry.get("metric", "bleu")


def test_autoload_can_be_disabled_and_plugins_blocked(fake_entry_points, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points.append(FakeEntryPoint("one", "cvmkd-one", "1.0", obj=OneDetector("one")))
    fake_entry_points.append(FakeEntryPoint("two", "cvmkd-two", "1.0", obj=OneDetector("two")))
    monkeypatch.setenv("CVMKD_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert {"one", "two"}.isdisjoint(build_plugins().infos)
    monkeypatch.setenv("CVMKD_PLUGINS", "cvmkd-two")
    assert "two" in build_plugins().infos and "one" not in build_plugins().infos
    monkeypatch.delenv("CVMKD_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.delenv("CVMKD_PLUGINS")
    monkeypatch.setenv("CVMKD_BLOCK_PLUGINS", "one, cvmkd.jsonl")
    infos = build_plugins().infos
    assert "one" not in infos and "two" in infos
    assert "cvmkd.jsonl" not in infos  # a built-in can be blocked like any other


def test_a_plugin_declares_a_hook_of_its_own_that_others_implement(write) -> None:
    # the declaring plugin: its spec module, cvmkd_addhooks, and the phase it runs at finalize
    write(
        "greeting_specs.py",
        """
        from cvmkd_core.hookspecs import hookspec

        @hookspec
        def greeting_said(text):
            "Someone said hello."
        """,
    )
    declarer = write(
        "greeter.py",
        """
        import sys
        sys.path.insert(0, __file__.rsplit("/", 1)[0])
        import greeting_specs
        from cvmkd_core import hookimpl
        from cvmkd_core.plugins import add_hookspecs

        @hookimpl
        def cvmkd_addhooks(pluginmanager):
            add_hookspecs(pluginmanager, greeting_specs)
            add_hookspecs(pluginmanager, greeting_specs)  # a second declaration changes nothing
        """,
    )
    heard: list[str] = []
    listener = types.SimpleNamespace(greeting_said=hookimpl(lambda text: heard.append(text)))
    plugins = build_plugins([declarer], entry_points=False)
    plugins.add_plugin(listener, name="listener", source="test")
    plugins.check_pending()
    plugins.pm.hook.greeting_said(text="hello")
    assert heard == ["hello"]
    # without the declaring plugin, implementing the hook is a misspelt name like any other
    bare = build_plugins(entry_points=False)
    bare.add_plugin(types.SimpleNamespace(greeting_said=hookimpl(lambda text: None)), name="lost", source="test")
    with pytest.raises(PluginLoadError, match="plugin lost: unknown hook 'greeting_said'"):
        bare.check_pending()


def test_every_kind_is_listed_once_and_plugins_declare_their_own() -> None:
    from cvmkd_core.recipe import component_ref
    from cvmkd_core.registry import KINDS, Registrar, Registry

    registry = Registry()
    register = Registrar(registry, "kinds")
    plain = [k for k in KINDS if k not in ("section", "slot")]
    for kind in plain:
        getattr(register, kind)(f"a-{kind}", ExactMatch)
        assert component_ref(kind).kind == kind and component_ref(kind) is component_ref(kind)
    # a component of a kind a plugin declares later waits for it; plugins load in any order
    register.component("metric", "another", ExactMatch)
    register.slot("checks", "metric", many=True)
    assert registry.names("metric") == []
    assert registry.undeclared() == {
        "kinds": "registered metric 'another' of component kind 'metric', which no "
        "loaded plugin declares (kinds: trainer, detector, reporter, logger, section, slot)"
    }
    Registrar(registry, "owner").kind("metric", "a quality metric")
    register.metric("a-metric", ExactMatch)
    assert registry.names("metric") == ["a-metric", "another"] and registry.undeclared() == {}
    assert sorted(c.kind for c in registry.all()) == sorted([*plain, "metric", "metric", "slot"])
    assert registry.kinds["metric"] == ("a quality metric", "owner")
    with pytest.raises(ComponentError, match="component kind 'metric' is declared twice: by 'owner' and by 'kinds'"):
        register.kind("metric", "again")
    # a misspelt kind is named once every plugin has registered
    register.metrics("x", ExactMatch)
    assert "registered metrics 'x' of component kind 'metrics'" in registry.undeclared()["kinds"]


def test_a_component_of_a_kind_no_loaded_plugin_declares_is_a_warning_then_an_error(write) -> None:
    path = write(
        "orphan.py",
        """
        from cvmkd_core import hookimpl
        from cvmkd_testing import ExactMatch

        @hookimpl
        def cvmkd_register(register):
            register.metric("mine", ExactMatch)
        """,
    )
    with pytest.warns(UserWarning, match=r"orphan.py registered metric 'mine' of component kind 'metric', which no"):
        plugins = build_plugins([path], entry_points=False)
    with pytest.raises(ComponentError, match=r"unknown metric 'mine'; available: none; plugins that failed to load: "):
        plugins.registry.get("metric", "mine")
    # the plugin that owns the kind, added later, takes the component in
    plugins.add_plugin(
        types.SimpleNamespace(cvmkd_register=hookimpl(lambda register: register.kind("metric", "m"))),
        name="owner",
        source="test",
    )
    assert plugins.registry.get("metric", "mine").plugin.endswith("orphan.py")
    assert plugins.registry.load_failures == {}
