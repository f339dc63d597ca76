"""The finalize phases of a distillation run (``cvmkd_export``, ``cvmkd_evaluate``,
``cvmkd_quantize``, fired in that order by this module's ``cvmkd_finalize`` wrapper), and test
evaluation (``cvmkd_evaluate``, phase 2): the trained model, and its teacher when
the trainer has one, translate the test split and are scored with every selected metric; the
student's errors there are analysed. The full record goes to ``evaluation.json``; the test split's
sources and references and each model's translations go beside it as plain text, one line per
sentence (``test.src``, ``test.ref``, ``test.<model>.hyp``), so anyone can score them again.

It works with any :class:`~cvmkd_validation.contract.TranslationTrainer` that has a test split;
the size and speed of its models (``measure_models``) are stored as ``models``.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from cvmkd_core.files import atomic_write_json, atomic_write_text
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.plugins import add_hookspecs
from cvmkd_core.state import RunState, RunSummary
from cvmkd_validation import hookspecs
from cvmkd_validation.analysis import analyse
from cvmkd_validation.contract import TranslationTrainer
from cvmkd_validation.metrics import retention
from cvmkd_validation.records import EVALUATION, EVALUATION_RECORD, GATE, QUANTIZED, TestEvaluation, TranslationSample
from cvmkd_validation.validation import (
    _lines,
    bootstrap_teacher,
    retention_bounds,
    score_all,
    score_specs,
    score_with_sentences,
)

log = logging.getLogger("cvmkd")

EVALUATION_FILE = "evaluation.json"


def evaluate(
    state: RunState, trainer: TranslationTrainer, test: tuple[list[str], list[str], str], extra_beams: list[int]
) -> dict[str, Any]:
    """Score the trained model (and the teacher) on the test split; returns the full record."""
    sources, references, split = test
    beam = state.recipe.section("validation").beam_size
    role = trainer.role
    result: dict[str, Any] = {"split": split, "sentences": len(sources), "beam_size": beam}
    outputs: dict[str, list[str]] = {}
    sentences: dict[str, dict[str, list[float]]] = {}
    for name in [role] + (["teacher"] if role != "teacher" else []):
        started = time.perf_counter()
        # the teacher's are cached: the same teacher is scored once on the same sentences
        translated = (
            trainer.translate(state, sources, beam_size=beam)
            if name == role
            else trainer.teacher_translations(state, sources, beam_size=beam)
        )
        if translated is None:
            continue
        hypotheses = translated
        seconds = time.perf_counter() - started
        outputs[name] = hypotheses
        scores, sentences[name] = score_with_sentences(state, hypotheses, references, sources)
        result[name] = {
            "scores": scores,
            "decode_seconds": round(seconds, 2),
            "hypotheses": f"{split}.{name}.hyp",
            "examples": [
                {"source": s, "reference": r, "hypothesis": h}
                for s, r, h in list(zip(sources, references, hypotheses))[:5]
            ],
        }
    for extra in extra_beams or []:
        if extra == beam:
            continue
        started = time.perf_counter()
        hypotheses = trainer.translate(state, sources, beam_size=extra)
        result[role].setdefault("by_beam_size", {})[str(extra)] = {
            "scores": score_all(state, hypotheses, references, sources),
            "decode_seconds": round(time.perf_counter() - started, 2),
        }
    if "teacher" in result and role != "teacher":
        result["retention"] = retention(result[role]["scores"], result["teacher"]["scores"], score_specs(state))
        # the same resampled sentences for the teacher and every model scored after it
        bootstrap_teacher(state, outputs["teacher"], references, sources, sentences["teacher"])
        bounds = retention_bounds(state, outputs[role], references, sources, sentences[role])
        if bounds is not None:
            result["retention_interval"] = bounds
            result["retention_samples"] = state.recipe.section("validation").retention_samples
    config = state.recipe.section("validation").analysis
    if config.enabled:
        sample = TranslationSample(step=state.step, sources=sources, references=references, hypotheses=outputs[role])
        result[role]["analysis"] = analyse(sample, worst=config.worst, examples=config.examples)
    atomic_write_text(state.run_dir / f"{split}.src", _lines(sources))
    atomic_write_text(state.run_dir / f"{split}.ref", _lines(references))
    for name, hypotheses in outputs.items():
        atomic_write_text(state.run_dir / f"{split}.{name}.hyp", _lines(hypotheses))
    return result


@hookimpl
def cvmkd_addhooks(pluginmanager: Any) -> None:
    add_hookspecs(pluginmanager, hookspecs)


@hookimpl(wrapper=True)
def cvmkd_finalize(state: RunState, summary: RunSummary) -> Any:
    """The phases first, in their order; then every plain ``cvmkd_finalize`` (the gate...)."""
    # summary.json holds them, in this order, even when nothing sets them
    summary.results.setdefault(EVALUATION, None)
    summary.results.setdefault(QUANTIZED, [])
    summary.results.setdefault(GATE, None)
    for name in hookspecs.PHASES:
        state.phase = name.removeprefix("cvmkd_")
        getattr(state.pm.hook, name)(state=state, summary=summary)
    state.phase = "finalize"
    return (yield)


@hookimpl
def cvmkd_evaluate(state: RunState, summary: RunSummary) -> None:
    trainer = state.trainer
    if summary.status not in ("completed", "stopped") or not isinstance(trainer, TranslationTrainer):
        return
    test = trainer.test_data(state)
    if trainer.model is None or test is None:
        return
    record = evaluate(state, trainer, test, trainer.test_beam_sizes())
    if models := trainer.measure_models(state):
        record["models"] = models
    path = state.run_dir / EVALUATION_FILE
    atomic_write_json(path, record)
    state.stash[EVALUATION_RECORD] = record
    role = trainer.role
    summary[EVALUATION] = evaluation = TestEvaluation(
        split=record["split"],
        sentences=record["sentences"],
        beam_size=record["beam_size"],
        scores={name: record[name]["scores"] for name in (role, "teacher") if name in record},
        retention=record.get("retention", {}),
        retention_interval=record.get("retention_interval", {}),
        file=str(path),
    )
    summary.outputs["evaluation"] = str(path)
    for key, share in evaluation.retention.items():
        if share is not None:
            bound = evaluation.retention_interval.get(key)
            log.info(
                "test %s: student %.2f, teacher %.2f (%.1f%% of the teacher%s)",
                key,
                record[role]["scores"][key],
                record["teacher"]["scores"][key],
                100 * share,
                f"; 95% interval {100 * bound[0]:.1f}-{100 * bound[1]:.1f}%" if bound else "",
            )
    if role == "teacher" or "teacher" not in record:
        scores = record[role]["scores"]
        log.info("%s on the %s split: %s", role, record["split"], ", ".join(f"{k} {v:.2f}" for k, v in scores.items()))
