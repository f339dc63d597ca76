"""The command line, as a user meets it: exit statuses, one-line errors, nothing written on error."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cvmkd_core.cli import main
from cvmkd_testing import TOY_HOOK_FILE, TOY_RECIPE

CUSTOM_HOOK = """
from cvmkd_core import hookimpl

@hookimpl
def cvmkd_step_end(state, result):
    with open("custom-hook.log", "a") as log:
        log.write(f"step {state.step} loss {result.loss:.4f}\\n")
"""


@pytest.fixture(autouse=True)
def _only_builtins(monkeypatch: pytest.MonkeyPatch) -> None:
    """The core's CLI behaviour with the validation plugin (the toy runs validate), whatever
    else this environment has installed."""
    monkeypatch.setenv("CVMKD_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("CVMKD_PLUGINS", "validation,analysis,evaluation")


def _cli(*args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def test_check_accepts_a_correct_recipe(write, toy_hook_file, capsys) -> None:
    recipe = write("r.toml", TOY_RECIPE)
    status, out, err = _cli("check", str(recipe), "--plugin", str(toy_hook_file), capsys=capsys)
    assert status == 0, err
    assert out.startswith(f"ok: {recipe}: 3 components (distill=toy, loggers[0]=jsonl, validation.metrics[0]=exact)")
    assert not Path("runs").exists()


def test_check_prints_one_line_per_mistake_and_exits_2(write, toy_hook_file, capsys) -> None:
    recipe = write(
        "bad.toml",
        """
        [run]
        steps = -5
        precison = "bf16"
        [validation]
        metrics = ["exact", "blue"]
        """,
    )
    status, out, err = _cli("check", str(recipe), "--plugin", str(toy_hook_file), capsys=capsys)
    assert status == 2
    assert out == ""
    assert err.splitlines() == [
        f"error: {recipe}: run.steps: must be > 0, got -5",
        f"error: {recipe}: run: unknown key 'precison'; known keys: cache_dir, device, hook_files, keep_checkpoints, "
        "log_every, name, output_dir, precision, seed, steps, validate_every",
        f"error: {recipe}: validation.metrics[1]: unknown metric 'blue'; available: exact",
    ]


def test_run_with_a_bad_recipe_writes_nothing(write, toy_hook_file, capsys) -> None:
    recipe = write("bad.toml", TOY_RECIPE + "\n[guard]\nname = 'nope'\n")
    status, _, err = _cli("run", str(recipe), "--plugin", str(toy_hook_file), capsys=capsys)
    assert status == 2
    assert err.startswith(f"error: {recipe}: guard: unknown detector 'nope'; available: none")
    assert not Path("runs").exists()


def test_a_custom_hook_file_is_called_during_a_run(write, toy_hook_file, capsys) -> None:
    recipe = write("r.toml", TOY_RECIPE)
    hook = write("my_hooks.py", CUSTOM_HOOK)
    status, out, err = _cli(
        "run", str(recipe), "--plugin", str(toy_hook_file), "--plugin", str(hook), "--set", "run.steps=4", capsys=capsys
    )
    assert status == 0, err
    assert out.strip() == "completed: runs/toy"
    lines = Path("custom-hook.log").read_text().splitlines()
    assert [line.split()[1] for line in lines] == ["1", "2", "3", "4"]


def test_hook_files_named_in_the_recipe_are_relative_to_it(write, capsys) -> None:
    write("recipes/hooks/toy_hooks.py", TOY_HOOK_FILE)
    recipe = write(
        "recipes/r.toml", TOY_RECIPE.replace('name = "toy"\n', 'name = "toy"\nhook_files = ["hooks/toy_hooks.py"]\n', 1)
    )
    status, _, err = _cli("run", str(recipe), "--run-dir", "elsewhere", capsys=capsys)
    assert status == 0, err
    assert (Path("elsewhere") / "train.jsonl").is_file()


def test_an_existing_run_directory_is_refused_with_exit_2(write, toy_hook_file, capsys) -> None:
    recipe = write("r.toml", TOY_RECIPE)
    assert _cli("run", str(recipe), "--plugin", str(toy_hook_file), capsys=capsys)[0] == 0
    before = Path("runs/toy/train.jsonl").read_bytes()
    status, _, err = _cli("run", str(recipe), "--plugin", str(toy_hook_file), capsys=capsys)
    assert status == 2
    assert err.strip() == (
        "error: run directory runs/toy exists already; choose another run.name or --run-dir, "
        "or pass --resume to continue that run"
    )
    assert Path("runs/toy/train.jsonl").read_bytes() == before


def test_an_unwritable_run_directory_is_an_error(write, toy_hook_file, capsys, tmp_path) -> None:
    recipe = write("r.toml", TOY_RECIPE)
    Path("blocked").write_text("a file where a folder should be")
    status, _, err = _cli("run", str(recipe), "--plugin", str(toy_hook_file), "--run-dir", "blocked/run", capsys=capsys)
    assert status == 2
    assert err.startswith("error: cannot write run directory blocked/run:")


def test_plugin_errors_are_one_line_and_debug_shows_the_traceback(write, capsys) -> None:
    recipe = write("r.toml", TOY_RECIPE)
    status, _, err = _cli("check", str(recipe), "--plugin", "nope.py", capsys=capsys)
    assert (status, err) == (2, "error: no such hook file: nope.py\n")
    status, _, err = _cli("check", str(recipe), "--plugin", "nope.py", "--debug", capsys=capsys)
    assert status == 2
    assert "Traceback (most recent call last)" in err
    assert err.rstrip().endswith("error: no such hook file: nope.py")


def test_a_plugin_raising_during_the_run_is_one_line(write, toy_hook_file, capsys) -> None:
    recipe = write("r.toml", TOY_RECIPE)
    hook = write(
        "raiser.py",
        "from cvmkd_core import hookimpl\n@hookimpl\ndef cvmkd_step_end(state):\n    raise ValueError('boom')\n",
    )
    status, _, err = _cli("run", str(recipe), "--plugin", str(toy_hook_file), "--plugin", str(hook), capsys=capsys)
    assert status == 1
    (line,) = err.splitlines()
    assert line == f"error: cvmkd_step_end in {hook}:4 raised ValueError: boom; rerun with --debug for the traceback"
    assert json.loads(Path("runs/toy/summary.json").read_text())["status"] == "failed"


def test_plugins_lists_builtins_in_text_and_json(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CVMKD_PLUGINS", "validation,nmt,progress")
    status, out, _ = _cli("plugins", capsys=capsys)
    assert status == 0
    assert "cvmkd.jsonl [cvmkd" in out and "logger jsonl" in out
    status, out, _ = _cli("plugins", "--json", capsys=capsys)
    listed = {p["name"]: p for p in json.loads(out)}
    assert listed["cvmkd.jsonl"]["components"][0]["name"] == "jsonl"
    assert listed["progress"]["distribution"] == "cvmkd-monitor"
    assert listed["progress"]["hooks"] == ["cvmkd_event", "cvmkd_finalize", "cvmkd_run_error", "cvmkd_step_end"]
    # the translation stack comes from plugin distributions, listed with their hooks
    assert listed["validation"]["distribution"] == "cvmkd-validation"
    assert listed["validation"]["hooks"] == ["cvmkd_addhooks", "cvmkd_check", "cvmkd_register", "cvmkd_validate"]
    assert listed["nmt"]["hooks"] == ["cvmkd_register", "cvmkd_register_commands"]


PLUGIN_PYPROJECT = """
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "cvmkd-tmp-metric"
version = "0.0.7"

