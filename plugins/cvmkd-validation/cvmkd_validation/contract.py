"""The trainer contract: what validation, test evaluation and quantization need from the trainer
that ``state.trainer`` holds. A trainer subclasses :class:`TranslationTrainer` (as Lightning's
modules subclass ``LightningModule``): the abstract methods are what every trainer must do, the
others have defaults that say "nothing of that kind", and mypy checks the plugins that call them."""

from __future__ import annotations

import abc
from typing import Any

from cvmkd_core.state import RunState


class TranslationTrainer(abc.ABC):
    """A trainer whose model translates."""

    #: "student" or "teacher": the name the trained model's scores are stored under
    role: str = "student"
    #: the model in training; None while there is none (before set-up, or nothing to evaluate)
    model: Any = None

    @abc.abstractmethod
    def validation_data(self, state: RunState) -> tuple[list[str], list[str]]:
        """The held-out sources and references validation translates and scores."""

    @abc.abstractmethod
    def translate(self, state: RunState, sources: list[str], beam_size: int = 1) -> list[str]:
        """The current model's translations of ``sources``."""

    def test_data(self, state: RunState) -> tuple[list[str], list[str], str] | None:
        """Sources, references and the split's name ("test", or "valid" without a test split) for
        the test evaluation at finalize; None: the trainer has no test split to score."""
        return None

    def test_beam_sizes(self) -> list[int]:
        """Beam sizes the test split is translated with beside validation's, for the record."""
        return []

    def teacher_translations(self, state: RunState, sources: list[str], beam_size: int = 1) -> list[str] | None:
        """The teacher's translations of ``sources`` (cached by the trainer), or None when it has
        no teacher to compare with."""
        return None

    def measure_models(self, state: RunState) -> dict[str, Any]:
        """Size and speed of the trainer's models, by name (``evaluation.json``'s ``models``)."""
        return {}

    def teacher_folder(self, state: RunState) -> Any:
        """The folder of the teacher's model package (a ``Path``), to measure it beside what ships;
        None when the trainer has no teacher folder."""
        return None


__all__ = ["TranslationTrainer"]
