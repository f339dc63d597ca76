"""The contracts between the translation plugins: corpora and their splits, quantizers (typing
protocols and the records they exchange)."""

from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import attrs



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
