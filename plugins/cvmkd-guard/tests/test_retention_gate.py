"""The retention gate on fabricated summaries: the student, quantized models, unmeasurable
retention, and runs without a test evaluation."""

from __future__ import annotations

import logging

import attrs
import pytest

from cvmkd_core.state import RunSummary
from cvmkd_guard import Guard, GuardConfig, retention_gate
from cvmkd_validation.records import EVALUATION, GATE, TestEvaluation


def evaluation(**retention: float | None) -> dict:
    return {
        "split": "test",
        "sentences": 8,
        "student": {"composite": 40.0, "bleu": 20.0},
        "teacher": {"composite": 42.0, "bleu": 22.0},
        "retention": retention,
    }


def test_the_student_passes() -> None:
    gate = retention_gate({"evaluation": evaluation(composite=1.01, bleu=0.95, chrf=0.2)}, threshold=0.9)
    assert gate == {
        "threshold": 0.9,
        "scores": ["composite", "bleu"],
        "passed": True,
        "checks": [
            {"model": "student", "score": "composite", "retention": 1.01, "passed": True},
            {"model": "student", "score": "bleu", "retention": 0.95, "passed": True},
        ],
        "gate_on": "point",
        "verdict": "retention gate passed: the student keeps at least 90% of the teacher on composite, bleu "
        "(lowest: student bleu 95.0%)",
    }


def test_the_interval_is_reported_beside_the_point_and_the_gate_can_hold_its_lower_end() -> None:
    measured = {
        "retention": {"composite": 0.97, "bleu": 0.92},
        "retention_interval": {"composite": [0.95, 0.99], "bleu": [0.885, 0.951]},
    }
    point = retention_gate({"evaluation": measured}, threshold=0.9)
    assert point["passed"] is True and point["gate_on"] == "point"
    assert point["checks"][1] == {
        "model": "student",
        "score": "bleu",
        "retention": 0.92,
        "lower_bound": 0.885,
        "upper_bound": 0.951,
        "passed": True,
    }
    assert point["verdict"].endswith("(lowest: student bleu 92.0% (95% interval 88.5-95.1%))")
    bound = retention_gate({"evaluation": measured}, threshold=0.9, gate_on="lower_bound")
    assert bound["passed"] is False and [c["passed"] for c in bound["checks"]] == [True, False]
    assert bound["verdict"] == (
        "retention gate failed: student bleu 92.0% (lower 95% bound 88.5%) of the teacher, below the threshold 90%"
    )
    passed = retention_gate({"evaluation": measured}, threshold=0.88, gate_on="lower_bound")
    assert passed["verdict"] == (
        "retention gate passed: the student keeps at least 88% of the teacher on composite, bleu at the lower 95% "
        "bound (lowest: student bleu 92.0% (lower 95% bound 88.5%))"
    )
    # gating on a bound that was not measured judges nothing
    unmeasured = retention_gate({"evaluation": {"retention": measured["retention"]}}, gate_on="lower_bound")
    assert unmeasured["passed"] is None
    assert unmeasured["checks"][0]["note"].startswith("no bootstrap interval measured")


def test_the_student_fails_on_one_score() -> None:
    gate = retention_gate({"evaluation": evaluation(composite=0.93, bleu=0.84)}, threshold=0.9)
    assert gate["passed"] is False
    assert [c["passed"] for c in gate["checks"]] == [True, False]
    assert gate["verdict"] == "retention gate failed: student bleu 84.0% of the teacher, below the threshold 90%"
    # the threshold is inclusive
    assert retention_gate({"evaluation": evaluation(composite=0.9, bleu=0.9)}, threshold=0.9)["passed"] is True


