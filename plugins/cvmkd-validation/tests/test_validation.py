"""The validation protocol: score specs, the composite score, retention, the paired bootstrap,
the error analysis, and what a validation record holds after a run."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from cvmkd_core import hookimpl
from cvmkd_core.cli import main
from cvmkd_core.plugins import Plugins
from cvmkd_core.recipe import load_recipe
from cvmkd_core.session import Session, run_session
from cvmkd_testing import TOY_RECIPE
from cvmkd_validation.analysis import analyse, repeated_unit
from cvmkd_validation.errors import MetricError
from cvmkd_validation.metrics import (
    COMPOSITE,
    ScoreSpec,
    composite,
    composite_weights,
    metric_specs,
    retention,
)
from cvmkd_validation.records import EVALUATION, TestEvaluation, TranslationSample
from cvmkd_validation.statistics import paired_bootstrap

SPECS = {
    "bleu": ScoreSpec(True, 0, 100),
    "ter": ScoreSpec(False, 0, 100),
    "bertscore_f1": ScoreSpec(True, 0, 1),
    COMPOSITE: ScoreSpec(True, 0, 100),
}


# --- specs, composite, retention --------------------------------------------------------------


def test_normalisation_follows_direction_and_range() -> None:
    assert SPECS["bleu"].normalise(25.0) == 0.25
    assert SPECS["ter"].normalise(25.0) == 0.75
    assert SPECS["ter"].normalise(180.0) == 0.0  # TER above 100 is as bad as it gets
    assert SPECS["bertscore_f1"].normalise(0.9) == pytest.approx(0.9)
    assert SPECS["ter"].better(40.0, 50.0) and not SPECS["bleu"].better(40.0, 50.0)
    with pytest.raises(ValueError, match="high > low"):
        ScoreSpec(True, 1.0, 1.0)


def test_composite_is_the_weighted_mean_of_normalised_scores() -> None:
    scores = {"bleu": 30.0, "ter": 60.0, "bertscore_f1": 0.8}
    weights = composite_weights({"bleu": 2, "ter": 1, "bertscore_f1": 1}, SPECS, "validation.composite")
    assert composite(scores, weights, SPECS) == pytest.approx(100 * (2 * 0.3 + 0.4 + 0.8) / 4)
    equal = composite_weights({}, SPECS, "validation.composite")
    assert equal == {"bleu": 1.0, "ter": 1.0, "bertscore_f1": 1.0}
    assert composite({"bleu": 30.0}, equal, SPECS) is None  # a weighted score is missing
    with pytest.raises(
        MetricError,
        match=r"validation.composite: no selected metric returns 'chrf'; available scores: bleu, ter, bertscore_f1",
    ):
        composite_weights({"chrf": 1.0}, SPECS, "validation.composite")


def test_retention_reads_ter_the_right_way_round() -> None:
    teacher = {"bleu": 20.0, "ter": 70.0}
    shares = retention({"bleu": 18.0, "ter": 76.0}, teacher, SPECS)
    assert shares["bleu"] == pytest.approx(0.9)
    assert shares["ter"] == pytest.approx(24 / 30)  # worse TER: below 1
    assert retention({"ter": 60.0}, teacher, SPECS)["ter"] > 1
    assert retention({"bleu": 5.0}, {"bleu": 0.0}, SPECS)["bleu"] is None


def test_a_metric_with_only_higher_is_better_gets_the_default_range() -> None:
    class Old:
        higher_is_better = {"x": False}

    assert metric_specs(Old()) == {"x": ScoreSpec(False, 0.0, 100.0)}


def test_paired_bootstrap_separates_a_real_gain_from_noise() -> None:
    rng = random.Random(0)
    base = [rng.uniform(0, 100) for _ in range(400)]
    gain = [min(100.0, b + rng.uniform(0, 10)) for b in base]
    noise = [b + rng.gauss(0, 3) for b in base]
    clear = paired_bootstrap(base, gain, samples=500, seed=1)
    assert clear["p_value"] < 0.01 and clear["delta"] > 0
    assert clear["ci95"][0] < clear["mean"] < clear["ci95"][1]
    assert paired_bootstrap(base, noise, samples=500, seed=1)["p_value"] > 0.05
    assert paired_bootstrap(base, base) == {"p_value": 1.0, "delta": 0.0}
    assert paired_bootstrap(base, gain, samples=200, seed=3) == paired_bootstrap(base, gain, samples=200, seed=3)


# --- the error analysis -----------------------------------------------------------------------


def test_repeated_units_are_found_only_when_repeated_in_a_row() -> None:
    assert repeated_unit("and he said and he said and he said to them".split()) == "and he said"
    assert repeated_unit("the the the".split()) == "the"
    assert repeated_unit("he said to him and he said to her".split()) is None
    assert repeated_unit("and a ribbbbbbbbbbb".split()) == "b"
    assert repeated_unit("in 1000000 cubits, a sheep baaaah".split()) is None


def test_the_analysis_finds_each_kind_of_error() -> None:
    sources = ["au commencement dieu créa le ciel", "et la terre était informe", "il dit", "la lumière fut", "dieu vit"]
    references = [
        "in the beginning god created the heaven",
        "and the earth was without form",
        "he said",
        "there was light",
        "god saw",
    ]
    hypotheses = [
        "in the beginning god created the heaven",  # perfect
        "and the earth the earth the earth was",  # loop
        "",  # empty
        "la lumière fut",  # untranslated copy
        "god \u2047 saw",  # unknown token
    ]
    previous = [
        "in the beginning god created the heaven",
        "and the earth was without form",
        "he said",
        "there was light",
        "god saw",
    ]
    sample = TranslationSample(
        step=20, sources=sources, references=references, hypotheses=hypotheses, previous=previous, previous_step=10
    )
    found = analyse(sample, worst=2, examples=2, regression_drop=20.0)
    assert found["sentences"] == 5
    assert found["empty"]["count"] == 1 and found["empty"]["examples"][0]["index"] == 2
    assert found["loops"]["count"] == 1 and found["loops"]["examples"][0]["repeated"] == "the earth"
    assert found["copies"]["count"] == 1 and found["copies"]["examples"][0]["index"] == 3
    assert found["unknown_tokens"]["count"] == 1
    assert [w["index"] for w in found["worst"]] == [2, 3]
    assert found["worst"][0]["chrf"] == 0.0 and found["worst"][0]["reference"] == "he said"
    changes = found["changes"]
    assert changes["against_step"] == 10 and changes["unchanged_output"] == 1 and changes["better"] == 0
    assert changes["worse"] == 4
    assert changes["worse_examples"][0]["previous_hypothesis"] in previous
    words = sum(len(r.split()) for r in references)
    assert found["length"]["ratio"] == pytest.approx(sum(len(h.split()) for h in hypotheses) / words, abs=1e-4)
    assert sum(b["sentences"] for b in found["by_reference_length"]) == 5
    assert (
        "1 empty" in found["summary"] and "1 with loops" in found["summary"] and "4 clearly worse" in found["summary"]
    )


# --- records after a run ----------------------------------------------------------------------


def _run(write, plugins: Plugins, overrides: list[str], text: str = TOY_RECIPE) -> tuple[Any, Any]:
    path = write("recipe.toml", text)
    recipe = load_recipe(path, overrides=overrides, registry=plugins.registry)
    return run_session(Session(recipe=recipe, plugins=plugins, recipe_path=path))


def _history(run_dir: Any) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "validation" / "history.jsonl").read_text().splitlines()]


class WordsMetric:
    """A sentence-averaged metric, so the core's paired bootstrap applies to it."""

    scores = {"words": ScoreSpec(True, 0.0, 10.0)}

    def sentence_scores(
        self, hypotheses: list[str], references: list[str], sources: list[str]
    ) -> dict[str, list[float]]:
        return {"words": [float(len(h.split())) for h in hypotheses]}


