"""cvmkd-guard: the degradation detector ``guard`` and the retention gate.

Selected in a recipe as the ``[guard]`` component; every key is optional (defaults shown)::

    [guard]
    name = "guard"
    score = "composite"          # the score watched: any score key of the selected metrics
    threshold = 0.05             # degraded: worse than the best accepted validation by > 5% of it
    trend_window = 3             # validations in the trend's least-squares fit, the current one included
    trend_tolerance = 0.01       # a validation is "downward" when the fit loses > 1% of the mean per validation
    patience = 2                 # degraded: this many downward validations in a row
    nonfinite = true             # a NaN/inf training loss rolls back to the last checkpoint at once
    target = "best"              # what a degradation rolls back to: "best" or "last" checkpoint
    lr_factor = 0.5              # the learning rate is multiplied by this at every rollback
    max_rollbacks = 3            # once reached, the next degradation restores the best and stops the run
    retention_threshold = 0.90   # the gate: the student keeps >= 90% of the teacher's (normalised) score
    gate_scores = ["composite", "bleu"]   # ... on each of these scores of the test split
    gate_action = "fail"         # a failed gate: exit status 3 ("fail") or a warning only ("warn")

**After each validation** (``cvmkd_check_degradation``) the watched score is compared with the
earlier *accepted* validations (records with ``rolled_back = true`` are ignored). Direction comes
from the score's :class:`~cvmkd_validation.metrics.ScoreSpec`: for a lower-is-better score such as TER,
worse means higher. Two rules, either of which asks for a rollback:

- *relative drop*: the score is worse than the best accepted validation's by more than
  ``threshold × |best|``;
- *trend*: the least-squares slope of the score over the last ``trend_window`` accepted
  validations (the current one included), divided by the absolute mean of those values, is worse
  than ``-trend_tolerance``: the validation is "downward"; ``patience`` downward validations in
  a row degrade. The counter is saved in every checkpoint (``payload["guard"]``), restored on
  ``--resume`` and reset to zero by a rollback.

The first validation never degrades (there is nothing to compare it with). A non-finite watched
score degrades too. Rollbacks go to ``target`` with the learning rate times ``lr_factor``. Note
that the core's checkpoint manifest ranks checkpoints by the composite score: ``target = "best"``
restores the best-*composite* checkpoint, which is the guard's best only while it watches
``composite`` (or a score that moves with it).

**Between validations** (``cvmkd_step_end``), with ``nonfinite = true``, a non-finite
``StepResult.loss`` or a non-finite ``loss``, ``kd`` or ``ce`` in the step's metrics asks the
loop for a rollback to the *last* checkpoint (``state.request_rollback``), performed right after
that step, before the next one runs. Before the first checkpoint there is nothing to go back to:
the loop then stops the run and says why.

**The limit**: ``max_rollbacks`` counts every rollback of the run (``state.rollbacks``), the
non-finite ones included. When it is reached, the next degradation returns
``Rollback(stop=True)`` to the best checkpoint: the loop restores it and stops the run, and
``summary.json`` says why (``extra.stop_reason``). ``max_rollbacks = 0`` stops at the first
degradation. The stopping rollback is itself counted, so ``summary.rollbacks`` is then
``max_rollbacks + 1``.

**Steps and iterations.** A rollback sets ``state.step`` back to the restored checkpoint's step,
while ``state.iterations`` keeps counting every iteration executed (it never decreases). The loop
runs until ``state.step`` reaches ``run.steps``, so a run with rollbacks executes more iterations
than ``run.steps``: rolling back from step 9 to step 6 of a 12-step run costs 3 more iterations,
15 in all. ``summary.json`` states both, ``final_step`` (the training steps of the weights the
run ended with) and ``iterations_executed``; validation records and checkpoint names carry both
too (``step_00000009_it00000009_rolled_back.json``, then ``step_00000009_it00000012.json``).

**The retention gate** (``cvmkd_finalize``, the phase after the test evaluation and the
quantization) reads ``summary[EVALUATION].retention``, the student's share of the teacher's
normalised score per key (1.0: as good as the teacher), and every accepted quantized model's
``summary[QUANTIZED][i]["retention"]``. It passes when
each checked retention of ``gate_scores`` is at least ``retention_threshold``; a retention that
cannot be measured (the teacher's normalised score is 0) is listed and not counted. It writes::

    summary[GATE] = GateVerdict(threshold=0.9, scores=["composite", "bleu"], passed=True,
                               checks=[{"model": "student", "score": "composite",
                                        "retention": 1.01, "passed": True}, ...],
                               verdict="retention gate passed: ...")

and logs the verdict. ``passed`` is None when there is no evaluation to judge (the run failed,
was interrupted or stopped before it, or the trainer does not score a test split); the verdict
says why. When ``passed`` is false it adds a failed, enforced ``Verdict`` to ``summary.verdicts``:
``cvmkd run`` prints it and exits with status 3; every output is kept. With
``gate_action = "warn"`` the verdict is recorded as well (``enforced`` false) and the run exits 0.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from cvmkd_core.config import ConfigValueError, ge, gt, non_empty, one_of
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.stash import NamedStash, StashKey
from cvmkd_core.state import STOP_REASON, Rollback, RunState, RunSummary, StepResult, ValidationRecord, Verdict
from cvmkd_validation.errors import MetricError
from cvmkd_validation.metrics import ScoreSpec
from cvmkd_validation.records import EVALUATION, GATE, QUANTIZED, GateVerdict
from cvmkd_validation.validation import score_specs

__version__ = "0.1.0"

log = logging.getLogger("cvmkd")

#: the step metrics that are losses: a non-finite value in any of them is a non-finite loss
LOSS_KEYS: tuple[str, ...] = ("loss", "kd", "ce")
#: the guard's key in checkpoint payloads
CHECKPOINT_KEY: StashKey[dict[str, Any]] = StashKey("guard")


def _unit_interval(_instance: Any, _attribute: Any, value: float) -> None:
    if value is not None and not 0 < value <= 1:
        raise ConfigValueError(f"must be in (0, 1], got {value!r}")


@attrs.frozen
class GuardConfig:
    """The ``[guard]`` section (``name = "guard"``)::

    [guard]
    name = "guard"
    score = "composite"
    threshold = 0.05
    trend_window = 3
    trend_tolerance = 0.01
    patience = 2
    nonfinite = true
    target = "best"
    lr_factor = 0.5
    max_rollbacks = 3
    retention_threshold = 0.90
    gate_scores = ["composite", "bleu"]
    gate_action = "fail"
    gate_on = "point"
    """

    score: str = "composite"
    """the score watched; direction and range from its metric's ScoreSpec"""
    threshold: float = attrs.field(default=0.05, validator=ge(0))
    """degraded when worse than the best accepted validation by more than threshold × |best|"""
    trend_window: int = attrs.field(default=3, validator=ge(2))
    """accepted validations in the trend's least-squares fit, the current one included"""
    trend_tolerance: float = attrs.field(default=0.01, validator=ge(0))
    """downward when the normalised slope is worse than -trend_tolerance per validation"""
    patience: int = attrs.field(default=2, validator=ge(1))
    """degraded after this many downward validations in a row"""
    nonfinite: bool = True
    """roll back to the last checkpoint when a training loss is NaN or infinite"""
    target: str = attrs.field(default="best", validator=one_of("best", "last"))
    """the checkpoint a degradation rolls back to"""
    lr_factor: float = attrs.field(default=0.5, validator=_unit_interval)
    """the learning-rate scale is multiplied by this at every rollback"""
    max_rollbacks: int = attrs.field(default=3, validator=ge(0))
    """once the run has rolled back this often, the next degradation restores the best and stops"""
    retention_threshold: float = attrs.field(default=0.90, validator=gt(0))
    """the gate passes when every checked retention is at least this"""
    gate_scores: list[str] = attrs.field(factory=lambda: ["composite", "bleu"], validator=non_empty)
    """the scores whose test-split retention the gate checks"""
    gate_action: str = attrs.field(default="fail", validator=one_of("fail", "warn"))
    """what a failed gate does: ``fail``: ``cvmkd run`` exits with status 3; ``warn``: the verdict
    is logged and recorded as always, and the run exits 0 (demonstrations too short to pass)"""
    gate_on: str = attrs.field(default="point", validator=one_of("point", "lower_bound"))
    """what the threshold is held against: ``point``, the retention measured on the test split;
    ``lower_bound``, the lower end of its 95% paired bootstrap interval over the test sentences
    (``[validation] retention_samples``): the gate then passes only when the student keeps the
    threshold with 97.5% confidence, whatever the luck of the test sentences"""


