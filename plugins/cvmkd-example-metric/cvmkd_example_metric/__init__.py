"""cvmkd-example-metric: a template for a third-party metric plugin.

It registers one metric, ``exact_match``: the percentage of hypotheses equal to their reference
after whitespace normalisation (and, by default, lowercasing). 0-100, higher is better.

To make your own metric, copy the folder ``plugins/cvmkd-example-metric`` and rename as its
README.md says; then replace :class:`ExactMatch` with your computation. Everything cvmkd calls is
in this one file:

1. at start-up, cvmkd imports this module (the ``cvmkd`` entry point in pyproject.toml names it)
   and calls :func:`cvmkd_register`, which tells cvmkd the metric's name, class and config class;
2. when a recipe names the metric (``[validation] metrics = ["exact_match"]``), cvmkd reads its
   settings into :class:`ExactMatchConfig` and builds ``ExactMatch(config)`` once per run;
3. at every validation (every ``run.validate_every`` steps and at the last step) the student
   translates the held-out sentences and cvmkd calls ``sentence_scores`` (or ``score`` when a
   metric has no ``sentence_scores``) with the translations, the references and the sources;
   the ``kd`` trainer also scores the student and the teacher on the test split at the end;
4. the returned keys are written under ``"scores"`` in ``runs/<name>/validation/step_*.json``,
   ``validation/history.jsonl`` and ``evaluation.json``, read with :attr:`ExactMatch.scores` when cvmkd compares
   validations, the student with the teacher, or builds the composite score.

The contract for metric components is the docstring of ``plugins/cvmkd-validation/cvmkd_validation/metrics.py``.
"""

from __future__ import annotations

from typing import Any

import attrs

# Everything a plugin needs from cvmkd is imported from the core package: the hook marker and,
# for metrics, ScoreSpec. Import nothing from other plugins: they may not be installed.
from cvmkd_core import hookimpl
from cvmkd_validation.metrics import ScoreSpec

__version__ = "0.1.0"

#: The one score key this metric returns, which is also the metric's name in recipes. Keys must
#: be unique across the metrics a recipe selects (two metrics returning "bleu" is an error), so
#: pick a specific name.
KEY = "exact_match"  # rename this


# --- settings -------------------------------------------------------------------------------------
#
# The config class structures the metric's own recipe settings. A recipe that names the metric
# with a table, ``{name = "exact_match", lowercase = false}``, gets ExactMatchConfig(lowercase=False);
# a bare name, ``"exact_match"``, gets the defaults. It must be an attrs class; cvmkd's converter is
# strict: an unknown key or a value of the wrong type (``lowercase = "no"``) is a recipe error
# reported with its path, before anything runs. Validators from cvmkd_core.config (gt, ge,
# between, one_of) give the same one-line errors as the core's own settings. A metric without
# settings can skip the class: ``register.metric("name", Factory)`` then calls ``Factory()``.


@attrs.frozen
class ExactMatchConfig:
    """``{name = "exact_match", lowercase = true}``."""

    lowercase: bool = True
    """compare case-insensitively (the default); false: "God" and "god" differ"""


# --- the metric -----------------------------------------------------------------------------------


def normalise(text: str, *, lowercase: bool) -> str:
    """Collapse runs of whitespace to one space and strip the ends; lowercase when asked."""
    text = " ".join(text.split())
    return text.lower() if lowercase else text


class ExactMatch:
    """Share of hypotheses equal to their reference after normalising whitespace, in percent."""

    # The first line of the class docstring above is the description `cvmkd plugins` shows.

    #: Every key that score() / sentence_scores() return, with how to read it. Required.
    #: cvmkd uses it to know which way is better (for the best checkpoint, the degradation
    #: detector, the paired test) and the range to normalise into [0, 1] (for the composite
    #: score and the student's retention of the teacher's score). Declare a realistic range:
    #: TER, lower is better and unbounded above, would be ScoreSpec(False, 0.0, 100.0).
    scores = {
        KEY: ScoreSpec(
            higher_is_better=True,
            low=0.0,
            high=100.0,
            description="hypotheses equal to their reference after whitespace normalisation, %",
        )
    }

    def __init__(self, config: ExactMatchConfig) -> None:
        # Called once per run with the structured settings. Load heavy things (a model, a
        # tokenizer) here or lazily on first use, not at import: the module is imported every time
        # cvmkd starts, for `cvmkd plugins` too, even when no recipe selects the metric.
        self.config = config

    def sentence_scores(
        self, hypotheses: list[str], references: list[str], sources: list[str]
    ) -> dict[str, list[float]]:
        """Per key, one value per sentence: 100.0 when the hypothesis matches, else 0.0.

        Optional. Implement it when the corpus score is the mean of sentence scores (as here, or
        ROUGE, BERTScore): validation then calls it instead of score() and keeps the sentence
        values, so a paired bootstrap test against the previous validation costs nothing extra.
        A corpus-level metric (BLEU) whose score is not a mean of sentence scores must not have
        it; it may have ``paired_test(baseline, hypotheses, references, sources, *, samples)``
        instead (see plugins/cvmkd-validation/cvmkd_validation/metrics.py).

        ``hypotheses`` (the student's translations), ``references`` and ``sources`` are
        detokenised text, aligned one to one. ``sources`` is there for metrics that read the
        source sentence (COMET, for example); this one ignores it.
        """
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
        lowercase = self.config.lowercase
        return {
            KEY: [
                100.0 if normalise(h, lowercase=lowercase) == normalise(r, lowercase=lowercase) else 0.0
                for h, r in zip(hypotheses, references)
            ]
        }

    def score(self, hypotheses: list[str], references: list[str], sources: list[str]) -> dict[str, float]:
        """Per key, the corpus score. Required, and must equal the mean of sentence_scores()
        when the metric has them (no sentences: 0.0)."""
        values = self.sentence_scores(hypotheses, references, sources)[KEY]
        return {KEY: sum(values) / len(values) if values else 0.0}


# --- registration ---------------------------------------------------------------------------------
#
# The one hook a metric plugin needs. cvmkd calls it once at start-up, for every installed
# plugin, before any recipe is read. register.metric(name, factory, config=...) makes the metric
# available to recipes under that name; a name that another plugin registered too is an error
# naming both plugins. Other kinds register the same way: register.loss, .detector,
# .quantizer, .reporter, .corpus, .model, .logger, .trainer (see docs/writing-plugins.md).
#
# A plugin module may implement other hooks as well (cvmkd_step_end, cvmkd_finalize, ...;
# docs/hooks.md lists them), but a module's hooks run in every run, whether or not a recipe
# names its components; hooks that should run only when the metric is selected belong on the
# metric class itself as @hookimpl methods (cvmkd registers a selected component as a plugin).


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.metric(KEY, ExactMatch, config=ExactMatchConfig)  # rename "exact_match" via KEY