class WordsPlugin:
    @hookimpl
    def cvmkd_register(self, register: Any) -> None:
        register.metric("words", WordsMetric)


def test_records_hold_teacher_retention_deltas_significance_and_analysis(write, toy_plugins: Plugins) -> None:
    toy_plugins.add_plugin(WordsPlugin(), name="words", source="test")
    text = TOY_RECIPE.replace('metrics = ["exact"]', 'metrics = ["exact", "words"]\ncomposite = {exact = 3, words = 1}')
    # learning rate 0.2 reaches the target (exact translations) by step 6, not at step 3
    summary, run_dir = _run(write, toy_plugins, ["distill.learning_rate=0.2", "run.steps=9"], text)
    first, second, third = _history(run_dir)
    teacher = json.loads((run_dir / "validation" / "teacher.json").read_text())
    assert teacher["scores"] == {
        "exact": 100.0,
        "words": pytest.approx(3.5),
        COMPOSITE: pytest.approx(100 * (3 + 0.35) / 4),
    }
    assert first["scores"]["exact"] == 0.0 and second["scores"]["exact"] == 100.0
    for record in (first, second, third):
        details = record["details"]
        assert details["sentences"] == 4 and details["beam_size"] == 1
        assert details["composite_weights"] == {"exact": 3.0, "words": 1.0}
        assert details["retention"][COMPOSITE] == pytest.approx(
            record["scores"][COMPOSITE] / teacher["scores"][COMPOSITE]
        )
        assert details["teacher"]["scores"] == teacher["scores"]
        hypotheses = (run_dir / "validation" / details["hypotheses"]).read_text().splitlines()
        assert len(hypotheses) == 4
        assert details["analysis"]["errors"]["sentences"] == 4
    assert first["details"]["retention"]["exact"] == 0.0
    assert "delta_previous" not in first["details"] and "significance" not in first["details"]
    details = second["details"]
    assert details["previous_step"] == 3 and details["best_step"] == 3
    assert details["delta_previous"]["exact"] == 100.0
    assert details["delta_previous"]["words"] == pytest.approx(3.5 - 1.0)  # "garbage" is one word
    test = details["significance"]["scores"]["words"]
    assert details["significance"]["against_step"] == 3
    assert test["delta"] == pytest.approx(2.5) and 0 < test["p_value"] <= 1
    assert "exact" not in details["significance"]["scores"]  # neither paired_test nor sentence_scores
    assert details["analysis"]["errors"]["changes"]["better"] == 4
    assert third["details"]["best_step"] == 6 and third["details"]["delta_best"][COMPOSITE] == 0.0
    validation = json.loads((run_dir / "summary.json").read_text())["extra"]["validation"]
    assert validation["count"] == 3 and 0 < validation["share_of_wall_time"] < 1


