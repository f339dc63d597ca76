"""cvmkd-metrics-rouge: sentence-averaged ROUGE-1, ROUGE-2 and ROUGE-L, by rouge-score.

Each hypothesis is scored against its reference by ``rouge_score.rouge_scorer.RougeScorer``; the
metric returns the F-measures times 100 (``rouge1``, ``rouge2``, ``rougeL``: 0-100, higher is
better). The corpus score is the mean of the sentence scores, which ``sentence_scores`` returns
for validation's paired bootstrap test.

Tokenization (``tokenizer``):

- ``"unicode"`` (default): NFC-normalise, lowercase, keep the runs of word characters (``\\w+``)
  of any script, so "été" and "Straße" are words;
- ``"rouge"``: rouge-score's own tokenizer, which lowercases and replaces every character
  outside ``[a-z0-9]`` by a space: "été" becomes "t", "garçon" becomes "gar" + "on", and Greek
  or Cyrillic words vanish. Only sensible for English targets, and kept for comparability with
  published ROUGE numbers.

``use_stemmer`` applies the Porter stemmer (as rouge-score does: to tokens longer than three
characters). Porter is an English stemmer; on French or German it changes little and sometimes
wrongly.

``summary_level = true`` computes ``rougeL`` as rouge-score's summary-level ``rougeLsum`` (union
LCS over sentences) on sentences split by :func:`split_sentences` here and joined by newlines;
nltk's punkt (``split_summaries``) is not used, its data is not installed.

A hypothesis or reference without any token (empty, blank, only punctuation) scores 0 on every
key, as rouge-score does; two empty texts also score 0.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

import attrs

from cvmkd_core.config import one_of
from cvmkd_core.hookspecs import hookimpl
from cvmkd_validation.errors import MetricError
from cvmkd_validation.metrics import ScoreSpec

__version__ = "0.1.0"

KEYS = ("rouge1", "rouge2", "rougeL")

_WORD = re.compile(r"\w+")
#: a sentence ends at ., ! or ?, possibly followed by closing quotes or brackets, then whitespace
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'»”’)\]]))\s+")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` after ``.``, ``!`` or ``?`` (optionally followed by a closing quote or
    bracket) that is followed by whitespace; line breaks also end a sentence. Deliberately
    simple: "Mr. Smith" is split too. Blank pieces are dropped."""
    sentences: list[str] = []
    for line in text.splitlines():
        sentences.extend(piece for piece in _SENTENCE_END.split(line.strip()) if piece)
    return sentences


class UnicodeTokenizer:
    """Lowercased ``\\w+`` runs of any script, after NFC normalisation (so a decomposed "é" is
    one word character); Porter-stemmed when ``use_stemmer`` (tokens of more than 3 characters,
    like rouge-score's own tokenizer)."""

    def __init__(self, use_stemmer: bool = False) -> None:
        self._stemmer = None
        self._stems: dict[str, str] = {}
        if use_stemmer:
            from nltk.stem import porter

            self._stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        tokens = _WORD.findall(unicodedata.normalize("NFC", text).lower())
        if self._stemmer is None:
            return tokens
        return [self._stem(t) if len(t) > 3 else t for t in tokens]

    def _stem(self, token: str) -> str:
        stem = self._stems.get(token)
        if stem is None:
            stem = self._stems[token] = self._stemmer.stem(token)  # type: ignore[union-attr]
        return stem


@attrs.frozen
class RougeConfig:
    """``{name = "rouge", tokenizer = "unicode", use_stemmer = false, summary_level = false}``."""

    tokenizer: str = attrs.field(default="unicode", validator=one_of("unicode", "rouge"))
    use_stemmer: bool = False
    summary_level: bool = False


class Rouge:
    """Sentence-averaged ROUGE-1/2/L F-measure x 100 (rouge-score), higher is better."""

    scores = {
        "rouge1": ScoreSpec(True, 0.0, 100.0, "ROUGE-1 F-measure x 100, mean over sentences"),
        "rouge2": ScoreSpec(True, 0.0, 100.0, "ROUGE-2 F-measure x 100, mean over sentences"),
        "rougeL": ScoreSpec(True, 0.0, 100.0, "ROUGE-L F-measure x 100, mean over sentences"),
    }

    def __init__(self, config: RougeConfig | None = None) -> None:
        from rouge_score import rouge_scorer, tokenizers

        self.config = config if config is not None else RougeConfig()
        self._lcs_type = "rougeLsum" if self.config.summary_level else "rougeL"
        if self.config.tokenizer == "unicode":
            self._tokenizer: Any = UnicodeTokenizer(self.config.use_stemmer)
        else:
            self._tokenizer = tokenizers.DefaultTokenizer(self.config.use_stemmer)
        self._scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", self._lcs_type], tokenizer=self._tokenizer)

    def tokenize(self, text: str) -> list[str]:
        """The tokens this metric's configuration matches on."""
        return list(self._tokenizer.tokenize(text))

    def _prepare(self, text: str) -> str:
        return "\n".join(split_sentences(text)) if self.config.summary_level else text

    def sentence_scores(
        self, hypotheses: list[str], references: list[str], sources: list[str]
    ) -> dict[str, list[float]]:
        if len(hypotheses) != len(references):
            raise MetricError(
                f"rouge: {len(hypotheses)} hypotheses but {len(references)} references; they must pair up"
            )
        out: dict[str, list[float]] = {key: [] for key in KEYS}
        types = {"rouge1": "rouge1", "rouge2": "rouge2", "rougeL": self._lcs_type}
        for hypothesis, reference in zip(hypotheses, references):
            result = self._scorer.score(self._prepare(reference), self._prepare(hypothesis))
            for key, rouge_type in types.items():
                out[key].append(100.0 * float(result[rouge_type].fmeasure))
        return out

    def score(self, hypotheses: list[str], references: list[str], sources: list[str]) -> dict[str, float]:
        per_sentence = self.sentence_scores(hypotheses, references, sources)
        return {key: sum(values) / len(values) if values else 0.0 for key, values in per_sentence.items()}


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.metric("rouge", Rouge, config=RougeConfig)


__all__ = ["Rouge", "RougeConfig", "UnicodeTokenizer", "split_sentences"]
