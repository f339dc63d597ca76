"""How scores are read: each metric's declared direction and range, the composite score,
retention against the teacher, and a paired bootstrap test for sentence-averaged metrics.

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
from typing import Any, Iterable, Mapping, Sequence

import attrs
import torch

from cvmkd_core.errors import MetricError

COMPOSITE = "composite"


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


def composite(scores: Mapping[str, float], weights: Mapping[str, float], specs: Mapping[str, ScoreSpec]) -> float | None:
    """Weighted mean of the normalised scores, on 0-100; None when a weighted score is missing."""
    total = sum(weights.values())
    if total <= 0 or any(k not in scores for k in weights):
        return None
    return 100.0 * sum(w * specs[k].normalise(scores[k]) for k, w in weights.items()) / total


def retention(student: Mapping[str, float], teacher: Mapping[str, float], specs: Mapping[str, ScoreSpec]) -> dict[str, float | None]:
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


def deltas(current: Mapping[str, float], previous: Mapping[str, float]) -> dict[str, float]:
    """``current - previous`` per shared key (raw units; whether that is good depends on the spec)."""
    return {k: current[k] - previous[k] for k in current if k in previous}


def paired_bootstrap(
    baseline: Sequence[float], current: Sequence[float], *, samples: int = 1000, seed: int = 12345
) -> dict[str, Any]:
    """Paired bootstrap resampling over per-sentence scores whose mean is the corpus score.

    Follows sacrebleu's paired bootstrap (Koehn 2004, as in Moses): resample sentence indices
    with replacement, recompute both means, and take as p-value the share of centred resampled
    differences at least as large as the observed one. Returns ``p_value``, ``delta`` (current
    minus baseline), and the current system's bootstrap mean and 95% interval.
    """
    if len(baseline) != len(current):
        raise ValueError(f"paired test needs equal lengths, got {len(baseline)} and {len(current)}")
    n = len(current)
    if n == 0:
        return {"p_value": None, "delta": 0.0}
    a = torch.tensor(list(baseline), dtype=torch.float64)
    b = torch.tensor(list(current), dtype=torch.float64)
    if torch.equal(a, b):
        # every resampled difference would be 0: the statistic is degenerate, nothing changed
        return {"p_value": 1.0, "delta": 0.0}
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, n, (samples, n), generator=generator)
    mean_a, mean_b = a[index].mean(1), b[index].mean(1)
    observed = abs(float(b.mean() - a.mean()))
    sample_diffs = (mean_b - mean_a).abs()
    centred = sample_diffs - sample_diffs.mean()
    p_value = (int((centred > observed).sum()) + 1) / (samples + 1)
    low, high = torch.quantile(mean_b, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {
        "p_value": p_value,
        "delta": float(b.mean() - a.mean()),
        "mean": float(mean_b.mean()),
        "ci95": [low, high],
    }


def within_budget(
    scores: Mapping[str, float], reference: Mapping[str, float], *, max_bleu_loss: float, max_composite_loss: float
) -> tuple[bool, dict[str, float]]:
    """The quality budget of a quantized model: whether ``scores`` lose at most ``max_bleu_loss``
    BLEU points and ``max_composite_loss`` (a share) of the composite score against
    ``reference`` (the fp32 student's); and the losses. One rule for the orchestrator that
    accepts or rejects a variant and for quantizers that fall back per layer to stay within it."""
    losses: dict[str, float] = {}
    if "bleu" in scores and "bleu" in reference:
        losses["bleu"] = reference["bleu"] - scores["bleu"]
    if COMPOSITE in scores and COMPOSITE in reference and reference[COMPOSITE] > 0:
        losses["composite_share"] = (reference[COMPOSITE] - scores[COMPOSITE]) / reference[COMPOSITE]
    ok = losses.get("bleu", 0.0) <= max_bleu_loss and losses.get("composite_share", 0.0) <= max_composite_loss
    return ok, losses


def finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


__all__ = [
    "within_budget",
    "COMPOSITE",
    "COMPOSITE_SPEC",
    "ScoreSpec",
    "all_specs",
    "composite",
    "composite_weights",
    "deltas",
    "metric_specs",
    "paired_bootstrap",
    "retention",
]