# --- the decisions, as plain functions ----------------------------------------------------------


def normalised_slope(values: Sequence[float]) -> float | None:
    """Least-squares slope of ``values`` per validation, divided by ``|mean|``; None for fewer
    than two values. When the mean is 0 the raw slope is returned (0 for a flat line)."""
    n = len(values)
    if n < 2:
        return None
    x_mean = (n - 1) / 2
    y_mean = sum(values) / n
    sxx = sum((i - x_mean) ** 2 for i in range(n))
    sxy = sum((i - x_mean) * (v - y_mean) for i, v in enumerate(values))
    slope = sxy / sxx
    return slope / abs(y_mean) if y_mean != 0 else slope


def best_record(records: Sequence[ValidationRecord], key: str, spec: ScoreSpec) -> ValidationRecord | None:
    """The record with the best ``key`` (the earliest of equal ones)."""
    best: ValidationRecord | None = None
    for record in records:
        if best is None or spec.better(record.scores[key], best.scores[key]):
            best = record
    return best


def _percent(share: float) -> str:
    return f"{100 * share:g}%"


def _number(value: Any) -> float | None:
    """``value`` as a float (a numpy scalar or a 0-d tensor too), or None when it is not a number."""
    if value is None or isinstance(value, (bool, str)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError):
        return None


