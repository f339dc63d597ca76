"""cvmkd-metrics-sacrebleu: corpus-level BLEU, chrF and TER on detokenised text, by sacrebleu.

Each metric keeps the signature of its last computation (``metric.signature``), which says
exactly how the score was computed (tokenizer, smoothing, version), so scores are comparable.
``paired_test`` runs sacrebleu's paired bootstrap resampling (1,000 resamples by default, seed
12345 unless ``SACREBLEU_SEED`` says otherwise) of one system's hypotheses against another's.
"""

from __future__ import annotations

import abc
import logging

from typing import Any

import attrs

from cvmkd_core.config import ge, one_of
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.metrics import ScoreSpec

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
    spec = ScoreSpec()

    def __init__(self, config: Any) -> None:
        self.config = config
        self.signature = ""
        self.scores = {self.key: self.spec}

    @abc.abstractmethod
    def _metric(self) -> Any:
        """The sacrebleu metric object, built from the config."""

    def score(self, hypotheses: list[str], references: list[str], sources: list[str]) -> dict[str, float]:
        metric = self._metric()
        result = metric.corpus_score(hypotheses, [references])
        self.signature = str(metric.get_signature())
        return {self.key: float(result.score)}

    def paired_test(
        self,
        baseline: list[str],
        hypotheses: list[str],
        references: list[str],
        sources: list[str],
        *,
        samples: int = 1000,
    ) -> dict[str, dict[str, Any]]:
        """sacrebleu's paired bootstrap test of ``hypotheses`` against ``baseline``."""
        from sacrebleu.significance import PairedTest

        if list(baseline) == list(hypotheses):
            # sacrebleu's statistic is degenerate for identical systems (every resampled
            # difference is 0, giving p = 1/(samples+1)); identical output cannot differ
            return {self.key: {"p_value": 1.0, "delta": 0.0}}
        # sacrebleu logs each stage of the test at INFO level; the run's log has no use for it
        logging.getLogger("sacrebleu").setLevel(logging.WARNING)
        test = PairedTest(
            [("baseline", baseline), ("current", hypotheses)],
            {self.key: self._metric()},
            [references],
            test_type="bs",
            n_samples=samples,
        )
        signatures, results = test()
        (name,) = [k for k in results if k != "System"]
        before, after = results[name]
        return {
            self.key: {
                "p_value": float(after.p_value),
                "delta": float(after.score - before.score),
                "mean": float(after.mean),
                "ci95": [float(after.mean - after.ci), float(after.mean + after.ci)],
                "signature": str(signatures[name]),
            }
        }


class Bleu(_Sacrebleu):
    """Corpus BLEU (sacrebleu), 0-100, higher is better."""

    key = "bleu"
    spec = ScoreSpec(True, 0.0, 100.0, "corpus BLEU")

    def _metric(self) -> Any:
        from sacrebleu.metrics import BLEU

        return BLEU(tokenize=self.config.tokenize, lowercase=self.config.lowercase)


class Chrf(_Sacrebleu):
    """Corpus chrF (sacrebleu), 0-100, higher is better."""

    key = "chrf"
    spec = ScoreSpec(True, 0.0, 100.0, "corpus chrF")

    def _metric(self) -> Any:
        from sacrebleu.metrics import CHRF

        return CHRF(word_order=self.config.word_order)


class Ter(_Sacrebleu):
    """Corpus TER (sacrebleu), 0 and up, lower is better."""

    key = "ter"
    spec = ScoreSpec(False, 0.0, 100.0, "translation edit rate; above 100 normalises to 0")

    def _metric(self) -> Any:
        from sacrebleu.metrics import TER

        return TER(case_sensitive=self.config.case_sensitive)


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.metric("bleu", Bleu, config=BleuConfig)
    register.metric("chrf", Chrf, config=ChrfConfig)
    register.metric("ter", Ter, config=TerConfig)
