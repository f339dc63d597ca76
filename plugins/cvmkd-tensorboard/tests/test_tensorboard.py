"""The tensorboard logger in real runs of the toy trainer, read back with TensorBoard's own
EventAccumulator: the training scalars equal train.jsonl's, the validation scores equal
history.jsonl's, the recipe and the hyperparameters are there, rollbacks are marked; without the
tensorboard package a run fails before training with one line and exit status 2."""

from __future__ import annotations

import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import cvmkd_guard
import cvmkd_tensorboard
from cvmkd_core.cli import main
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.plugins import Plugins, build_plugins
from cvmkd_core.recipe import load_recipe
from cvmkd_core.session import Session, run_session
from cvmkd_testing import TOY_HOOK_FILE, TOY_RECIPE, toy_plugin_manager

LOGGERS = """
[[loggers]]
name = "jsonl"

[[loggers]]
name = "tensorboard"
"""
RECIPE = TOY_RECIPE + LOGGERS


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Plugins:
    monkeypatch.chdir(tmp_path)
    plugins = toy_plugin_manager()
    plugins.add_plugin(cvmkd_tensorboard, name="tensorboard", source="test")
    return plugins


def run(plugins: Plugins, overrides: list[str] | None = None, text: str = RECIPE) -> tuple[Any, Path]:
    path = Path("recipe.toml")
    path.write_text(text)
    recipe = load_recipe(path, overrides=overrides or [], registry=plugins.registry)
    return run_session(Session(recipe=recipe, plugins=plugins, recipe_path=path))


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def events(log_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator: Any, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def texts(accumulator: Any, tag: str) -> list[tuple[int, str]]:
    from tensorboard.util import tensor_util

    return [
        (e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode())
        for e in accumulator.Tensors(f"{tag}/text_summary")
    ]


def f32(value: float) -> float:
    """What TensorBoard stores of a value: a float32."""
    return float(np.float32(value))


def test_registered_by_the_entry_point() -> None:
    pytest.importorskip("tensorboard")
    assert build_plugins().registry.get("logger", "tensorboard").plugin == "tensorboard"


def test_a_run_is_logged_as_train_jsonl_and_the_validation_history_say(plugins: Plugins) -> None:
    pytest.importorskip("tensorboard")
    summary, run_dir = run(plugins, ["run.steps=7", "run.log_every=2", "distill.learning_rate=0.2"])
    assert summary.status == "completed"
    log_dir = run_dir / "tensorboard"
    assert summary.outputs["tensorboard"] == str(log_dir)
    assert json.loads((run_dir / "summary.json").read_text())["outputs"]["tensorboard"] == str(log_dir)
    accumulator = events(log_dir)

    # one point per logged step (every 2 steps, and the last), equal to train.jsonl's
    records = [r for r in lines(run_dir / "train.jsonl") if "event" not in r]
    assert [r["step"] for r in records] == [2, 4, 6, 7]
    for key in ("loss", "weight", "lr"):
        assert scalars(accumulator, f"train/{key}") == [(r["step"], f32(r[key])) for r in records], key

    # each validation's scores at its step, equal to history.jsonl's
    history = lines(run_dir / "validation" / "history.jsonl")
    assert [h["step"] for h in history] == [3, 6, 7]
    for key in ("exact", "composite"):
        assert scalars(accumulator, f"validation/{key}") == [(h["step"], f32(h["scores"][key])) for h in history]
    # the toy's (perfect) teacher, and the student's retention of it, beside every validation
    for prefix, part in (
        ("teacher", lambda h: h["details"]["teacher"]["scores"]),
        ("retention", lambda h: h["details"]["retention"]),
    ):
        for key in ("exact", "composite"):
            assert scalars(accumulator, f"{prefix}/{key}") == [(h["step"], f32(part(h)[key])) for h in history], prefix
    assert history[0]["details"]["teacher"]["scores"]["exact"] == 100.0

    # the resolved recipe as text at the start; how the run ended; no rollbacks
    ((step, recipe),) = texts(accumulator, "run/recipe")
    assert step == 0 and textwrap.dedent(recipe) + "\n" == (run_dir / "recipe.toml").read_text()
    assert texts(accumulator, "run/summary") == [(7, "completed at step 7 (7 iterations, 0 rollbacks)")]
    assert scalars(accumulator, "run/rollbacks") == [(0, 0.0)]

    # the hyperparameters: the flattened recipe, with the validation scores as metrics
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    content = accumulator.PluginTagToContent("hparams")
    start = HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["run.steps"].number_value == 7
    assert start.hparams["distill.name"].string_value == "toy"
    assert json.loads(start.hparams["validation.metrics"].string_value) == [{"name": "exact"}]
    experiment = HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"validation/exact", "validation/composite"}


def test_every_sets_its_own_cadence(plugins: Plugins) -> None:
    pytest.importorskip("tensorboard")
    text = TOY_RECIPE + LOGGERS.replace('name = "tensorboard"', 'name = "tensorboard"\nevery = 4\nlog_dir = "tb"')
    _, run_dir = run(plugins, [], text)
    assert [s for s, _ in scalars(events(run_dir / "tb"), "train/loss")] == [4, 6]  # and the last step
    assert [r["step"] for r in lines(run_dir / "train.jsonl") if "event" not in r] == [1, 2, 3, 4, 5, 6]