def _finite(value: Any) -> bool:
    number = _number(value)
    return number is not None and math.isfinite(number)


def check_score_keys(config: GuardConfig, specs: Mapping[str, ScoreSpec]) -> None:
    """``guard.score`` and ``guard.gate_scores`` must name scores the selected metrics return."""
    available = ", ".join(specs) or "none"
    if config.score not in specs:
        raise MetricError(f"guard.score: no selected metric returns {config.score!r}; available scores: {available}")
    unknown = [k for k in config.gate_scores if k not in specs]
    if unknown:
        raise MetricError(
            f"guard.gate_scores: no selected metric returns {', '.join(map(repr, unknown))}; "
            f"available scores: {available}"
        )


# --- the retention gate -------------------------------------------------------------------------


def _one_line(text: Any, limit: int = 200) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _not_evaluated_reason(status: str, extra: Mapping[str, Any], error: str | None) -> str:
    if status == "interrupted":
        return "the run was interrupted"
    if status == "failed":
        return f"the run failed ({_one_line(error)})" if error else "the run failed"
    if status == "stopped":
        stop = extra.get("stop_reason")
        why = f"the run stopped ({_one_line(stop)})" if stop else "the run stopped"
        return f"{why} and the summary holds no test evaluation"
    if status != "completed":
        return f"the run ended {status!r} without a test evaluation"
    return "no test evaluation in the summary (the trainer does not score a test split)"


