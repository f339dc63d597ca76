"""Progress during ``cvmkd run``: a bar on a terminal, plain lines otherwise, and with ``--quiet``
the progress lines are all the info that is printed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cvmkd_core.plugins import Plugins
from cvmkd_core.recipe import load_recipe
from cvmkd_core.session import Session, run_session
from cvmkd_monitor import progress
from cvmkd_testing import TOY_RECIPE


@pytest.fixture(autouse=True)
def _reset_mode(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(progress.ENV_MODE, raising=False)  # restored after the test
    yield


@pytest.fixture
def toy_plugins(toy_plugins: Plugins) -> Plugins:
    """The toy plugins, and the progress display under test."""
    toy_plugins.add_plugin(progress, name="progress", source="test")
    return toy_plugins


def _cvmkd(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cvmkd_core.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_without_a_terminal_progress_is_plain_lines(write: Callable[[str, str], Path], toy_hook_file: Path) -> None:
    recipe = write("recipe.toml", TOY_RECIPE)
    done = _cvmkd("run", str(recipe), "--plugin", str(toy_hook_file), cwd=recipe.parent)
    assert done.returncode == 0, done.stderr
    assert "INFO toy step 6/6  loss " in done.stderr and " left" in done.stderr
    assert "INFO validation step 3" in done.stderr  # the other info lines are there too
    assert "|" not in done.stderr  # no bar drawn into a log


def test_quiet_keeps_only_the_progress_lines(write: Callable[[str, str], Path], toy_hook_file: Path) -> None:
    recipe = write("recipe.toml", TOY_RECIPE)
    done = _cvmkd("run", str(recipe), "--plugin", str(toy_hook_file), "--quiet", cwd=recipe.parent)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines and all(" toy step " in line for line in lines), lines
    assert lines[-1].split(" INFO ")[1].startswith("toy step 6/6")


def test_on_a_terminal_a_bar_shows_step_loss_and_the_last_composite(
    write: Callable[[str, str], Path],
    toy_plugins: Plugins,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(progress, "_use_bar", lambda: True)
    path = write("recipe.toml", TOY_RECIPE + "\ncomposite = {exact = 1.0}\n")
    recipe = load_recipe(path, registry=toy_plugins.registry)
    summary, _ = run_session(Session(recipe=recipe, plugins=toy_plugins, recipe_path=path))
    assert summary.status == "completed"
    err = capsys.readouterr().err
    assert "toy: 100%" in err and "6/6" in err and "loss=" in err and "composite=" in err
    assert progress._progress.bar is None  # closed at the end of the run


def test_lines_mode_never_draws_a_bar(
    write: Callable[[str, str], Path],
    toy_plugins: Plugins,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    progress.set_mode("lines")
    path = write("recipe.toml", TOY_RECIPE)
    recipe = load_recipe(path, registry=toy_plugins.registry)
    run_session(Session(recipe=recipe, plugins=toy_plugins, recipe_path=path))
    assert "%|" not in capsys.readouterr().err