def test_every_quantized_model_is_checked() -> None:
    extra = {
        "evaluation": evaluation(composite=0.97, bleu=0.95),
        "quantized": [
            {"name": "int8", "retention": {"composite": 0.95, "bleu": 0.92}},
            {"name": "int4", "retention": {"composite": 0.80, "bleu": 0.91}},
        ],
    }
    gate = retention_gate(extra, threshold=0.9)
    assert [(c["model"], c["score"], c["passed"]) for c in gate["checks"]] == [
        ("student", "composite", True),
        ("student", "bleu", True),
        ("int8", "composite", True),
        ("int8", "bleu", True),
        ("int4", "composite", False),
        ("int4", "bleu", True),
    ]
    assert gate["passed"] is False
    assert gate["verdict"] == "retention gate failed: int4 composite 80.0% of the teacher, below the threshold 90%"

    extra["quantized"] = extra["quantized"][:1]
    gate = retention_gate(extra, threshold=0.9)
    assert gate["passed"] is True
    assert gate["verdict"] == (
        "retention gate passed: the student and quantized int8 keep at least 90% of the teacher on composite, bleu "
        "(lowest: int8 bleu 92.0%)"
    )


def test_a_quantized_model_without_retention_is_listed_not_counted() -> None:
    extra = {"evaluation": evaluation(composite=0.97, bleu=0.95), "quantized": [{"name": "int8"}]}
    gate = retention_gate(extra, threshold=0.9)
    assert gate["passed"] is True
    assert gate["checks"][2:] == [
        {"model": "int8", "score": "composite", "retention": None, "passed": None, "note": "not measured"},
        {"model": "int8", "score": "bleu", "retention": None, "passed": None, "note": "not measured"},
    ]
    assert gate["verdict"].endswith("; not measured: int8 composite, int8 bleu")


def test_unmeasurable_retention_is_listed_not_counted() -> None:
    # the teacher's normalised BLEU is 0: the student's share of it is undefined (None)
    gate = retention_gate({"evaluation": evaluation(composite=0.95, bleu=None)}, threshold=0.9)
    assert gate["passed"] is True
    assert gate["checks"][1] == {
        "model": "student",
        "score": "bleu",
        "retention": None,
        "passed": None,
        "note": "not measurable: the teacher's normalised score is 0",
    }
    assert gate["verdict"].endswith("; not measured: student bleu")
    gate = retention_gate({"evaluation": evaluation(composite=None, bleu=None)}, threshold=0.9)
    assert gate["passed"] is None
    assert gate["verdict"] == "retention gate not evaluated: no retention measured (student composite, student bleu)"


@pytest.mark.parametrize(
    ("status", "error", "extra", "why"),
    [
        (
            "failed",
            "ModelError: teacher vocabulary (40) differs",
            {},
            "the run failed (ModelError: teacher vocabulary (40) differs)",
        ),
        ("interrupted", "interrupted", {}, "the run was interrupted"),
        (
            "stopped",
            None,
            {"stop_reason": "non-finite training loss at step 3 (loss=nan); no checkpoint to roll back to"},
            "the run stopped (non-finite training loss at step 3 (loss=nan); no checkpoint to roll back to) and the summary "
            "holds no test evaluation",
        ),
        ("completed", None, {}, "no test evaluation in the summary (the trainer does not score a test split)"),
        ("completed", None, {"evaluation": {"split": "test"}}, "the test evaluation holds no retention"),
    ],
)
def test_without_an_evaluation_the_gate_is_not_evaluated(status: str, error: str | None, extra: dict, why: str) -> None:
    gate = retention_gate(extra, status=status, error=error, threshold=0.9)
    assert gate["passed"] is None and gate["checks"] == []
    assert gate["verdict"] == f"retention gate not evaluated: {why}"


def test_the_hook_writes_the_gate_into_the_summary_and_logs_the_verdict(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="cvmkd")
    summary = RunSummary(status="completed")
    summary[EVALUATION] = TestEvaluation(
        split="test",
        sentences=10,
        beam_size=1,
        scores={},
        retention=evaluation(composite=0.97, bleu=0.93)["retention"],
    )
    Guard(GuardConfig(retention_threshold=0.95, gate_scores=["bleu"])).cvmkd_finalize(summary=summary)
    assert summary[GATE] is not None
    gate = attrs.asdict(summary[GATE])
    assert gate["threshold"] == 0.95 and gate["scores"] == ["bleu"] and gate["passed"] is False
    assert gate["verdict"] == "retention gate failed: student bleu 93.0% of the teacher, below the threshold 95%"
    (logged,) = [r for r in caplog.records if r.getMessage() == gate["verdict"]]
    assert logged.levelno == logging.WARNING
