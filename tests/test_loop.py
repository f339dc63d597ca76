"""The event loop: hook order, exact iteration counts, validation cadence, finalize on failure,
rollback, and the run directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cvmkd_core import hookimpl
from cvmkd_core.errors import RunDirError
from cvmkd_core.loop import PluginError
from cvmkd_core.plugins import Plugins
from cvmkd_core.recipe import load_recipe
from cvmkd_core.session import Session, run_session
from cvmkd_core.state import Rollback, ValidationResult
from cvmkd_testing import TOY_RECIPE


def _session(write, plugins: Plugins, text: str = TOY_RECIPE, overrides: list[str] | None = None) -> Session:
    path = write("recipe.toml", text)
    recipe = load_recipe(path, overrides=overrides, registry=plugins.registry)
    return Session(recipe=recipe, plugins=plugins, recipe_path=path)


class Recorder:
    """Records every hook call, in order."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def cvmkd_configure(self, recipe: Any) -> None:
        self.calls.append("configure")

    @hookimpl
    def cvmkd_run_start(self, state: Any) -> None:
        self.calls.append("run_start")

    @hookimpl
    def cvmkd_step(self, state: Any) -> None:
        self.calls.append(f"step {state.step + 1}")

    @hookimpl
    def cvmkd_step_end(self, state: Any) -> None:
        self.calls.append(f"step_end {state.step}")

    @hookimpl
    def cvmkd_validate(self, state: Any) -> None:
        self.calls.append(f"validate {state.step}")

    @hookimpl
    def cvmkd_check_degradation(self, record: Any, history: list[Any]) -> None:
        self.calls.append(f"check_degradation {record.step} after {len(history)}")

    @hookimpl
    def cvmkd_checkpoint(self, record: Any, payload: Any) -> None:
        self.calls.append(f"checkpoint {record.step}")

    @hookimpl
    def cvmkd_restore(self, reason: str) -> None:
        self.calls.append(f"restore {reason}")

    @hookimpl
    def cvmkd_event(self, name: str) -> None:
        self.calls.append(f"event {name}")

    @hookimpl
    def cvmkd_run_error(self, error: BaseException) -> None:
        self.calls.append(f"run_error {type(error).__name__}")

    @hookimpl
    def cvmkd_finalize(self, summary: Any) -> None:
        self.calls.append(f"finalize {summary.status}")


@pytest.fixture
def recorder(toy_plugins: Plugins):
    rec = Recorder()
    toy_plugins.add_plugin(rec, name="recorder", source="test")
    try:
        yield rec
    finally:
        toy_plugins.remove_plugin("recorder")
    assert toy_plugins.pm.get_plugin("recorder") is None


def test_hook_order_of_a_tiny_run(write, toy_plugins: Plugins, recorder: Recorder) -> None:
    summary, _ = run_session(_session(write, toy_plugins, overrides=["run.steps=4", "run.validate_every=2"]))
    assert summary.status == "completed"
    validation = lambda n, before: [  # noqa: E731
        f"validate {n}",
        f"check_degradation {n} after {before}",
        "event validation",
        f"checkpoint {n}",
        "event checkpoint",
    ]
    assert recorder.calls == [
        "configure",
        "run_start",
        "event run_start",
        "step 1",
        "step_end 1",
        "step 2",
        "step_end 2",
        *validation(2, 0),
        "step 3",
        "step_end 3",
        "step 4",
        "step_end 4",
        *validation(4, 1),
        "event run_end",
        "finalize completed",
    ]


