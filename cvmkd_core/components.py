"""What the core expects of the components it calls directly (typing protocols)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from cvmkd_core.state import RunState


@runtime_checkable
class Metric(Protocol):
    """A translation-quality metric. ``score`` returns one or more named values
    (``{"bleu": 17.1}``); each key must be unique across the selected metrics."""

    #: per returned key: True when a higher value is better (False for TER)
    higher_is_better: dict[str, bool]

    def score(self, hypotheses: list[str], references: list[str], sources: list[str]) -> dict[str, float]: ...


@runtime_checkable
class Translator(Protocol):
    """What validation needs from the trainer: held-out text and a way to translate it."""

    def validation_data(self, state: RunState) -> tuple[list[str], list[str]]: ...

    def translate(self, state: RunState, sources: list[str], beam_size: int = 1) -> list[str]: ...


def describe_component(obj: Any) -> str:
    return type(obj).__name__