def _checks(
    model: str, retention: Any, scores: Sequence[str], threshold: float, interval: Any = None, gate_on: str = "point"
) -> list[dict[str, Any]]:
    checks = []
    for key in scores:
        share = retention.get(key) if isinstance(retention, Mapping) else None
        check: dict[str, Any] = {"model": model, "score": key}
        number = _number(share)
        bounds = interval.get(key) if isinstance(interval, Mapping) else None
        low = _number(bounds[0]) if isinstance(bounds, (list, tuple)) and len(bounds) == 2 else None
        high = _number(bounds[1]) if isinstance(bounds, (list, tuple)) and len(bounds) == 2 else None
        if number is not None and math.isfinite(number):  # _finite(share), keeping the float
            check.update(retention=number)
            if low is not None and high is not None:
                check.update(lower_bound=low, upper_bound=high)
            judged = low if gate_on == "lower_bound" else number
            if judged is None:
                check.update(passed=None, note="no bootstrap interval measured ([validation] retention_samples = 0?)")
            else:
                check.update(passed=judged >= threshold)
        else:
            present = isinstance(retention, Mapping) and key in retention
            check.update(
                retention=None,
                passed=None,
                note="not measurable: the teacher's normalised score is 0" if present else "not measured",
            )
        checks.append(check)
    return checks


def _shown(check: Mapping[str, Any], on_bound: bool) -> str:
    """A check's retention with its interval: ``91.2% (95% interval 89.8-92.6%)``, or, gating on
    the bound, ``91.2% (lower 95% bound 89.8%)``."""
    text = f"{check['retention']:.1%}"
    if "lower_bound" not in check:
        return text
    if on_bound:
        return f"{text} (lower 95% bound {check['lower_bound']:.1%})"
    return f"{text} (95% interval {100 * check['lower_bound']:.1f}-{check['upper_bound']:.1%})"


def retention_gate(
    extra: Mapping[str, Any],
    *,
    status: str = "completed",
    error: str | None = None,
    threshold: float = 0.9,
    scores: Sequence[str] = ("composite", "bleu"),
    gate_on: str = "point",
) -> dict[str, Any]:
    """The gate's verdict on a summary's ``extra``: the student's retention in
    ``extra["evaluation"]["retention"]`` and every ``extra["quantized"][i]["retention"]``, with
    their 95% intervals (``retention_interval``); ``gate_on = "lower_bound"`` holds the
    threshold against the intervals' lower ends."""
    gate: dict[str, Any] = {
        "threshold": threshold,
        "scores": list(scores),
        "passed": None,
        "checks": [],
        "gate_on": gate_on,
    }
    evaluation = extra.get("evaluation")
    if not isinstance(evaluation, Mapping) or not isinstance(evaluation.get("retention"), Mapping):
        why = _not_evaluated_reason(status, extra, error)
        if isinstance(evaluation, Mapping):
            why = "the test evaluation holds no retention"
        gate["verdict"] = f"retention gate not evaluated: {why}"
        return gate

    models: list[tuple[str, Any, Any]] = [("student", evaluation["retention"], evaluation.get("retention_interval"))]
    quantized = extra.get("quantized")
    if quantized is not None:
        entries = quantized if isinstance(quantized, list) else [quantized]
        for index, entry in enumerate(entries):
            entry = entry if isinstance(entry, Mapping) else {}
            name = str(entry.get("name") or f"quantized[{index}]")
            models.append((name, entry.get("retention"), entry.get("retention_interval")))
    checks = [
        c
        for model, retention, interval in models
        for c in _checks(model, retention, scores, threshold, interval, gate_on)
    ]
    gate["checks"] = checks

    measured = [c for c in checks if c["passed"] is not None]
    unmeasured = [f"{c['model']} {c['score']}" for c in checks if c["passed"] is None]
    names = [m for m, _, _ in models]
    who = "the student keeps" if len(names) == 1 else f"the student and quantized {', '.join(names[1:])} keep"
    if not measured:
        gate["verdict"] = f"retention gate not evaluated: no retention measured ({', '.join(unmeasured)})"
        return gate
    failed = [c for c in measured if not c["passed"]]
    gate["passed"] = not failed
    on_bound = gate_on == "lower_bound"
    if failed:
        shown = ", ".join(f"{c['model']} {c['score']} {_shown(c, on_bound)}" for c in failed)
        verdict = f"retention gate failed: {shown} of the teacher, below the threshold {_percent(threshold)}"
    else:
        lowest = min(measured, key=lambda c: c["lower_bound"] if on_bound else c["retention"])
        verdict = (
            f"retention gate passed: {who} at least {_percent(threshold)} of the teacher on "
            f"{', '.join(scores)}{' at the lower 95% bound' if on_bound else ''} (lowest: {lowest['model']} "
            f"{lowest['score']} {_shown(lowest, on_bound)})"
        )
    if unmeasured:
        verdict += f"; not measured: {', '.join(unmeasured)}"
    gate["verdict"] = verdict
    return gate


