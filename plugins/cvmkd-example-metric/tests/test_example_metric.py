"""Tests of the template plugin; copy them with it and keep them passing as you change the metric.

Run them after installing the plugin (``pip install ./cvmkd-example-metric``; ``-e`` for
development): ``python -m pytest tests``. The first test checks the installation itself, the
others call the metric directly on sentences written here.
"""

from __future__ import annotations

import importlib.metadata

import pytest

from cvmkd_core.config import structure
from cvmkd_core.errors import RecipeError
from cvmkd_core.plugins import build_plugins
from cvmkd_example_metric import ExactMatch, ExactMatchConfig  # rename this

PLUGIN = "example-metric"  # the entry-point name in pyproject.toml: rename this
DISTRIBUTION = "cvmkd-example-metric"  # the distribution name: rename this
METRIC = "exact_match"  # the name register.metric() gives: rename this


def test_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry point is installed, and cvmkd loads it and registers the metric."""
    (entry_point,) = [ep for ep in importlib.metadata.entry_points(group="cvmkd") if ep.name == PLUGIN]
    assert entry_point.value == "cvmkd_example_metric"
    assert entry_point.dist is not None and entry_point.dist.name == DISTRIBUTION
    # Load this plugin only (besides the core's built-ins and the validation plugin, which
    # declares the "metric" kind), so that other installed plugins cannot make the test fail:
    # the same switches a user has (docs/architecture.md).
    monkeypatch.setenv("CVMKD_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("CVMKD_PLUGINS", f"{PLUGIN},validation")
    monkeypatch.delenv("CVMKD_BLOCK_PLUGINS", raising=False)
    plugins = build_plugins()
    component = plugins.registry.get("metric", METRIC)
    assert component.plugin == PLUGIN
    assert component.factory is ExactMatch and component.config is ExactMatchConfig
    (described,) = [p for p in plugins.describe() if p["name"] == PLUGIN]
    assert described["distribution"] == DISTRIBUTION and described["error"] is None
    assert described["components"] == [
        {"kind": "metric", "name": METRIC, "description": ExactMatch.__doc__.splitlines()[0]}
    ]


def _metric(**settings: object) -> ExactMatch:
    """The metric as cvmkd builds it: settings structured by the strict recipe converter."""
    return ExactMatch(structure(settings, ExactMatchConfig, "validation.metrics[0]"))


REFERENCES = ["In the beginning God created the heaven", "and the earth.", "Let there be light"]


def test_identical_translations_score_100_and_wrong_ones_0() -> None:
    metric = _metric()
    assert metric.score(REFERENCES, REFERENCES, []) == {METRIC: 100.0}
    assert metric.score(["x", "y", "z"], REFERENCES, []) == {METRIC: 0.0}


def test_whitespace_is_normalised_and_case_ignored_by_default() -> None:
    hypotheses = ["  in the  beginning god\tcreated the heaven ", "and the earth", "Let there be light"]
    # sentence 2 lacks the final full stop: not a match; the others match after normalisation
    assert _metric().sentence_scores(hypotheses, REFERENCES, []) == {METRIC: [100.0, 0.0, 100.0]}
    assert _metric().score(hypotheses, REFERENCES, [])[METRIC] == pytest.approx(200.0 / 3)


def test_lowercase_false_makes_case_count() -> None:
    hypotheses = ["in the beginning god created the heaven", "and the earth.", "Let  there be light"]
    assert _metric(lowercase=False).sentence_scores(hypotheses, REFERENCES, []) == {METRIC: [0.0, 100.0, 100.0]}


def test_the_corpus_score_is_the_mean_of_the_sentence_scores() -> None:
    metric = _metric()
    hypotheses = ["in the beginning", "and the earth.", "let there be light"]
    sentences = metric.sentence_scores(hypotheses, REFERENCES, [])[METRIC]
    assert metric.score(hypotheses, REFERENCES, [])[METRIC] == pytest.approx(sum(sentences) / len(sentences))
    assert metric.score([], [], []) == {METRIC: 0.0}


def test_declared_scores_match_returned_keys_and_range() -> None:
    metric = _metric()
    assert (
        set(metric.scores)
        == set(metric.score(REFERENCES, REFERENCES, []))
        == set(metric.sentence_scores(REFERENCES, REFERENCES, []))
    )
    spec = metric.scores[METRIC]
    assert spec.higher_is_better and (spec.low, spec.high) == (0.0, 100.0)
    assert spec.normalise(metric.score(REFERENCES, REFERENCES, [])[METRIC]) == 1.0


def test_settings_are_checked_like_any_recipe_key() -> None:
    with pytest.raises(
        RecipeError, match=r"^validation\.metrics\[0\]\.lowercase: expected true or false, got string 'no'$"
    ):
        _metric(lowercase="no")
    with pytest.raises(RecipeError, match=r"^validation\.metrics\[0\]: unknown key 'lower'; known keys: lowercase$"):
        _metric(lower=True)


def test_unaligned_input_is_an_error() -> None:
    with pytest.raises(ValueError, match="2 hypotheses but 3 references"):
        _metric().score(["a", "b"], REFERENCES, [])