[project.entry-points.cvmkd]
tmp-metric = "cvmkd_tmp_metric"
"""

PLUGIN_MODULE = """
from cvmkd_core import hookimpl


class WordCount:
    \"\"\"Mean hypothesis length in words.\"\"\"

    higher_is_better = {"words": True}

    def score(self, hypotheses, references, sources):
        return {"words": sum(len(h.split()) for h in hypotheses) / max(len(hypotheses), 1)}


@hookimpl
def cvmkd_register(register):
    register.metric("words", WordCount)
"""


@pytest.mark.slow
def test_a_pip_installed_plugin_is_listed_and_usable(tmp_path: Path, write, toy_hook_file) -> None:
    package = tmp_path / "pkg"
    (package / "cvmkd_tmp_metric").mkdir(parents=True)
    (package / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (package / "cvmkd_tmp_metric" / "__init__.py").write_text(textwrap.dedent(PLUGIN_MODULE))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--no-build-isolation", "--no-deps", str(package)], check=True)
    try:
        cvmkd = [sys.executable, "-m", "cvmkd_core.cli"]
        env = {k: v for k, v in os.environ.items() if k != "CVMKD_DISABLE_PLUGIN_AUTOLOAD"}
        env["PYTHONWARNINGS"] = "ignore"
        listed = subprocess.run([*cvmkd, "plugins", "--json"], capture_output=True, text=True, check=True, env=env)
        (plugin,) = [p for p in json.loads(listed.stdout) if p["name"] == "tmp-metric"]
        assert (plugin["distribution"], plugin["version"]) == ("cvmkd-tmp-metric", "0.0.7")
        assert plugin["components"] == [
            {"kind": "metric", "name": "words", "description": "Mean hypothesis length in words."}
        ]
        recipe = write("r.toml", TOY_RECIPE.replace('metrics = ["exact"]', 'metrics = ["exact", "words"]'))
        done = subprocess.run(
            [*cvmkd, "run", str(recipe), "--plugin", str(toy_hook_file), "--quiet"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        last = json.loads((tmp_path / "runs/toy/validation/history.jsonl").read_text().splitlines()[-1])
        assert set(last["scores"]) == {"exact", "words", "composite"}
        assert last["scores"]["words"] > 0
    finally:
        subprocess.run([*pip, "uninstall", "-y", "cvmkd-tmp-metric"], check=True)


def test_a_run_with_hook_files_resumes_from_its_own_recipe_copy(write, capsys) -> None:
    """The run's recipe.toml names its hook files by absolute path, so the resume command the
    refusal suggests (``cvmkd run runs/<name>/recipe.toml --resume``) finds them."""
    write("recipes/hooks/toy_hooks.py", TOY_HOOK_FILE)
    recipe = write(
        "recipes/r.toml", TOY_RECIPE.replace('name = "toy"\n', 'name = "toy"\nhook_files = ["hooks/toy_hooks.py"]\n', 1)
    )
    assert _cli("run", str(recipe), capsys=capsys)[0] == 0
    copy = Path("runs/toy/recipe.toml")
    assert str(Path("recipes/hooks/toy_hooks.py").resolve()) in copy.read_text()
    status, _, err = _cli("run", str(copy), "--resume", "--run-dir", "runs/toy", "--set", "run.steps=9", capsys=capsys)
    assert status == 0, err
    # and the original recipe resumes it just as well: the two name the same files
    status, _, err = _cli(
        "run", str(recipe), "--resume", "--run-dir", "runs/toy", "--set", "run.steps=9", capsys=capsys
    )
    assert status == 0, err
