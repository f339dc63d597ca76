"""The third-party template, plugins/cvmkd-example-metric, works as its README says: installed,
its own tests pass, `cvmkd plugins` lists it, and a recipe that names its metric records it.

The template is not installed by ``./dev setup`` and its tests are excluded from the default
collection (the repository's conftest.py). Here it is installed into a temporary folder, never
into the environment running the tests, and used through ``PYTHONPATH``: a ``pip install
--target`` folder holds the ``.dist-info`` with the entry point, which importlib.metadata finds
on ``sys.path`` like any installed distribution.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cvmkd_testing import TOY_RECIPE

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "plugins" / "cvmkd-example-metric"


def _distributions() -> set[str]:
    """The distributions installed in the environment running this test."""
    return {d.metadata["Name"] for d in importlib.metadata.distributions()}


def _install_template(tmp_path: Path) -> dict[str, str]:
    """Install the template into tmp_path/site; return an environment that sees it."""
    # Build from a copy: pip builds in the source folder and would leave build/ and *.egg-info
    # in plugins/cvmkd-example-metric.
    source = tmp_path / "src"
    shutil.copytree(TEMPLATE, source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--disable-pip-version-check",
            "-q",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(source),
        ],
        check=True,
    )
    assert (site / "cvmkd_example_metric-0.1.0.dist-info" / "entry_points.txt").is_file()
    env = {k: v for k, v in os.environ.items() if k not in ("CVMKD_DISABLE_PLUGIN_AUTOLOAD", "CVMKD_BLOCK_PLUGINS")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


@pytest.mark.slow
def test_the_template_installs_passes_its_tests_and_scores_in_a_run(tmp_path: Path, write, toy_hook_file) -> None:
    before = _distributions()
    env = _install_template(tmp_path)
    python = [sys.executable]

    # The package imported is the one in the temporary folder, not the source in the repository.
    where = subprocess.run(
        [*python, "-c", "import cvmkd_example_metric as m; print(m.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=tmp_path,
    )
    assert Path(where.stdout.strip()).is_relative_to(tmp_path / "site")

    # (a) The template's own tests, as its author runs them. Named explicitly, they are collected
    # despite the conftest.py exclusion.
    tests = subprocess.run(
        [*python, "-m", "pytest", "plugins/cvmkd-example-metric/tests", "-p", "no:cacheprovider", "-q"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr
    assert " passed" in tests.stdout and "failed" not in tests.stdout

    # (b) `cvmkd plugins --json` lists it, with its distribution and metric.
    cvmkd = [*python, "-m", "cvmkd_core.cli"]
    quiet = {**env, "PYTHONWARNINGS": "ignore"}
    listed = subprocess.run(
        [*cvmkd, "plugins", "--json"], capture_output=True, text=True, check=True, env=quiet, cwd=tmp_path
    )
    (plugin,) = [p for p in json.loads(listed.stdout) if p["name"] == "example-metric"]
    assert (plugin["source"], plugin["distribution"], plugin["version"], plugin["error"]) == (
        "entrypoint",
        "cvmkd-example-metric",
        "0.1.0",
        None,
    )
    assert [(c["kind"], c["name"]) for c in plugin["components"]] == [("metric", "exact_match")]

    # (c) A toy run naming both the toy's `exact` and the template's `exact_match`. Both are the
    # percentage of translations equal to their reference; the toy trainer's translations are
    # the references themselves or "garbage", so they must agree. The learning rate is set so
    # that the first validation (step 3) sees garbage and the second (step 6) exact output.
    recipe = write(
        "r.toml",
        TOY_RECIPE.replace('metrics = ["exact"]', 'metrics = ["exact", "exact_match"]').replace(
            '[distill]\nname = "toy"\n', '[distill]\nname = "toy"\nlearning_rate = 0.2\n'
        ),
    )
    assert 'metrics = ["exact", "exact_match"]' in recipe.read_text() and "learning_rate = 0.2" in recipe.read_text()
    done = subprocess.run(
        [*cvmkd, "run", str(recipe), "--plugin", str(toy_hook_file), "--quiet"],
        capture_output=True,
        text=True,
        env=quiet,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (tmp_path / "runs/toy/validation/history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    for record in records:
        assert record["scores"]["exact_match"] == pytest.approx(record["scores"]["exact"])
    assert [r["scores"]["exact_match"] for r in records] == [0.0, 100.0]

    # Nothing was installed into (or removed from) the environment running the tests.
    assert _distributions() == before
