"""The contracts between the translation plugins: corpora and their splits, quantizers (typing
protocols and the records they exchange)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import attrs
import torch


@attrs.frozen
class CorpusSplits:
    """A corpus, split. Pairs are ``(source, target)`` tuples of detokenised text."""

    name: str
    source_lang: str
    target_lang: str
    train: list[Any]
    valid: list[Any]
    test: list[Any]
    #: sha256 over every pair of every split: ties cached tokenizers and teachers to the data
    fingerprint: str
    notes: dict[str, Any] = attrs.field(factory=dict)
    #: source-language text without references, for the teacher to translate (sequence-level KD);
    #: not part of ``fingerprint``
    extra_sources: list[str] = attrs.field(factory=list)


@runtime_checkable
class Corpus(Protocol):
    """A corpus component: ``load()`` returns the train/valid/test splits."""

    def load(self) -> CorpusSplits: ...


@runtime_checkable
class Metric(Protocol):
    """A translation-quality metric. ``score`` returns one or more named values
    (``{"bleu": 17.1}``); each key must be unique across the selected metrics."""

    #: per returned key: True when a higher value is better (False for TER)
    higher_is_better: dict[str, bool]

    def score(self, hypotheses: list[str], references: list[str], sources: list[str]) -> dict[str, float]: ...


@attrs.frozen
class QuantizationContext:
    """What a quantizer may use: the tokenizer, validation sentences (for calibration and for
    judging quality), and a scorer of any candidate model on them."""

    tokenizer: Any
    sources: list[str]
    references: list[str]
    #: scores (every selected metric and the composite) of a model on ``sources``
    evaluate: Callable[[torch.nn.Module], dict[str, float]]
    #: the fp32 student's scores on the same sentences
    reference_scores: dict[str, float]
    #: source id tensors (batch, length) for calibration, from the validation sentences
    calibration_batches: Callable[[int], list[torch.Tensor]]
    seed: int = 0


@attrs.frozen
class QuantizationResult:
    """A quantized model that translates like the fp32 one, and how it was made."""

    model: torch.nn.Module
    scheme: str
    details: dict[str, Any] = attrs.field(factory=dict)


@runtime_checkable
class Quantizer(Protocol):
    """A ``[[quantize]]`` component: turns a float32 CPU copy of the student (which it may
    change in place) into a quantized model that translates like it."""

    def quantize(self, model: Any, context: QuantizationContext) -> QuantizationResult: ...


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
    if "composite" in scores and "composite" in reference and reference["composite"] > 0:
        losses["composite_share"] = (reference["composite"] - scores["composite"]) / reference["composite"]
    ok = losses.get("bleu", 0.0) <= max_bleu_loss and losses.get("composite_share", 0.0) <= max_composite_loss
    return ok, losses
