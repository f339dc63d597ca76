"""The guard's decisions on synthetic validation histories, its non-finite check, its saved
state and its settings."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pluggy
import pytest
import torch

from cvmkd_core.config import structure
from cvmkd_core.errors import RecipeError
from cvmkd_core.recipe import Recipe, component_ref, load_recipe
from cvmkd_core.registry import Registry
from cvmkd_core.stash import NamedStash
from cvmkd_core.state import Rollback, RunState, StepResult, ValidationRecord
from cvmkd_guard import Guard, GuardConfig, normalised_slope
from cvmkd_testing import TOY_RECIPE, ExactMatch, toy_plugin_manager
from cvmkd_validation.config import ValidationConfig
from cvmkd_validation.errors import MetricError
from cvmkd_validation.metrics import COMPOSITE_SPEC, ScoreSpec

HIGHER = COMPOSITE_SPEC
TER = ScoreSpec(higher_is_better=False, low=0.0, high=100.0)


def rec(step: int, value: float, key: str = "composite", rolled_back: bool = False) -> ValidationRecord:
    return ValidationRecord(step=step, iteration=step, scores={key: value}, rolled_back=rolled_back)


def run(
    guard: Guard, values: list[float], spec: ScoreSpec = HIGHER, key: str = "composite", rollbacks: int = 0
) -> list[Rollback | None]:
    """Feed validations one by one, as the loop does: a rolled-back record stays in the history."""
    history: list[ValidationRecord] = []
    decisions = []
    for i, value in enumerate(values):
        record = rec(1000 * (i + 1), value, key)
        decision = guard.judge(record, history, spec=spec, rollbacks=rollbacks)
        decisions.append(decision)
        history.append(rec(record.step, value, key, rolled_back=decision is not None))
        if decision is not None:
            guard.downward_streak = 0  # what cvmkd_restore does on a rollback
    return decisions


def state_for(tmp_path: Path) -> RunState:
    return RunState(recipe=Recipe(), pm=pluggy.PluginManager("cvmkd"), registry=Registry(), run_dir=tmp_path)


# --- the relative drop ---------------------------------------------------------------------------


def test_the_first_validation_never_degrades() -> None:
    guard = Guard()
    assert guard.judge(rec(1000, 0.0), [], spec=HIGHER) is None
    assert guard.judge(rec(1000, float("nan")), [], spec=HIGHER) is None
    # only rolled-back records before it: still the first accepted one
    assert guard.judge(rec(2000, 0.0), [rec(1000, 50.0, rolled_back=True)], spec=HIGHER) is None


def test_a_drop_beyond_the_threshold_below_the_best_rolls_back() -> None:
    guard = Guard()
    history = [rec(1000, 40.0), rec(3000, 47.0), rec(4000, 46.0)]
    decision = guard.judge(rec(5000, 41.2), history, spec=HIGHER)
    assert decision == Rollback(
        reason="composite 41.20 is 12.3% below the best (47.00 at step 3000; threshold 5%)",
        target="best",
        lr_factor=0.5,
    )
    # 4.3% below the best: within the threshold (and only the first downward validation)
    assert Guard().judge(rec(5000, 45.0), history, spec=HIGHER) is None


def test_lower_is_better_scores_degrade_upwards() -> None:
    guard = Guard(GuardConfig(score="ter", patience=5))
    history = [rec(1000, 60.0, "ter"), rec(2000, 50.0, "ter"), rec(3000, 55.0, "ter")]
    decision = guard.judge(rec(4000, 53.0, "ter"), history, spec=TER)
    assert decision is not None
    assert decision.reason == "ter 53.00 is 6.0% above the best (50.00 at step 2000; lower is better; threshold 5%)"
    assert guard.judge(rec(4000, 52.0, "ter"), history, spec=TER) is None  # 4% above
    assert guard.judge(rec(4000, 30.0, "ter"), history, spec=TER) is None  # better: lower
    # read as higher-is-better, 30 would be far below the best of 60
    assert Guard(GuardConfig(score="ter")).judge(rec(4000, 30.0, "ter"), history, spec=HIGHER) is not None


def test_rolled_back_records_are_not_the_best_nor_in_the_trend() -> None:
    history = [rec(1000, 50.0), rec(2000, 60.0, rolled_back=True)]
    assert Guard().judge(rec(2000, 49.0), history, spec=HIGHER) is None
    unflagged = [rec(1000, 50.0), rec(2000, 60.0)]
    assert Guard().judge(rec(3000, 49.0), unflagged, spec=HIGHER) is not None
    # a trend over 50, 52, 54 (the rolled-back 10 left out) is rising
    guard = Guard(GuardConfig(patience=1))
    trend = [rec(1000, 50.0), rec(2000, 10.0, rolled_back=True), rec(2000, 52.0)]
    assert guard.judge(rec(3000, 54.0), trend, spec=HIGHER) is None
    assert guard.downward_streak == 0


def test_a_non_finite_score_degrades() -> None:
    decision = Guard().judge(rec(2000, float("nan")), [rec(1000, 30.0)], spec=HIGHER)
    assert decision is not None and decision.reason == "composite is nan at step 2000"


def test_a_validation_without_the_score_is_accepted_unchecked(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cvmkd")
    assert Guard().judge(rec(2000, 1.0, key="bleu"), [rec(1000, 30.0)], spec=HIGHER) is None
    assert "has no 'composite' score" in caplog.text


# --- the trend -----------------------------------------------------------------------------------


def test_normalised_slope() -> None:
    assert normalised_slope([1.0, 2.0, 3.0]) == pytest.approx(0.5)
    assert normalised_slope([50.0, 49.0, 48.0]) == pytest.approx(-1 / 49)
    assert normalised_slope([3.0, 3.0, 3.0]) == 0.0
    assert normalised_slope([-1.0, 0.0, 1.0]) == pytest.approx(1.0)  # zero mean: the raw slope
    assert normalised_slope([1.0]) is None


def test_a_downward_trend_degrades_after_patience_validations_in_a_row() -> None:
    guard = Guard(GuardConfig(threshold=0.5))  # the relative drop never fires here
    decisions = run(guard, [50.0, 49.0, 48.0, 47.0])
    assert decisions[:3] == [None, None, None]  # 2 points: no trend yet; then 1 downward of 2
    assert decisions[3] == Rollback(
        reason="composite trending down over the last 3 validations (slope -2.1%/validation) for 2 validations in a row",
        target="best",
        lr_factor=0.5,
    )


def test_a_flat_or_rising_validation_resets_the_downward_count() -> None:
    guard = Guard(GuardConfig(threshold=0.5))
    # 48 is downward (1), 48.5 is flat within tolerance over [49, 48, 48.5]: reset; 46.5 downward (1)
    assert run(guard, [50.0, 49.0, 48.0, 48.5, 46.5]) == [None] * 5
    assert guard.downward_streak == 1


def test_trend_direction_follows_the_score_spec() -> None:
    guard = Guard(GuardConfig(score="ter", threshold=0.5, patience=1, trend_window=2))
    decisions = run(guard, [50.0, 49.0, 52.0], spec=TER, key="ter")
    assert decisions[:2] == [None, None]  # falling TER is improving
    assert decisions[2] is not None
    assert decisions[2].reason == (
        "ter trending up (lower is better) over the last 2 validations (slope +5.9%/validation) at this validation"
    )


def test_tolerance_and_window() -> None:
    # -2%/validation is within a tolerance of 5%
    assert run(Guard(GuardConfig(threshold=0.5, trend_tolerance=0.05)), [50.0, 49.0, 48.0, 47.0]) == [None] * 4
    # a window of 4 needs 4 accepted validations before any trend
    assert run(Guard(GuardConfig(threshold=0.5, trend_window=4, patience=1)), [50.0, 49.0, 48.0]) == [None] * 3


def test_both_rules_firing_give_one_reason() -> None:
    guard = Guard(GuardConfig(patience=1))
    decisions = run(guard, [50.0, 48.0, 40.0])
    assert decisions[2] is not None
    assert decisions[2].reason == (
        "composite 40.00 is 20.0% below the best (50.00 at step 1000; threshold 5%); "
        "composite trending down over the last 3 validations (slope -10.9%/validation) at this validation"
    )


# --- the limit -----------------------------------------------------------------------------------


def test_max_rollbacks_reached_restores_the_best_and_stops() -> None:
    guard = Guard(GuardConfig(max_rollbacks=2, target="last", lr_factor=0.25))
    history = [rec(1000, 50.0)]
    normal = guard.judge(rec(2000, 10.0), history, spec=HIGHER, rollbacks=1)
    assert normal == Rollback(
        reason="composite 10.00 is 80.0% below the best (50.00 at step 1000; threshold 5%)",
        target="last",
        lr_factor=0.25,
    )
    final = guard.judge(rec(2000, 10.0), history, spec=HIGHER, rollbacks=2)
    assert final == Rollback(
        reason=(
            "composite 10.00 is 80.0% below the best (50.00 at step 1000; threshold 5%); rollback limit reached "
            "(2 rollbacks, max_rollbacks = 2): restoring the best checkpoint and stopping"
        ),
        target="best",
        lr_factor=1.0,
        stop=True,
    )
    assert Guard(GuardConfig(max_rollbacks=0)).judge(rec(2000, 10.0), history, spec=HIGHER).stop is True


# --- non-finite losses ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("result", "shown"),
    [
        (StepResult(loss=float("nan")), "loss=nan"),
        (StepResult(loss=float("inf"), metrics={"kd": float("nan"), "ce": 2.0}), "loss=inf, kd=nan"),
        (StepResult(loss=1.5, metrics={"ce": float("-inf")}), "ce=-inf"),
    ],
)
def test_a_non_finite_loss_requests_a_rollback_to_the_last_checkpoint(
    tmp_path: Path, result: StepResult, shown: str
) -> None:
    state = state_for(tmp_path)
    state.step = 7
    Guard().cvmkd_step_end(state=state, result=result)
    assert state.pending_rollback == Rollback(
        reason=f"non-finite training loss at step 7 ({shown})", target="last", lr_factor=0.5
    )


def test_finite_losses_other_metrics_and_the_switch(tmp_path: Path) -> None:
    state = state_for(tmp_path)
    Guard().cvmkd_step_end(state=state, result=StepResult(loss=1.0, metrics={"kd": 2.0, "grad_norm": float("nan")}))
    assert state.pending_rollback is None  # grad_norm is not a loss
    Guard(GuardConfig(nonfinite=False)).cvmkd_step_end(state=state, result=StepResult(loss=float("nan")))
    assert state.pending_rollback is None


def test_a_non_finite_loss_at_the_limit_stops(tmp_path: Path) -> None:
    state = state_for(tmp_path)
    state.step, state.rollbacks = 12, 3
    Guard().cvmkd_step_end(state=state, result=StepResult(loss=float("nan")))
    decision = state.pending_rollback
    assert decision is not None and decision.stop and decision.target == "best"
    assert decision.reason.startswith(
        "non-finite training loss at step 12 (loss=nan); rollback limit reached (3 rollbacks"
    )


# --- saved state ---------------------------------------------------------------------------------


def test_the_downward_count_is_checkpointed_resumed_and_reset_by_a_rollback() -> None:
    guard = Guard(GuardConfig(threshold=0.5, patience=3))
    run(guard, [50.0, 49.0, 48.0, 47.0])
    assert guard.downward_streak == 2
    payload = NamedStash()
    guard.cvmkd_checkpoint(payload=payload)
    buffer = io.BytesIO()
    torch.save(payload.to_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["guard"] == {"downward_streak": 2}
    loaded = NamedStash.from_dict(saved)

    resumed = Guard(GuardConfig(threshold=0.5, patience=3))
    resumed.cvmkd_restore(payload=loaded, reason="resume")
    assert resumed.downward_streak == 2
    # one more downward validation after resuming is the third in a row
    history = [rec(s, v) for s, v in ((1000, 50.0), (2000, 49.0), (3000, 48.0), (4000, 47.0))]
    assert resumed.judge(rec(5000, 46.0), history, spec=HIGHER) is not None
    resumed.cvmkd_restore(payload=loaded, reason="rollback")
    assert resumed.downward_streak == 0
    resumed.cvmkd_restore(payload=NamedStash(), reason="resume")  # a checkpoint written without the guard
    assert resumed.downward_streak == 0


# --- settings and the watched key ----------------------------------------------------------------


def test_settings_are_validated() -> None:
    assert structure({}, GuardConfig) == GuardConfig()
    with pytest.raises(RecipeError) as caught:
        structure(
            {
                "lr_factor": 0.0,
                "trend_window": 1,
                "patience": 0,
                "target": "worst",
                "max_rollbacks": -1,
                "retention_threshold": 0.0,
                "gate_scores": [],
                "threshold": "5%",
            },
            GuardConfig,
            "guard",
        )
    text = str(caught.value)
    for expected in (
        "guard.lr_factor: must be in (0, 1], got 0.0",
        "guard.trend_window: must be >= 2, got 1",
        "guard.patience: must be >= 1, got 0",
        "guard.target: must be one of 'best', 'last', got 'worst'",
        "guard.max_rollbacks: must be >= 0, got -1",
        "guard.retention_threshold: must be > 0, got 0.0",
        "guard.gate_scores: must not be empty",
        "guard.threshold: expected a number, got string '5%'",
    ):
        assert expected in text, (expected, text)


def test_a_recipe_selects_the_guard_with_its_settings(tmp_path: Path) -> None:
    import cvmkd_guard

    plugins = toy_plugin_manager()
    plugins.add_plugin(cvmkd_guard, name="guard", source="test")
    path = tmp_path / "recipe.toml"
    path.write_text(TOY_RECIPE + '\n[guard]\nname = "guard"\nscore = "exact"\nthreshold = 0.1\n')
    recipe = load_recipe(path, registry=plugins.registry)
    assert recipe.guard.config == GuardConfig(score="exact", threshold=0.1)
    path.write_text(TOY_RECIPE + '\n[guard]\nname = "guard"\nthreshhold = 0.1\n')
    with pytest.raises(RecipeError, match="guard: unknown key 'threshhold'"):
        load_recipe(path, registry=plugins.registry)


def test_the_watched_and_gated_scores_must_exist(tmp_path: Path) -> None:
    state = state_for(tmp_path)
    state.recipe = Recipe(sections={"validation": ValidationConfig(metrics=[component_ref("metric")(name="exact")])})
    state.components["validation.metrics[0]"] = ExactMatch()
    with pytest.raises(MetricError) as caught:
        Guard(GuardConfig(score="bleu")).cvmkd_check(state=state)
    assert str(caught.value) == "guard.score: no selected metric returns 'bleu'; available scores: exact, composite"
    with pytest.raises(
        MetricError, match=r"^guard.gate_scores: no selected metric returns 'bleu'; available scores: exact, composite$"
    ):
        Guard(GuardConfig(score="exact")).cvmkd_check(state=state)
    guard = Guard(GuardConfig(score="exact", gate_scores=["composite"]))
    guard.cvmkd_check(state=state)
    assert guard.spec == ExactMatch.scores["exact"]


def test_losses_of_other_number_types_are_read(tmp_path: Path) -> None:
    state = state_for(tmp_path)
    Guard().cvmkd_step_end(state=state, result=StepResult(loss=torch.tensor(1.5), metrics={"kd": torch.tensor(0.5)}))
    assert state.pending_rollback is None
    Guard().cvmkd_step_end(state=state, result=StepResult(loss=1.0, metrics={"kd": torch.tensor(float("nan"))}))
    assert state.pending_rollback is not None and state.pending_rollback.reason.endswith("(kd=nan)")
