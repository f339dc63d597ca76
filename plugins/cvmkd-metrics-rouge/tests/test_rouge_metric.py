"""The ROUGE metrics plugin: installed, and scoring with rouge-score itself."""

from __future__ import annotations

import pytest
from rouge_score import rouge_scorer

import cvmkd_metrics_rouge
from cvmkd_core.config import structure
from cvmkd_core.errors import RecipeError
from cvmkd_core.plugins import build_plugins
from cvmkd_core.registry import Registrar, Registry
from cvmkd_metrics_rouge import Rouge, RougeConfig, split_sentences
from cvmkd_validation.errors import MetricError
from cvmkd_validation.metrics import metric_specs

HYPS = ["the cat sat on the mat", "in the beginning god created the heaven", "and the earth was void"]
REFS = [
    "the cat was on the mat",
    "in the beginning God created the heavens and the earth",
    "and the earth was without form",
]


def _direct(hyps: list[str], refs: list[str], **kwargs: object) -> dict[str, list[float]]:
    """Sentence F-measures x 100 straight from rouge-score."""
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], **kwargs)
    out: dict[str, list[float]] = {"rouge1": [], "rouge2": [], "rougeL": []}
    for hyp, ref in zip(hyps, refs):
        result = scorer.score(ref, hyp)
        for key in out:
            out[key].append(100 * result[key].fmeasure)
    return out


def _assert_close(got: dict[str, list[float]], expected: dict[str, list[float]]) -> None:
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key]), key


def test_the_plugin_is_installed_and_registers_its_metric() -> None:
    component = build_plugins().registry.get("metric", "rouge")
    assert component.plugin == "rouge"
    assert component.factory is Rouge and component.config is RougeConfig


def test_cvmkd_register_registers_rouge() -> None:
    registry = Registry()
    registry.declare("metric", "a quality metric", "validation")  # the kind cvmkd-validation declares
    cvmkd_metrics_rouge.cvmkd_register(Registrar(registry, "rouge"))
    assert [(c.kind, c.name) for c in registry.all()] == [("metric", "rouge")]
    metric = registry.get("metric", "rouge").factory(RougeConfig())
    specs = metric_specs(metric)
    assert list(specs) == ["rouge1", "rouge2", "rougeL"]
    assert all(s.higher_is_better and (s.low, s.high) == (0.0, 100.0) for s in specs.values())


