"""Built-in validation: the trainer translates the held-out set, every selected metric scores it."""

from __future__ import annotations

from typing import Any

from cvmkd_core.components import Translator
from cvmkd_core.errors import CvmkdError
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.state import RunState

METRICS_PATH = "validation.metrics["


def selected_metrics(state: RunState) -> list[tuple[str, Any]]:
    return [(path, obj) for path, obj in state.components.items() if path.startswith(METRICS_PATH)]


@hookimpl
def cvmkd_validate(state: RunState) -> dict[str, float] | None:
    metrics = selected_metrics(state)
    if not metrics:
        return None
    trainer = state.components.get("distill")
    if not isinstance(trainer, Translator):
        raise CvmkdError(
            f"trainer {state.recipe.distill.name!r} cannot translate, so metrics cannot score it"
        )
    config = state.recipe.validation
    sources, references = trainer.validation_data(state)
    if config.max_sentences:
        sources, references = sources[: config.max_sentences], references[: config.max_sentences]
    hypotheses = trainer.translate(state, sources, beam_size=config.beam_size)
    return score_all(state, hypotheses, references, sources)


def score_all(state: RunState, hypotheses: list[str], references: list[str], sources: list[str]) -> dict[str, float]:
    """Every selected metric's scores of ``hypotheses``; a key returned twice is an error."""
    scores: dict[str, float] = {}
    for path, metric in selected_metrics(state):
        for key, value in metric.score(hypotheses, references, sources).items():
            if key in scores:
                raise CvmkdError(f"{path}: metric score {key!r} is also returned by another metric")
            scores[key] = float(value)
    return scores


def higher_is_better(state: RunState) -> dict[str, bool]:
    """Per score key of the selected metrics: whether a higher value is better (TER: no)."""
    directions: dict[str, bool] = {}
    for _, metric in selected_metrics(state):
        directions.update(getattr(metric, "higher_is_better", {}))
    return directions
