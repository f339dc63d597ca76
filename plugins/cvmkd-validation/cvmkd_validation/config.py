"""The ``[validation]`` section this plugin owns: which metrics score the model, how it decodes,
what each validation record keeps, and the weights of the composite score."""

from __future__ import annotations

from typing import Any

import attrs

from cvmkd_core.config import ConfigValueError, ge, gt
from cvmkd_core.recipe import component_ref

MetricRef = component_ref("metric")


def _weights(instance: Any, attribute: attrs.Attribute, value: dict[str, float]) -> None:
    for key, weight in value.items():
        if weight < 0:
            raise ConfigValueError(f"weight of {key!r} must be >= 0, got {weight!r}")
    if value and sum(value.values()) <= 0:
        raise ConfigValueError("weights must add up to more than 0")


@attrs.frozen
class AnalysisConfig:
    """``[validation.analysis]``: the error analysis stored with every validation record."""

    enabled: bool = True
    worst: int = attrs.field(default=5, validator=ge(0))
    """how many of the worst sentences (by sentence chrF) to keep, with source and reference"""
    examples: int = attrs.field(default=3, validator=ge(0))
    """how many examples to keep of each problem (loops, copies, empty output, regressions)"""
    regression_drop: float = attrs.field(default=20.0, validator=gt(0))
    """a sentence "got clearly worse" when its chrF fell by at least this since the previous validation"""


@attrs.frozen
class ValidationConfig:
    """``[validation]``: which metrics score the student, how it decodes, what is compared."""

    metrics: list[MetricRef] = attrs.field(factory=list)  # type: ignore[valid-type]
    beam_size: int = attrs.field(default=1, validator=gt(0))
    max_sentences: int = attrs.field(default=0, validator=ge(0))
    composite: dict[str, float] = attrs.field(factory=dict, validator=_weights)
    """weights of the composite score over score keys; empty: equal weights over every key"""
    teacher: bool = True
    """score the teacher once on the same sentences, for retention"""
    significance_samples: int = attrs.field(default=1000, validator=ge(0))
    """paired bootstrap resamples against the previous validation; 0: no test"""
    retention_samples: int = attrs.field(default=1000, validator=ge(0))
    """paired bootstrap resamples of the test split for the 95% interval of retention; 0: none"""
    save_hypotheses: bool = True
    analysis: AnalysisConfig = attrs.field(factory=AnalysisConfig)
