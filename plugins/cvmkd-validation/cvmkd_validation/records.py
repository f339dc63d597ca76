"""What a distillation run's evaluation hands to the plugins after it: the translations one
validation analyses, the test evaluation and the retention gate's verdict, and the typed keys
they are shared under (``state.stash``, ``summary.results``)."""

from __future__ import annotations

from typing import Any

import attrs

from cvmkd_core.stash import StashKey


@attrs.frozen
class TranslationSample:
    """One validation's translations, as ``cvmkd_analyze`` sees them (all lists aligned)."""

    step: int
    sources: list[str]
    references: list[str]
    hypotheses: list[str]
    #: the previous validation's hypotheses of the same sentences, or None at the first one
    previous: list[str] | None = None
    previous_step: int | None = None


@attrs.define
class TestEvaluation:
    """The final models scored on the test split (``cvmkd_evaluate``); the full record, with
    translations and the error analysis, is in ``file``."""

    __test__ = False  # not a pytest test class

    split: str
    sentences: int
    beam_size: int
    #: scores of every selected metric and the composite, by model: "student", "teacher"
    scores: dict[str, dict[str, float]]
    #: the student's share of the teacher's normalised score, per score key (None: not measurable)
    retention: dict[str, float | None] = attrs.field(factory=dict)
    #: per score key, the 95% paired bootstrap interval of retention over the test sentences
    #: ([low, high]; None where not measurable); the lower end is what a gate may read
    retention_interval: dict[str, list[float] | None] = attrs.field(factory=dict)
    file: str | None = None


@attrs.define
class GateVerdict:
    """The retention gate's decision on the final models (``cvmkd_finalize``). ``passed`` is
    None when there was nothing to judge; ``verdict`` says why, in one line."""

    passed: bool | None
    verdict: str
    threshold: float | None = None
    scores: list[str] = attrs.field(factory=list)
    #: one check per model and score: {"model", "score", "retention", "passed"}, and the 95%
    #: interval's "lower_bound" and "upper_bound" where it was measured
    checks: list[dict[str, Any]] = attrs.field(factory=list)
    #: what the threshold was held against: "point" (the retention) or "lower_bound"
    gate_on: str = "point"
    #: False: a failed gate is reported but does not fail the run (exit status 0)
    enforced: bool = True


# Entries of summary.json (``summary[KEY]``), written under these names.
#: the final models on the test split (``cvmkd_evaluate``)
EVALUATION: StashKey[TestEvaluation | None] = StashKey("evaluation", lambda: None)
#: every quantized variant of the final model, accepted or not (``cvmkd_quantize``)
QUANTIZED: StashKey[list[dict[str, Any]]] = StashKey("quantized", list)
#: the retention gate's verdict (the guard's ``cvmkd_finalize``)
GATE: StashKey[GateVerdict | None] = StashKey("gate", lambda: None)

# Shared during a run (``state.stash[KEY]``).
#: the whole test evaluation, as written to ``evaluation.json``
EVALUATION_RECORD: StashKey[dict[str, Any]] = StashKey("evaluation_record")

__all__ = [
    "EVALUATION",
    "EVALUATION_RECORD",
    "GATE",
    "GateVerdict",
    "QUANTIZED",
    "TestEvaluation",
    "TranslationSample",
]
