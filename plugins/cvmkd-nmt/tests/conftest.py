"""Every run writes its runs/ folder inside the test's temporary directory. The shared fixtures
come from the cvmkd-testing pytest plugin."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
