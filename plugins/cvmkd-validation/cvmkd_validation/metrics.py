"""How scores are read: the metric contract (:class:`Metric`, with its optional methods in
:class:`SentenceMetric` and :class:`PairedTestMetric`), each score's declared direction and
range, the composite score, and retention against the teacher.

A metric component declares every key its ``score`` returns::

    class MyMetric:
        scores = {"my_score": ScoreSpec(higher_is_better=True, low=0.0, high=100.0)}

        def score(self, hypotheses, references, sources) -> dict[str, float]: ...

Two optional methods make a metric cheaper or testable for significance:

``sentence_scores(hypotheses, references, sources) -> dict[str, list[float]]``
    one value per sentence and key, whose mean *is* the corpus score (ROUGE, BERTScore). When a
    metric has it, validation calls it instead of ``score`` and keeps the sentence scores, so the
    paired bootstrap test against the previous validation costs no extra scoring.
``paired_test(baseline, hypotheses, references, sources, *, samples) -> dict[str, dict]``
    for corpus-level metrics (BLEU): per key, at least ``p_value``; how ``hypotheses`` differ from
    ``baseline`` beyond chance.

Normalisation maps a score into [0, 1] where 1 is best: ``(v - low) / (high - low)`` when higher
is better, ``(high - v) / (high - low)`` otherwise, clamped (TER above 100 counts as 0).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import attrs

from cvmkd_validation.errors import MetricError

COMPOSITE = "composite"


@runtime_checkable
class Metric(Protocol):
    """A metric component: ``scores`` declares every key ``score`` returns."""

    scores: Mapping[str, ScoreSpec]

    def score(self, hypotheses: list[str], references: list[str], sources: list[str]) -> dict[str, float]: ...


@runtime_checkable
class SentenceMetric(Protocol):
    """A metric whose corpus score is the mean of sentence scores (ROUGE, BERTScore); validation
    calls ``sentence_scores`` instead of ``score`` and keeps them for its paired test."""

    def sentence_scores(
        self, hypotheses: list[str], references: list[str], sources: list[str]
    ) -> dict[str, list[float]]: ...


@runtime_checkable
class PairedTestMetric(Protocol):
    """A corpus-level metric with its own significance test against a baseline (BLEU)."""

    def paired_test(
        self, baseline: list[str], hypotheses: list[str], references: list[str], sources: list[str], *, samples: int
    ) -> dict[str, dict[str, Any]]: ...


@runtime_checkable
class ResampledMetric(Protocol):
    """A corpus-level metric that scores resamples of the sentences (BLEU from sacrebleu's
    sufficient statistics): the bootstrap interval of retention needs each resample's score.
    ``indices`` is a (samples, sentences) array of sentence indices; the result holds, per key,
    one score per row. Sentence metrics need no such method: their resample is a mean."""

    def resampled_scores(
        self, hypotheses: list[str], references: list[str], sources: list[str], indices: Any
    ) -> dict[str, list[float]]: ...


@attrs.frozen
class ScoreSpec:
    """How to read one score: which way is better and the range used to normalise it."""

    higher_is_better: bool = True
    low: float = 0.0
    high: float = 100.0
    description: str = ""

    def __attrs_post_init__(self) -> None:
        if not self.high > self.low:
            raise ValueError(f"score range must have high > low, got [{self.low}, {self.high}]")

    def normalise(self, value: float) -> float:
        """``value`` on [0, 1], 1 being best; values outside the range are clamped."""
        share = (value - self.low) / (self.high - self.low)
        if not self.higher_is_better:
            share = 1.0 - share
        return min(1.0, max(0.0, share))

    def better(self, a: float, b: float) -> bool:
        """Whether ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b


#: the composite score's own spec: a weighted mean of normalised scores, times 100
COMPOSITE_SPEC = ScoreSpec(True, 0.0, 100.0, "weighted mean of the normalised metric scores, 0-100")


def metric_specs(metric: Any) -> dict[str, ScoreSpec]:
    """The keys a metric component declares, with their specs. A metric that only has the older
    ``higher_is_better`` mapping gets the default 0-100 range."""
    declared = getattr(metric, "scores", None)
    if isinstance(declared, Mapping):
        return {str(k): v if isinstance(v, ScoreSpec) else ScoreSpec(**v) for k, v in declared.items()}
    higher = getattr(metric, "higher_is_better", None)
    if isinstance(higher, Mapping):
        return {str(k): ScoreSpec(bool(v)) for k, v in higher.items()}
    return {}


def all_specs(metrics: Iterable[tuple[str, Any]]) -> dict[str, ScoreSpec]:
    """Specs of every key of the given ``(path, metric)`` pairs, plus the composite's."""
    specs: dict[str, ScoreSpec] = {}
    for _, metric in metrics:
        specs.update(metric_specs(metric))
    specs[COMPOSITE] = COMPOSITE_SPEC
    return specs


def composite_weights(configured: Mapping[str, float], specs: Mapping[str, ScoreSpec], where: str) -> dict[str, float]:
    """The composite's weights: the recipe's, checked against the declared keys, or equal
    weights over every declared key when the recipe gives none."""
    keys = [k for k in specs if k != COMPOSITE]
    if not configured:
        return {k: 1.0 for k in keys}
    unknown = sorted(set(configured) - set(keys))
    if unknown:
        raise MetricError(
            f"{where}: no selected metric returns {', '.join(map(repr, unknown))}; "
            f"available scores: {', '.join(keys) or 'none'}"
        )
    if sum(configured.values()) <= 0:
        raise MetricError(f"{where}: weights must add up to more than 0")
    return {k: float(w) for k, w in configured.items() if w > 0}


def composite(
    scores: Mapping[str, float], weights: Mapping[str, float], specs: Mapping[str, ScoreSpec]
) -> float | None:
    """Weighted mean of the normalised scores, on 0-100; None when a weighted score is missing."""
    total = sum(weights.values())
    if total <= 0 or any(k not in scores for k in weights):
        return None
    return 100.0 * sum(w * specs[k].normalise(scores[k]) for k, w in weights.items()) / total


def retention(
    student: Mapping[str, float], teacher: Mapping[str, float], specs: Mapping[str, ScoreSpec]
) -> dict[str, float | None]:
    """Per key, the student's normalised score over the teacher's: 1.0 means "as good as the
    teacher", for TER as for BLEU. None where the teacher's normalised score is 0."""
    shares: dict[str, float | None] = {}
    for key, value in student.items():
        if key not in teacher or key not in specs:
            continue
        spec = specs[key]
        reference = spec.normalise(teacher[key])
        shares[key] = spec.normalise(value) / reference if reference > 0 else None
    return shares


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


__all__ = [
    "COMPOSITE",
    "COMPOSITE_SPEC",
    "ScoreSpec",
    "all_specs",
    "composite",
    "composite_weights",
    "metric_specs",
    "retention",
]