def test_a_rollback_is_marked(plugins: Plugins) -> None:
    pytest.importorskip("tensorboard")
    plugins.add_plugin(cvmkd_guard, name="guard", source="test")
    text = (
        TOY_RECIPE.replace("steps = 6", "steps = 12")
        + '\n[guard]\nname = "guard"\ngate_scores = ["composite"]\n'
        + LOGGERS
    )
    summary, run_dir = run(plugins, ["distill.learning_rate=0.2", "distill.sabotage_at_step=7"], text)
    assert summary.rollbacks == 1 and summary.iterations_executed == 15
    accumulator = events(run_dir / "tensorboard")
    assert scalars(accumulator, "run/rollbacks") == [(0, 0.0), (9, 1.0)]
    ((step, entry),) = texts(accumulator, "run/events")
    assert step == 9 and entry.startswith("rollback 1 at iteration 9: ") and "step 9 back to step 6" in entry
    # every executed iteration is logged at the step of its weights, as in train.jsonl
    records = [r for r in lines(run_dir / "train.jsonl") if "event" not in r]
    assert [r["step"] for r in records] == [*range(1, 10), *range(7, 13)]
    assert scalars(accumulator, "train/loss") == [(r["step"], f32(r["loss"])) for r in records]
    # the rolled-back validation at step 9 is plotted too: it is why the run went back
    history = lines(run_dir / "validation" / "history.jsonl")
    assert [h["rolled_back"] for h in history] == [False, False, True, False, False]
    assert scalars(accumulator, "validation/composite") == [(h["step"], f32(h["scores"]["composite"])) for h in history]


def test_without_jsonl_a_warning_says_to_list_both(plugins: Plugins, caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("tensorboard")
    caplog.set_level(logging.WARNING, logger="cvmkd")
    _, run_dir = run(plugins, [], TOY_RECIPE + '\n[[loggers]]\nname = "tensorboard"\n')
    assert not (run_dir / "train.jsonl").exists()
    assert any("has no jsonl" in r.getMessage() for r in caplog.records)


def test_an_error_closes_the_event_file_with_what_happened(plugins: Plugins) -> None:
    pytest.importorskip("tensorboard")

    class Boom:
        @hookimpl
        def cvmkd_step_end(self, state: Any) -> None:
            if state.step == 4:
                raise ValueError("boom")

    plugins.add_plugin(Boom(), name="boom", source="test")
    with pytest.raises(ValueError, match="boom"):
        run(plugins)
    run_dir = Path("runs/toy")
    assert json.loads((run_dir / "summary.json").read_text())["outputs"]["tensorboard"] == str(run_dir / "tensorboard")
    accumulator = events(run_dir / "tensorboard")
    assert [s for s, _ in scalars(accumulator, "train/loss")] == [1, 2, 3, 4]
    assert scalars(accumulator, "validation/exact") == [(3, 0.0)]
    assert texts(accumulator, "run/summary") == [(4, "failed at step 4 (4 iterations): ValueError: boom")]


def test_without_the_tensorboard_package_the_run_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CVMKD_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("CVMKD_PLUGINS", "validation,analysis,evaluation,tensorboard")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if it were not installed
    Path("toy_hooks.py").write_text(TOY_HOOK_FILE)
    Path("recipe.toml").write_text(RECIPE)

    status = main(["run", "recipe.toml", "--plugin", "toy_hooks.py"])

    out, err = capsys.readouterr()
    assert status == 2
    assert err == "error: logger 'tensorboard' needs the tensorboard package: pip install tensorboard\n"
    assert out == ""
    # components are built before the run directory is prepared: nothing is written
    assert not (tmp_path / "runs").exists()


def test_a_distillation_logs_the_student_and_the_teacher_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny KD recipe: the student's run has the kd trainer's metrics and the teacher's
    scores; the teacher stage, run with the same [[loggers]], has its own event files."""
    pytest.importorskip("tensorboard")
    import torch

    from cvmkd_core.session import open_session
    from cvmkd_testing import TINY_KD_RECIPE, write_tiny_corpus

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CVMKD_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("CVMKD_PLUGINS", "nmt,validation,analysis,evaluation,kd,kd-quantize,sacrebleu,tensorboard")
    torch.set_num_threads(1)
    write_tiny_corpus(tmp_path)
    Path("recipe.toml").write_text(TINY_KD_RECIPE + LOGGERS)
    summary, run_dir = run_session(open_session("recipe.toml"))
    assert summary.status == "completed"

    student = events(run_dir / "tensorboard")
    records = [r for r in lines(run_dir / "train.jsonl") if "event" not in r]
    for key in ("loss", "kd", "ce", "token_accuracy", "teacher_agreement", "lr", "grad_norm", "tokens_per_s"):
        assert scalars(student, f"train/{key}") == [(r["step"], f32(r[key])) for r in records], key
    history = lines(run_dir / "validation" / "history.jsonl")
    teacher_scores = json.loads((run_dir / "validation" / "teacher.json").read_text())["scores"]
    for key in ("bleu", "chrf", "composite"):
        assert scalars(student, f"validation/{key}") == [(h["step"], f32(h["scores"][key])) for h in history]
        assert scalars(student, f"teacher/{key}") == [(h["step"], f32(teacher_scores[key])) for h in history]

    stage = run_dir / "teacher"
    teacher = events(stage / "tensorboard")
    assert [s for s, _ in scalars(teacher, "train/loss")] == list(range(1, 11))
    assert json.loads((stage / "summary.json").read_text())["outputs"]["tensorboard"] == str(stage / "tensorboard")