def test_no_teacher_scoring_when_the_recipe_says_so(write, toy_plugins: Plugins) -> None:
    _, run_dir = _run(
        write,
        toy_plugins,
        ["validation.teacher=false", "validation.save_hypotheses=false", "validation.analysis.enabled=false"],
    )
    record = _history(run_dir)[-1]
    assert not {"teacher", "retention", "hypotheses", "analysis"} & set(record["details"])
    assert not (run_dir / "validation" / "teacher.json").exists()


def test_an_analysis_hook_adds_its_findings_to_the_record(write, toy_plugins: Plugins) -> None:
    class Lengths:
        @hookimpl
        def cvmkd_analyze(self, state: Any, sample: TranslationSample) -> dict[str, Any]:
            return {"lengths": [len(h) for h in sample.hypotheses]}

    toy_plugins.add_plugin(Lengths(), name="lengths", source="test")
    _, run_dir = _run(write, toy_plugins, [])
    analysis = _history(run_dir)[-1]["details"]["analysis"]
    assert analysis["lengths"] == [7, 7, 7, 7]  # "garbage"
    assert "errors" in analysis


def test_a_composite_weight_on_an_unknown_score_stops_before_the_run(write, toy_hook_file, capsys) -> None:
    recipe = write(
        "r.toml", TOY_RECIPE.replace('metrics = ["exact"]', 'metrics = ["exact"]\ncomposite = {exact = 1, bleu = 1}')
    )
    status = main(["check", str(recipe), "--plugin", str(toy_hook_file)])
    assert status == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {recipe}: validation.composite: no selected metric returns 'bleu'; available scores: exact"
    )


class PhaseRecorder:
    """Records the finalize hooks, in the order they fire."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    @hookimpl
    def cvmkd_export(self, state: Any) -> None:
        self.calls.append(f"export ({state.phase})")

    @hookimpl
    def cvmkd_evaluate(self, state: Any, summary: Any) -> None:
        self.calls.append(f"evaluate ({state.phase})")
        summary[EVALUATION] = TestEvaluation(split="test", sentences=0, beam_size=1, scores={})

    @hookimpl
    def cvmkd_quantize(self, state: Any) -> None:
        self.calls.append(f"quantize ({state.phase})")

    @hookimpl(tryfirst=True)
    def cvmkd_finalize(self, state: Any, summary: Any) -> None:
        self.calls.append(f"finalize ({state.phase}), evaluation {'set' if summary[EVALUATION] else 'not set'}")

    @hookimpl
    def cvmkd_record_outcome(self, state: Any) -> None:
        self.calls.append(f"record_outcome ({state.phase})")

    @hookimpl
    def cvmkd_report(self, state: Any) -> None:
        self.calls.append("report")


def test_the_finalize_phases_fire_in_their_stated_order(write, toy_plugins: Plugins) -> None:
    # registered last and tryfirst, and yet its plain cvmkd_finalize comes after the phases
    recorder = PhaseRecorder()
    toy_plugins.add_plugin(recorder, name="phases", source="test")
    try:
        summary, run_dir = _run(write, toy_plugins, [])
    finally:
        toy_plugins.remove_plugin("phases")
    assert recorder.calls == [
        "export (export)",
        "evaluate (evaluate)",
        "quantize (quantize)",
        "finalize (finalize), evaluation set",
        "record_outcome (record_outcome)",
        "report",
    ]
    saved = json.loads((run_dir / "summary.json").read_text())
    assert list(saved)[-4:] == ["evaluation", "quantized", "gate", "extra"]
    assert saved["evaluation"]["split"] == "test" and saved["quantized"] == [] and saved["gate"] is None