def test_runs_exactly_the_recipe_steps_and_validates_every_n_and_at_the_end(write, toy_plugins: Plugins) -> None:
    summary, run_dir = run_session(
        _session(write, toy_plugins, overrides=["run.steps=7", "run.validate_every=3", "distill.learning_rate=0.2"])
    )
    lines = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]
    steps = [line["step"] for line in lines if "event" not in line]
    assert steps == [1, 2, 3, 4, 5, 6, 7]
    assert all(isinstance(line["loss"], float) for line in lines if "event" not in line)
    history = [json.loads(line) for line in (run_dir / "validation" / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [3, 6, 7]
    assert history[-1]["scores"] == {"exact": 100.0, "composite": 100.0}
    assert summary.final_step == summary.iterations_executed == 7
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    assert [c["step"] for c in manifest["checkpoints"]] == [6, 7]  # keep_checkpoints = 2
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_run_directory_layout_and_resolved_recipe(write, toy_plugins: Plugins) -> None:
    session = _session(write, toy_plugins)
    _, run_dir = run_session(session)
    assert run_dir == Path("runs/toy")
    for sub in ("validation", "checkpoints", "model", "reports"):
        assert (run_dir / sub).is_dir()
    written = load_recipe(run_dir / "recipe.toml", registry=toy_plugins.registry)
    assert written == session.recipe


def test_an_existing_run_directory_is_never_overwritten(write, toy_plugins: Plugins) -> None:
    _, run_dir = run_session(_session(write, toy_plugins))
    before = (run_dir / "train.jsonl").read_bytes()
    with pytest.raises(RunDirError, match="run directory runs/toy exists already"):
        run_session(_session(write, toy_plugins))
    assert (run_dir / "train.jsonl").read_bytes() == before


class FailAt:
    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def cvmkd_step_end(self, state: Any) -> None:
        if state.step == self.step:
            raise RuntimeError(f"broken at step {state.step}")


def test_finalize_runs_when_the_run_fails(write, toy_plugins: Plugins, recorder: Recorder) -> None:
    toy_plugins.add_plugin(FailAt(2), name="fail", source="test")
    with pytest.raises(RuntimeError, match="broken at step 2"):
        run_session(_session(write, toy_plugins))
    assert recorder.calls[-3:] == ["run_error RuntimeError", "event run_end", "finalize failed"]
    summary = json.loads(Path("runs/toy/summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"] == "RuntimeError: broken at step 2"
    assert summary["final_step"] == 2


class Replacer:
    """Replaces the built-in step by returning a result first (firstresult)."""

    def __init__(self) -> None:
        self.steps = 0

    @hookimpl
    def cvmkd_step(self, state: Any) -> Any:
        from cvmkd_core.state import StepResult

        self.steps += 1
        return StepResult(loss=0.0, metrics={"replaced": 1.0})


def test_a_plugin_can_replace_the_step(write, toy_plugins: Plugins) -> None:
    replacer = Replacer()
    toy_plugins.add_plugin(replacer, name="replacer", source="test")
    _, run_dir = run_session(_session(write, toy_plugins))
    assert replacer.steps == 6
    first = json.loads((run_dir / "train.jsonl").read_text().splitlines()[1])
    assert first["replaced"] == 1.0


class NoStepTrainer:
    """Sets up batches but never performs a step."""

    @hookimpl(tryfirst=True)
    def cvmkd_run_start(self, state: Any) -> None:
        state.batches = iter(range(100))


class NoStepPlugin:
    @hookimpl
    def cvmkd_register(self, register: Any) -> None:
        register.trainer("nostep", NoStepTrainer)


def test_a_run_without_a_step_implementation_fails_clearly(write, toy_plugins: Plugins, recorder: Recorder) -> None:
    toy_plugins.add_plugin(NoStepPlugin(), name="nostep", source="test")
    with pytest.raises(PluginError, match="no plugin performed the training step"):
        run_session(_session(write, toy_plugins, overrides=["distill=nostep"]))
    assert recorder.calls[-1] == "finalize failed"


class DuplicateScore:
    @hookimpl
    def cvmkd_validate(self, state: Any) -> dict[str, float]:
        return {"exact": 1.0}


def test_duplicate_validation_keys_are_an_error(write, toy_plugins: Plugins) -> None:
    toy_plugins.add_plugin(DuplicateScore(), name="dup", source="test")
    with pytest.raises(PluginError, match="two plugins returned the validation score 'exact'"):
        run_session(_session(write, toy_plugins))


class Ranker:
    """Ranks each validation by minus its step: the first checkpoint is the best."""

    @hookimpl
    def cvmkd_validate(self, state: Any) -> ValidationResult:
        return ValidationResult(scores={"early": float(state.step)}, rank=-float(state.step))


def test_checkpoints_are_ranked_by_the_rank_a_validation_gives(write, toy_plugins: Plugins) -> None:
    # the validation plugin ranks by the composite score; a second rank is an error
    toy_plugins.add_plugin(Ranker(), name="ranker", source="test")
    with pytest.raises(PluginError, match="two plugins returned the rank of a validation"):
        run_session(_session(write, toy_plugins))
    toy_plugins.remove_plugin("validation")
    summary, run_dir = run_session(_session(write, toy_plugins, overrides=["run.name=ranked"]))
    manifest = json.loads((run_dir / "checkpoints" / "manifest.json").read_text())
    assert [(e["step"], e["score"]) for e in manifest["checkpoints"]] == [(3, -3.0), (6, -6.0)]
    assert manifest["best"] == manifest["checkpoints"][0]["file"]


class DropDetector:
    """Rolls back whenever 'exact' falls below the best so far."""

    @hookimpl
    def cvmkd_check_degradation(self, record: Any, history: list[Any]) -> Rollback | None:
        best = max((r.scores["exact"] for r in history if not r.rolled_back), default=None)
        if best is not None and record.scores["exact"] < best:
            return Rollback(reason=f"exact fell from {best} to {record.scores['exact']}", lr_factor=0.5)
        return None


def test_rollback_restores_the_best_checkpoint_and_continues(write, toy_plugins: Plugins) -> None:
    toy_plugins.add_plugin(DropDetector(), name="detector", source="test")
    # the weight converges by step 6, is thrown off at step 7, validated at 9 -> rollback to 6
    session = _session(
        write,
        toy_plugins,
        overrides=["run.steps=12", "run.validate_every=3", "distill.sabotage_at_step=7", "distill.learning_rate=0.2"],
    )
    summary, run_dir = run_session(session)
    assert summary.status == "completed"
    assert summary.rollbacks == 1
    assert summary.final_step == 12
    assert summary.iterations_executed == 15  # 12 steps + the 3 that were rolled back
    events = [json.loads(line) for line in (run_dir / "train.jsonl").read_text().splitlines()]
    (rollback,) = [e for e in events if e.get("event") == "rollback"]
    assert rollback["from_step"] == 9 and rollback["to_step"] == 6
    assert rollback["lr_scale"] == 0.5
    history = [json.loads(line) for line in (run_dir / "validation" / "history.jsonl").read_text().splitlines()]
    assert [(h["step"], h["rolled_back"]) for h in history] == [
        (3, False),
        (6, False),
        (9, True),
        (9, False),
        (12, False),
    ]
    assert history[-1]["scores"]["exact"] == 100.0
    lrs = [e["lr"] for e in events if "lr" in e]
    assert lrs[-1] == pytest.approx(0.1)  # halved after the rollback


class CrashAtFirstCheckpoint:
    """Stops the process while the first checkpoint is being made, after its validation was
    recorded: what SIGKILL leaves (no summary, no checkpoint)."""

    @hookimpl(tryfirst=True)
    def cvmkd_checkpoint(self, record: Any, payload: Any) -> None:
        raise KeyboardInterrupt  # not caught by the loop as a plugin failure; the test's SIGKILL


def test_a_resume_before_the_first_checkpoint_starts_anew_without_the_lost_validation(
    write, toy_plugins: Plugins
) -> None:
    toy_plugins.add_plugin(CrashAtFirstCheckpoint(), name="crash", source="test")
    session = _session(write, toy_plugins)
    with pytest.raises(KeyboardInterrupt):
        run_session(session, "runs/crashed")
    toy_plugins.remove_plugin("crash")
    history_file = Path("runs/crashed/validation/history.jsonl")
    assert [json.loads(line)["step"] for line in history_file.read_text().splitlines()] == [3]
    summary, run_dir = run_session(_session(write, toy_plugins), "runs/crashed", resume=True)
    assert summary.status == "completed"
    history = [json.loads(line)["step"] for line in history_file.read_text().splitlines()]
    assert history == [3, 6]  # the validation of the lost step 3 is not there twice


def test_appending_to_a_log_cuts_the_torn_line_a_killed_process_left(tmp_path: Path) -> None:
    from cvmkd_core.files import append_jsonl, open_jsonl

    log = tmp_path / "logs" / "train.jsonl"
    with open_jsonl(log) as handle:  # a new file, its folder created
        append_jsonl(handle, {"step": 1})
    log.write_bytes(log.read_bytes() + b'{"step": 2, "lo')  # SIGKILL in the middle of a write
    with open_jsonl(log) as handle:
        append_jsonl(handle, {"event": "resume"})
    assert [json.loads(line) for line in log.read_text().splitlines()] == [{"step": 1}, {"event": "resume"}]
    long_torn = tmp_path / "long.jsonl"  # a torn line longer than the block read backwards
    long_torn.write_bytes(b'{"step": 1}\n{"text": "' + b"x" * 200_000)
    with open_jsonl(long_torn) as handle:
        append_jsonl(handle, {"step": 2})
    assert long_torn.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_a_run_stopped_before_it_wrote_its_recipe_can_be_started_again(write, toy_plugins: Plugins) -> None:
    """What a run killed (or out of disk) before its recipe.toml leaves: the lock, empty folders,
    a temporary file. --resume has nothing to resume and says so; a new run starts there."""
    left = Path("runs/toy")
    (left / "checkpoints").mkdir(parents=True)
    (left / ".lock").write_text("")
    (left / ".recipe.toml.x1y2.tmp").write_text("[run")
    with pytest.raises(RunDirError, match="stopped before it began: run it again without --resume"):
        run_session(_session(write, toy_plugins), "runs/toy", resume=True)
    summary, _ = run_session(_session(write, toy_plugins), "runs/toy")
    assert summary.status == "completed"