def test_identical_text_scores_100() -> None:
    assert Rouge().score(REFS, REFS, []) == pytest.approx({"rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})


def test_scores_equal_rouge_score_computed_directly() -> None:
    expected = _direct(HYPS, REFS)
    got = Rouge().sentence_scores(HYPS, REFS, [])
    _assert_close(got, expected)  # plain ASCII text: the unicode tokenizer finds the same tokens
    _assert_close(Rouge(RougeConfig(tokenizer="rouge")).sentence_scores(HYPS, REFS, []), expected)
    # a hand check: 5 of the 6 words match (the x2, cat, on, mat), both sides 6 words long
    assert got["rouge1"][0] == pytest.approx(100 * 5 / 6)


def test_stemmer_matches_rouge_score_with_use_stemmer() -> None:
    hyps, refs = ["the cats were running"], ["the cat runs"]
    plain = Rouge().sentence_scores(hyps, refs, [])
    stemmed = Rouge(RougeConfig(use_stemmer=True)).sentence_scores(hyps, refs, [])
    _assert_close(stemmed, _direct(hyps, refs, use_stemmer=True))
    assert stemmed["rouge1"] == [pytest.approx(100 * 6 / 7)]  # the, cat, run match: P 3/4, R 3/3
    assert plain["rouge1"] == [pytest.approx(100 * 2 / 7)]  # only "the": P 1/4, R 1/3


def test_mean_of_sentence_scores_is_the_score() -> None:
    metric = Rouge()
    per_sentence = metric.sentence_scores(HYPS, REFS, [])
    scores = metric.score(HYPS, REFS, [])
    assert set(per_sentence) == set(scores) == {"rouge1", "rouge2", "rougeL"}
    for key, values in per_sentence.items():
        assert len(values) == len(HYPS)
        assert scores[key] == pytest.approx(sum(values) / len(values))


def test_french_accented_words_count_with_the_unicode_tokenizer_only() -> None:
    unicode, rouge = Rouge(), Rouge(RougeConfig(tokenizer="rouge"))
    assert unicode.tokenize("Le garçon a été ôté à Zürich") == ["le", "garçon", "a", "été", "ôté", "à", "zürich"]
    assert rouge.tokenize("Le garçon a été ôté à Zürich") == ["le", "gar", "on", "a", "t", "t", "z", "rich"]
    # decomposed accents (e + U+0301) are the same word as the composed form
    assert unicode.tokenize("e\u0301te\u0301") == ["été"]
    # "été" and "ôté" both become "t" for rouge-score's tokenizer: a false match
    hyp, ref = ["il a été là"], ["il a ôté là"]
    assert rouge.sentence_scores(hyp, ref, [])["rouge1"] == [pytest.approx(100.0)]
    assert unicode.sentence_scores(hyp, ref, [])["rouge1"] == [pytest.approx(75.0)]
    # a sentence of Greek words has no token at all for rouge-score's tokenizer
    assert rouge.tokenize("καλημέρα κόσμε") == []
    assert unicode.score(["καλημέρα κόσμε"], ["καλημέρα κόσμε"], [])["rouge1"] == pytest.approx(100.0)


def test_split_sentences() -> None:
    assert split_sentences("One. Two! Three? Four") == ["One.", "Two!", "Three?", "Four"]
    assert split_sentences('He said "Stop." Then he left.') == ['He said "Stop."', "Then he left."]
    assert split_sentences("3.14 is pi. e.g.so") == ["3.14 is pi.", "e.g.so"]  # no space, no split
    assert split_sentences("first line\nsecond  line.  \n\n") == ["first line", "second  line."]
    assert split_sentences("") == [] and split_sentences("   ") == []


def test_summary_level_uses_rougelsum_on_split_sentences() -> None:
    hyps, refs = ["The cat sat. The dog ran."], ["The dog ran. The cat sat."]
    sentence_level = Rouge().sentence_scores(hyps, refs, [])
    summary_level = Rouge(RougeConfig(summary_level=True)).sentence_scores(hyps, refs, [])
    # swapping two sentences halves the plain LCS but not the union LCS over sentences
    assert sentence_level["rougeL"] == [pytest.approx(50.0)]
    assert summary_level["rougeL"] == [pytest.approx(100.0)]
    assert summary_level["rouge1"] == sentence_level["rouge1"]
    direct = rouge_scorer.RougeScorer(["rougeLsum"]).score("The dog ran.\nThe cat sat.", "The cat sat.\nThe dog ran.")
    assert summary_level["rougeL"][0] == pytest.approx(100 * direct["rougeLsum"].fmeasure)


@pytest.mark.parametrize("config", [RougeConfig(), RougeConfig(tokenizer="rouge", summary_level=True)])
def test_empty_hypotheses_and_references_score_0(config: RougeConfig) -> None:
    metric = Rouge(config)
    hyps = ["", "the cat sat", "   ", "...", ""]
    refs = ["the cat sat", "", "the cat sat", "...", ""]
    per_sentence = metric.sentence_scores(hyps, refs, [])
    assert per_sentence == {key: [0.0] * 5 for key in ("rouge1", "rouge2", "rougeL")}
    assert metric.score([], [], []) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_hypotheses_and_references_must_pair_up() -> None:
    with pytest.raises(MetricError, match="2 hypotheses but 1 references"):
        Rouge().score(["a", "b"], ["a"], [])


def test_config_from_a_recipe_table() -> None:
    assert structure({}, RougeConfig) == RougeConfig()
    assert structure({"tokenizer": "rouge", "use_stemmer": True, "summary_level": True}, RougeConfig) == RougeConfig(
        "rouge", True, True
    )
    with pytest.raises(RecipeError) as caught:
        structure({"tokenizer": "nltk", "use_stemmer": "yes", "split": True}, RougeConfig, "validation.metrics[0]")
    problems = "\n".join(caught.value.problems)
    assert "validation.metrics[0].tokenizer: must be one of 'unicode', 'rouge', got 'nltk'" in problems
    assert "use_stemmer: expected true or false, got string 'yes'" in problems
    assert "unknown key 'split'" in problems