# --- the component ------------------------------------------------------------------------------


class Guard:
    """Rolls back on a relative drop, a downward trend or a non-finite loss; gates retention at the end."""

    def __init__(self, config: GuardConfig | None = None) -> None:
        self.config = config if config is not None else GuardConfig()
        self.spec: ScoreSpec | None = None
        #: consecutive downward validations (the trend rule); saved in checkpoints
        self.downward_streak = 0

    # --- the decision after a validation ------------------------------------------------------

    def judge(
        self,
        record: ValidationRecord,
        history: Sequence[ValidationRecord],
        *,
        spec: ScoreSpec,
        rollbacks: int = 0,
    ) -> Rollback | None:
        """Decide on ``record`` given the earlier records; updates the downward counter."""
        cfg = self.config
        key = cfg.score
        value = record.scores.get(key)
        accepted = [r for r in history if not r.rolled_back and _finite(r.scores.get(key))]
        if value is None:
            log.warning("guard: the validation at step %d has no %r score; accepted unchecked", record.step, key)
            return None
        if not accepted:
            self.downward_streak = 0
            log.info("guard: step %d: %s %.2f, the first validation: accepted", record.step, key, value)
            return None

        reasons: list[str] = []
        slope: float | None = None
        if not math.isfinite(value):
            reasons.append(f"{key} is {value} at step {record.step}")
        else:
            best = best_record(accepted, key, spec)
            assert best is not None
            best_value = best.scores[key]
            worse_by = (best_value - value) if spec.higher_is_better else (value - best_value)
            if worse_by > cfg.threshold * abs(best_value):
                side = "below" if spec.higher_is_better else "above"
                how = f"{100 * worse_by / abs(best_value):.1f}% {side}" if best_value != 0 else f"{worse_by:.2f} {side}"
                lower = "; lower is better" if not spec.higher_is_better else ""
                reasons.append(
                    f"{key} {value:.2f} is {how} the best ({best_value:.2f} at step {best.step}{lower}; "
                    f"threshold {_percent(cfg.threshold)})"
                )
            window = [r.scores[key] for r in accepted[-(cfg.trend_window - 1) :]] + [value]
            if len(window) >= cfg.trend_window:
                slope = normalised_slope(window)
            worsening = None if slope is None else (-slope if spec.higher_is_better else slope)
            downward = worsening is not None and worsening > cfg.trend_tolerance
            self.downward_streak = self.downward_streak + 1 if downward else 0
            if self.downward_streak >= cfg.patience:
                assert slope is not None
                direction = "down" if spec.higher_is_better else "up (lower is better)"
                run = (
                    "at this validation"
                    if self.downward_streak == 1
                    else f"for {self.downward_streak} validations in a row"
                )
                reasons.append(
                    f"{key} trending {direction} over the last {cfg.trend_window} validations "
                    f"(slope {100 * slope:+.1f}%/validation) {run}"
                )

        if not reasons:
            trend = f", trend {100 * slope:+.1f}%/validation" if slope is not None else ""
            streak = f", downward {self.downward_streak} of {cfg.patience}" if self.downward_streak else ""
            log.info("guard: step %d: %s %.2f accepted%s%s", record.step, key, value, trend, streak)
            return None
        decision = self._decision("; ".join(reasons), rollbacks, target=cfg.target)
        log.warning("guard: step %d: %s", record.step, decision.reason)
        return decision

    def _decision(self, reason: str, rollbacks: int, *, target: str) -> Rollback:
        """A rollback to ``target``, or, once ``max_rollbacks`` is reached, the stopping one."""
        cfg = self.config
        if rollbacks >= cfg.max_rollbacks:
            return Rollback(
                reason=(
                    f"{reason}; rollback limit reached ({rollbacks} rollbacks, max_rollbacks = "
                    f"{cfg.max_rollbacks}): restoring the best checkpoint and stopping"
                ),
                target="best",
                lr_factor=1.0,
                stop=True,
            )
        return Rollback(reason=reason, target=target, lr_factor=cfg.lr_factor)

    # --- hooks --------------------------------------------------------------------------------

    @hookimpl
    def cvmkd_check(self, state: RunState) -> None:
        # before the trainer's set-up, which may train a teacher first: a wrong key fails at once
        specs = score_specs(state)
        check_score_keys(self.config, specs)
        self.spec = specs[self.config.score]
        self.downward_streak = 0

    @hookimpl
    def cvmkd_step_end(self, state: RunState, result: StepResult) -> None:
        if not self.config.nonfinite:
            return
        bad: dict[str, float] = {}
        for key, value in [("loss", result.loss), *((k, result.metrics.get(k)) for k in LOSS_KEYS)]:
            number = _number(value)
            if number is not None and not math.isfinite(number) and key not in bad:
                bad[key] = number
        if not bad:
            return
        values = ", ".join(f"{k}={v}" for k, v in bad.items())
        reason = f"non-finite training loss at step {state.step} ({values})"
        decision = self._decision(reason, state.rollbacks, target="last")
        log.error("guard: %s", decision.reason)
        state.request_rollback(decision)

    @hookimpl
    def cvmkd_check_degradation(
        self, state: RunState, record: ValidationRecord, history: list[ValidationRecord]
    ) -> Rollback | None:
        spec = self.spec
        if spec is None:
            spec = score_specs(state).get(self.config.score, ScoreSpec())
        return self.judge(record, history, spec=spec, rollbacks=state.rollbacks)

    @hookimpl
    def cvmkd_checkpoint(self, payload: NamedStash) -> None:
        payload[CHECKPOINT_KEY] = {"downward_streak": int(self.downward_streak)}

    @hookimpl
    def cvmkd_restore(self, payload: NamedStash, reason: str) -> None:
        if reason == "rollback":
            self.downward_streak = 0
            return
        saved = payload.get(CHECKPOINT_KEY, None)
        self.downward_streak = int(saved.get("downward_streak", 0)) if isinstance(saved, Mapping) else 0

    @hookimpl
    def cvmkd_finalize(self, summary: RunSummary) -> None:
        # the finalize phases before this one scored the test split and quantized the student
        evaluation = summary[EVALUATION]
        judged = {
            "evaluation": (
                {"retention": evaluation.retention, "retention_interval": evaluation.retention_interval}
                if evaluation is not None
                else None
            ),
            "quantized": [q for q in summary[QUANTIZED] if q.get("accepted")],
            "stop_reason": summary.extra.get(STOP_REASON, None),
        }
        gate = retention_gate(
            judged,
            status=summary.status,
            error=summary.error,
            threshold=self.config.retention_threshold,
            scores=self.config.gate_scores,
            gate_on=self.config.gate_on,
        )
        enforced = self.config.gate_action == "fail"
        summary[GATE] = GateVerdict(**gate, enforced=enforced)
        if gate["passed"] is False:
            log.warning(
                "%s%s", gate["verdict"], "" if enforced else ' (guard.gate_action = "warn": the run does not fail)'
            )
            line = str(gate["verdict"])
            if not line.startswith("retention gate failed"):
                line = f"retention gate failed: {line}"
            if not enforced:
                line += " (a warning only: the recipe does not enforce the gate)"
            summary.verdicts.append(Verdict(line=line, failed=True, enforced=enforced))
        else:
            log.info("%s", gate["verdict"])


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.detector("guard", Guard, config=GuardConfig)


__all__ = [
    "CHECKPOINT_KEY",
    "Guard",
    "GuardConfig",
    "LOSS_KEYS",
    "best_record",
    "check_score_keys",
    "normalised_slope",
    "retention_gate",
]
