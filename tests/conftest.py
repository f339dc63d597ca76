"""Shared fixtures: tiny recipes and a plugin manager with the toy trainer."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Callable

import pytest

from cvmkd_core.plugins import Plugins, build_plugins
from cvmkd_core.testing import TOY_HOOK_FILE, ToyPlugin

@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a dedented text file under tmp_path and return its path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return _write


@pytest.fixture
def toy_plugins() -> Plugins:
    """Built-ins plus the toy trainer and metric; no entry points, so installed plugins don't interfere."""
    plugins = build_plugins(entry_points=False)
    plugins.add_plugin(ToyPlugin(), name="toy", source="test")
    return plugins


@pytest.fixture
def toy_hook_file(write: Callable[[str, str], Path]) -> Path:
    return write("toy_hooks.py", TOY_HOOK_FILE)


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs write their runs/ folder inside the test's temporary directory."""
    monkeypatch.chdir(tmp_path)
