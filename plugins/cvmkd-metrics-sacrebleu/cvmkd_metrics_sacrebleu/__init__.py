"""cvmkd-metrics-sacrebleu: corpus-level BLEU, chrF and TER on detokenised text, by sacrebleu.

Each metric keeps the signature of its last computation (``metric.signature``), which says
exactly how the score was computed (tokenizer, smoothing, version), so scores are comparable.
"""

from __future__ import annotations

import abc

from typing import Any

import attrs

from cvmkd_core.config import ge, one_of
from cvmkd_core.hookspecs import hookimpl

__version__ = "0.1.0"


@attrs.frozen
class BleuConfig:
    """``{name = "bleu", tokenize = "13a", lowercase = false}``."""

    tokenize: str = attrs.field(default="13a", validator=one_of("13a", "intl", "char", "none"))
    lowercase: bool = False


@attrs.frozen
class ChrfConfig:
    """``{name = "chrf", word_order = 0}`` (2 gives chrF++)."""

    word_order: int = attrs.field(default=0, validator=ge(0))


@attrs.frozen
class TerConfig:
    """``{name = "ter", case_sensitive = false}``."""

    case_sensitive: bool = False


class _Sacrebleu(abc.ABC):
    key = ""
    higher: bool = True

    def __init__(self, config: Any) -> None:
        self.config = config
        self.signature = ""
        self.higher_is_better = {self.key: self.higher}

    @abc.abstractmethod
    def _metric(self) -> Any:
        """The sacrebleu metric object, built from the config."""

    def score(self, hypotheses: list[str], references: list[str], sources: list[str]) -> dict[str, float]:
        metric = self._metric()
        result = metric.corpus_score(hypotheses, [references])
        self.signature = str(metric.get_signature())
        return {self.key: float(result.score)}


class Bleu(_Sacrebleu):
    """Corpus BLEU (sacrebleu), 0-100, higher is better."""

    key = "bleu"

    def _metric(self) -> Any:
        from sacrebleu.metrics import BLEU

        return BLEU(tokenize=self.config.tokenize, lowercase=self.config.lowercase)


class Chrf(_Sacrebleu):
    """Corpus chrF (sacrebleu), 0-100, higher is better."""

    key = "chrf"

    def _metric(self) -> Any:
        from sacrebleu.metrics import CHRF

        return CHRF(word_order=self.config.word_order)


class Ter(_Sacrebleu):
    """Corpus TER (sacrebleu), 0 and up, lower is better."""

    key = "ter"
    higher = False

    def _metric(self) -> Any:
        from sacrebleu.metrics import TER

        return TER(case_sensitive=self.config.case_sensitive)


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.metric("bleu", Bleu, config=BleuConfig)
    register.metric("chrf", Chrf, config=ChrfConfig)
    register.metric("ter", Ter, config=TerConfig)
