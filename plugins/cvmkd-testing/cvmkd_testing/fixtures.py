"""pytest fixtures for cvmkd and its plugins, loaded through the ``pytest11`` entry point of the
``cvmkd-testing`` distribution: a test anywhere asks for them by name."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from cvmkd_core.plugins import Plugins
from cvmkd_testing import TOY_HOOK_FILE, toy_plugin_manager


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
    """Built-ins, validation and test evaluation, and the toy trainer and metric; no other entry
    points, so installed plugins don't interfere."""
    return toy_plugin_manager()


@pytest.fixture
def toy_hook_file(write: Callable[[str, str], Path]) -> Path:
    return write("toy_hooks.py", TOY_HOOK_FILE)
