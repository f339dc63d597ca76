"""The core's tests: every run writes its runs/ folder inside the test's temporary directory.
The shared fixtures (write, toy_plugins, toy_hook_file...) come from the cvmkd-testing pytest
plugin."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs write their runs/ folder inside the test's temporary directory."""
    monkeypatch.chdir(tmp_path)
