"""The guard in a real loop with the toy trainer: a sabotaged weight is caught at the next
validation and rolled back; a NaN weight is rolled back before the next step ends; the rollback
limit stops the run; a bad score key fails before training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import cvmkd_guard
from cvmkd_core.errors import RecipeError
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.plugins import Plugins
from cvmkd_core.recipe import load_recipe
from cvmkd_core.session import Session, run_session
from cvmkd_testing import TOY_RECIPE, toy_plugin_manager
from cvmkd_validation.records import EVALUATION, GATE, TestEvaluation

# The toy weight converges by step 6 (exact 100); sabotage after step 7; validated at 9.
RECIPE = (
    TOY_RECIPE.replace("steps = 6", "steps = 12")
    + """
[guard]
name = "guard"
gate_scores = ["composite"]
"""
)
SABOTAGE = ["distill.learning_rate=0.2", "distill.sabotage_at_step=7"]


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Plugins:
    monkeypatch.chdir(tmp_path)
    plugins = toy_plugin_manager()
    plugins.add_plugin(cvmkd_guard, name="guard", source="test")  # its cvmkd_register registers `guard`
    return plugins


def run(plugins: Plugins, overrides: list[str], text: str = RECIPE) -> tuple[Any, Path]:
    path = Path("recipe.toml")
    path.write_text(text)
    recipe = load_recipe(path, overrides=overrides, registry=plugins.registry)
    return run_session(Session(recipe=recipe, plugins=plugins, recipe_path=path))


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_sabotaged_weight_is_rolled_back_to_the_best_checkpoint(plugins: Plugins) -> None:
    summary, run_dir = run(plugins, SABOTAGE)
    assert summary.status == "completed"
    assert summary.rollbacks == 1
    assert summary.final_step == 12 == summary.iterations_executed - 3
    assert summary.iterations_executed > summary.final_step

    events = lines(run_dir / "train.jsonl")
    (rollback,) = [e for e in events if e.get("event") == "rollback"]
    assert rollback["from_step"] == 9 and rollback["to_step"] == 6 and rollback["iteration"] == 9
    assert rollback["reason"] == "composite 0.00 is 100.0% below the best (100.00 at step 6; threshold 5%)"
    assert rollback["checkpoint"] == "step_00000006_it00000006.pt"
    assert rollback["lr_scale"] == 0.5

    history = lines(run_dir / "validation" / "history.jsonl")
    assert [(h["step"], h["iteration"], h["rolled_back"]) for h in history] == [
        (3, 3, False),
        (6, 6, False),
        (9, 9, True),
        (9, 12, False),
        (12, 15, False),
    ]
    rolled_back = json.loads((run_dir / "validation" / "step_00000009_it00000009_rolled_back.json").read_text())
    assert rolled_back["rolled_back"] is True and rolled_back["scores"]["exact"] == 0.0
    assert history[-1]["scores"]["exact"] == 100.0

    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["rollbacks"] == 1 and saved["final_step"] == 12 and saved["iterations_executed"] == 15
    assert saved["gate"]["passed"] is None
    assert saved["gate"]["verdict"] == (
        "retention gate not evaluated: no test evaluation in the summary (the trainer does not score a test split)"
    )
    # the guard's state travels in every checkpoint, as plain values
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    last = torch.load(run_dir / "checkpoints" / manifest["checkpoints"][-1]["file"], weights_only=True)
    assert last["guard"] == {"downward_streak": 0}


def test_without_the_guard_the_sabotage_stays(plugins: Plugins) -> None:
    summary, run_dir = run(plugins, SABOTAGE, text=TOY_RECIPE.replace("steps = 6", "steps = 12"))
    assert summary.rollbacks == 0
    assert lines(run_dir / "validation" / "history.jsonl")[2]["scores"]["exact"] == 0.0


class NanWeight:
    """Sets the toy weight to NaN after ``step``, once."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.done = False

    @hookimpl
    def cvmkd_step_end(self, state: Any) -> None:
        if state.step == self.step and not self.done:
            self.done = True
            state.objects["weight"].fill_(float("nan"))


def test_a_nan_loss_rolls_back_to_the_last_checkpoint_after_that_step(plugins: Plugins) -> None:
    plugins.add_plugin(NanWeight(7), name="nan", source="test")
    summary, run_dir = run(plugins, ["distill.learning_rate=0.2"])
    assert summary.status == "completed" and summary.rollbacks == 1
    assert summary.final_step == 12 and summary.iterations_executed == 14
    events = lines(run_dir / "train.jsonl")
    (rollback,) = [e for e in events if e.get("event") == "rollback"]
    assert rollback["from_step"] == 8 and rollback["to_step"] == 6
    assert rollback["reason"] == "non-finite training loss at step 8 (loss=nan)"
    steps = [e["step"] for e in events if "event" not in e]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8, 7, 8, 9, 10, 11, 12]
    history = lines(run_dir / "validation" / "history.jsonl")
    assert [h["step"] for h in history] == [3, 6, 9, 12] and not any(h["rolled_back"] for h in history)
    assert history[-1]["scores"]["exact"] == 100.0


def test_the_rollback_limit_restores_the_best_and_stops(plugins: Plugins) -> None:
    summary, run_dir = run(plugins, [*SABOTAGE, "guard.max_rollbacks=0"])
    assert summary.status == "stopped"
    assert summary.final_step == 6 and summary.iterations_executed == 9 and summary.rollbacks == 1
    reason = (
        "composite 0.00 is 100.0% below the best (100.00 at step 6; threshold 5%); rollback limit reached "
        "(0 rollbacks, max_rollbacks = 0): restoring the best checkpoint and stopping"
    )
    (rollback,) = [e for e in lines(run_dir / "train.jsonl") if e.get("event") == "rollback"]
    assert rollback["reason"] == reason and rollback["to_step"] == 6
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved["extra"]["stop_reason"] == f"{reason}; restored step 6 and stopped"
    assert saved["gate"]["verdict"].startswith("retention gate not evaluated: the run stopped (composite 0.00")


class FakeEvaluation:
    """A test evaluation in the finalize phase before the gate's, as the validation plugin's."""

    @hookimpl
    def cvmkd_evaluate(self, summary: Any) -> None:
        summary[EVALUATION] = TestEvaluation(
            split="test", sentences=1, beam_size=1, scores={}, retention={"composite": 0.5}
        )


def test_the_gate_judges_the_evaluation_of_the_phase_before(plugins: Plugins) -> None:
    # registered before the guard component, and yet judged: the phases order them, not pluggy
    plugins.add_plugin(FakeEvaluation(), name="fake-evaluation", source="test")
    summary, _ = run(plugins, ["run.steps=3"])
    gate = summary[GATE]
    assert gate is not None and gate.passed is False
    assert gate.verdict == "retention gate failed: student composite 50.0% of the teacher, below the threshold 90%"


def test_an_unknown_score_fails_before_training(plugins: Plugins) -> None:
    with pytest.raises(
        RecipeError, match=r"guard.score: no selected metric returns 'bleu'; available scores: exact, composite$"
    ):
        run(plugins, ["guard.score=bleu"])
    assert not Path("runs/toy").exists()  # checked before anything is written
