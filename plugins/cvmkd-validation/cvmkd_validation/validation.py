"""Built-in validation: the trainer translates the held-out set, every selected metric scores it,
and the record says how that compares with the teacher, the previous validation and the best.

What one validation does (``docs/validation.md`` describes every key it writes):

1. the student translates the validation sentences (greedy or beam, per recipe), timed;
2. every selected metric scores them; metrics with ``sentence_scores`` keep their per-sentence
   values; the composite score is the recipe's weighted mean of normalised scores;
3. the teacher is translated and scored once per run (the trainer caches its translations), and
   the record holds the student's retention of it, per score;
4. deltas against the previous validation and against the best one so far, and a paired
   bootstrap test against the previous validation's hypotheses, per score;
5. ``cvmkd_analyze`` implementations analyse the translations (the built-in error analysis);
6. the hypotheses are written beside the record; one summary line goes to the log.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cvmkd_core.errors import CvmkdError
from cvmkd_core.files import atomic_write_json, atomic_write_text
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.plugins import add_hookspecs
from cvmkd_core.stash import StashKey
from cvmkd_core.state import RunState, ValidationRecord, ValidationResult
from cvmkd_validation import hookspecs
from cvmkd_validation.contract import TranslationTrainer
from cvmkd_validation.errors import MetricError
from cvmkd_validation.metrics import (
    COMPOSITE,
    PairedTestMetric,
    ResampledMetric,
    ScoreSpec,
    SentenceMetric,
    all_specs,
    composite,
    composite_weights,
    metric_specs,
    retention,
)
from cvmkd_validation.records import TranslationSample
from cvmkd_validation.statistics import _normalised, deltas, paired_bootstrap, resample_indices, retention_interval

if TYPE_CHECKING:
    from cvmkd_core.recipe import ComponentRef

log = logging.getLogger("cvmkd")


#: what one validation keeps for the next: the previous translations, the teacher's scores
MEMORY: StashKey[dict[str, Any]] = StashKey("cvmkd.validation", dict)
#: the resampled test sentences and the teacher's score on each resample: every model scored on
#: the test split after it (the student, each quantized variant) gets the interval of its
#: retention from the same resamples
TEST_RESAMPLES: StashKey[dict[str, Any]] = StashKey("cvmkd.validation.test_resamples")


def selected_metrics(state: RunState) -> list[tuple[str, Any]]:
    """``(recipe path, metric)`` of every metric the recipe selected."""
    return [(s.path, s.component) for s in state.selected("metric")]


def score_specs(state: RunState) -> dict[str, ScoreSpec]:
    """Every score key of the selected metrics, and the composite, with direction and range."""
    return all_specs(selected_metrics(state))


def score_metrics(
    state: RunState, hypotheses: list[str], references: list[str], sources: list[str]
) -> tuple[dict[str, float], dict[str, list[float]], dict[str, float]]:
    """Scores of every selected metric, the per-sentence scores of those that give them, and
    each metric's seconds. A key returned twice, or not declared, is an error."""
    scores: dict[str, float] = {}
    sentences: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    for path, metric in selected_metrics(state):
        started = time.perf_counter()
        declared = all_specs([(path, metric)])
        if isinstance(metric, SentenceMetric):
            per_sentence = metric.sentence_scores(hypotheses, references, sources)
            values = {k: (sum(v) / len(v) if v else 0.0) for k, v in per_sentence.items()}
            for key, v in per_sentence.items():
                if len(v) != len(hypotheses):
                    raise MetricError(
                        f"{path}: sentence_scores gave {len(v)} values of {key!r} for {len(hypotheses)} sentences"
                    )
                sentences[key] = [float(x) for x in v]
        else:
            values = metric.score(hypotheses, references, sources)
        for key, value in values.items():
            if key in scores:
                raise MetricError(f"{path}: metric score {key!r} is also returned by another metric")
            if key not in declared:
                raise MetricError(f"{path}: metric returned {key!r}, which it does not declare in its scores")
            scores[key] = float(value)
        seconds[_metric_name(state, path)] = round(time.perf_counter() - started, 3)
    return scores, sentences, seconds


def _metric_name(state: RunState, path: str) -> str:
    """``bleu`` for ``validation.metrics[0]`` (``bleu-0`` when two entries share a name)."""
    return next((s.label for s in state.selected("metric") if s.path == path), path)


def score_all(state: RunState, hypotheses: list[str], references: list[str], sources: list[str]) -> dict[str, float]:
    """Every selected metric's scores of ``hypotheses``, and the composite score."""
    return score_with_sentences(state, hypotheses, references, sources)[0]


def score_with_sentences(
    state: RunState, hypotheses: list[str], references: list[str], sources: list[str]
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """:func:`score_all`'s scores, and the per-sentence scores of the metrics that give them (for
    the bootstrap of retention, without scoring the sentences again)."""
    scores, sentences, _ = score_metrics(state, hypotheses, references, sources)
    value = composite(scores, _weights(state), score_specs(state))
    if value is not None:
        scores[COMPOSITE] = value
    return scores, sentences


def resampled_scores(
    state: RunState,
    hypotheses: list[str],
    references: list[str],
    sources: list[str],
    indices: Any,
    sentences: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """Per score key, the composite included, the score of every resample of the sentences (a
    row of ``indices``): a resampling metric's own (BLEU from sacrebleu's statistics), the mean
    of a sentence metric's scores (``sentences`` when already computed). A metric that can do
    neither leaves its keys, and the composite that weighs them, out."""
    import numpy as np

    rows = np.asarray(indices)
    values: dict[str, Any] = {}
    for _, metric in selected_metrics(state):
        if isinstance(metric, ResampledMetric):
            scored = metric.resampled_scores(hypotheses, references, sources, rows)
            values.update({k: np.asarray(v, dtype=float) for k, v in scored.items()})
        elif isinstance(metric, SentenceMetric):
            keys = list(metric_specs(metric))
            given = sentences if sentences is not None and all(k in sentences for k in keys) else None
            per_sentence = given or metric.sentence_scores(hypotheses, references, sources)
            values.update({k: np.asarray(per_sentence[k], dtype=float)[rows].mean(1) for k in keys})
    weights, specs = _weights(state), score_specs(state)
    if weights and all(k in values for k in weights):
        total = sum(weights.values())
        values[COMPOSITE] = 100.0 * sum(w * _normalised(values[k], specs[k]) for k, w in weights.items()) / total
    return values


def bootstrap_teacher(
    state: RunState,
    teacher: list[str],
    references: list[str],
    sources: list[str],
    sentences: dict[str, list[float]] | None = None,
) -> None:
    """Draw the test split's resamples (``[validation] retention_samples``, seeded) and score the
    teacher on each, for :func:`retention_bounds` of every model scored after it."""
    samples = state.recipe.section("validation").retention_samples
    if not samples or not references:
        return
    indices = resample_indices(len(references), samples)
    scores = resampled_scores(state, teacher, references, sources, indices, sentences)
    state.stash[TEST_RESAMPLES] = {"indices": indices, "teacher": scores, "samples": samples}


def retention_bounds(
    state: RunState,
    hypotheses: list[str],
    references: list[str],
    sources: list[str],
    sentences: dict[str, list[float]] | None = None,
) -> dict[str, list[float] | None] | None:
    """The 95% bootstrap interval of a model's retention of the teacher, per score key, on the
    resamples :func:`bootstrap_teacher` drew (the same sentences for both: a paired bootstrap);
    None when none were drawn."""
    bank = state.stash.get(TEST_RESAMPLES, None)
    if bank is None or len(bank["indices"][0]) != len(references):
        return None
    ours = resampled_scores(state, hypotheses, references, sources, bank["indices"], sentences)
    return retention_interval(ours, bank["teacher"], score_specs(state))


def higher_is_better(state: RunState) -> dict[str, bool]:
    """Per score key of the selected metrics: whether a higher value is better (TER: no)."""
    return {k: spec.higher_is_better for k, spec in score_specs(state).items()}


def _weights(state: RunState) -> dict[str, float]:
    return composite_weights(state.recipe.section("validation").composite, score_specs(state), "validation.composite")


def _memory(state: RunState) -> dict[str, Any]:
    return state.stash[MEMORY]


@hookimpl
def cvmkd_addhooks(pluginmanager: Any) -> None:
    add_hookspecs(pluginmanager, hookspecs)


@hookimpl
def cvmkd_register(register: Any) -> None:
    from cvmkd_validation.config import ValidationConfig

    register.kind("metric", "a quality metric scored on translations against their references")
    register.section("validation", ValidationConfig)


@hookimpl
def cvmkd_check(state: RunState) -> None:
    """Check the composite's weights against the metrics' keys before any training."""
    if selected_metrics(state):
        _weights(state)


@hookimpl
def cvmkd_validate(state: RunState) -> ValidationResult | None:
    metrics = selected_metrics(state)
    if not metrics:
        return None
    trainer = state.trainer
    if not isinstance(trainer, TranslationTrainer):
        # typed as its base class: cvmkd_core makes TrainerRef at runtime, which mypy cannot use as a type
        distill: ComponentRef = state.recipe.distill
        raise CvmkdError(f"trainer {distill.name!r} cannot translate, so metrics cannot score it")
    config = state.recipe.section("validation")
    sources, references = trainer.validation_data(state)
    if config.max_sentences:
        sources, references = sources[: config.max_sentences], references[: config.max_sentences]

    started = time.perf_counter()
    hypotheses = trainer.translate(state, sources, beam_size=config.beam_size)
    decode_seconds = time.perf_counter() - started
    scores, sentence_scores, metric_seconds = score_metrics(state, hypotheses, references, sources)
    specs = score_specs(state)
    weights = _weights(state)
    value = composite(scores, weights, specs)
    if value is not None:
        scores[COMPOSITE] = value
    details: dict[str, Any] = {
        "sentences": len(sources),
        "beam_size": config.beam_size,
        "decode_seconds": round(decode_seconds, 3),
        "metric_seconds": metric_seconds,
        "composite_weights": weights,
        "higher_is_better": {k: s.higher_is_better for k, s in specs.items()},
    }
    words = sum(len(h.split()) for h in hypotheses)
    details["words_per_second"] = round(words / decode_seconds, 1) if decode_seconds > 0 else None
    signatures = {k: m.signature for _, m in metrics if getattr(m, "signature", "") for k in metric_specs(m)}
    if signatures:
        details["signatures"] = signatures

    memory = _memory(state)
    teacher = _teacher(state, trainer, sources, references, memory)
    if teacher is not None:
        details["teacher"] = {"scores": teacher["scores"], "decode_seconds": teacher["decode_seconds"]}
        details["retention"] = retention(scores, teacher["scores"], specs)

    previous = _last_accepted(state.history)
    if previous is not None:
        details["previous_step"] = previous.step
        details["delta_previous"] = deltas(scores, previous.scores)
    best = _best(state.history)
    if best is not None:
        details["best_step"] = best.step
        details["delta_best"] = deltas(scores, best.scores)

    previous_hypotheses = _previous_hypotheses(state, previous, memory, len(sources))
    if previous is not None and previous_hypotheses is not None and config.significance_samples:
        started = time.perf_counter()
        details["significance"] = {
            "against_step": previous.step,
            "test": "paired bootstrap",
            "samples": config.significance_samples,
            "scores": _significance(
                state, previous_hypotheses, hypotheses, references, sources, sentence_scores, memory
            ),
            "seconds": round(time.perf_counter() - started, 3),
        }

    if state.recipe.section("validation").analysis.enabled:
        sample = TranslationSample(
            step=state.step,
            sources=sources,
            references=references,
            hypotheses=hypotheses,
            previous=previous_hypotheses,
            previous_step=previous.step if previous is not None else None,
        )
        analysis: dict[str, Any] = {}
        for part in state.pm.hook.cvmkd_analyze(state=state, sample=sample):
            for name, findings in (part or {}).items():
                if name in analysis:
                    raise CvmkdError(f"two plugins returned the analysis {name!r}")
                analysis[name] = findings
        if analysis:
            details["analysis"] = analysis

    if config.save_hypotheses:
        name = f"step_{state.step:08d}_it{state.iterations:08d}.hyp.txt"
        atomic_write_text(state.run_dir / "validation" / name, _lines(hypotheses))
        details["hypotheses"] = name
    memory["previous"] = {
        "step": state.step,
        "iteration": state.iterations,
        "hypotheses": hypotheses,
        "sentence_scores": sentence_scores,
    }
    log.info("%s", summary_line(state.step, scores, details))
    return ValidationResult(scores=scores, details=details, rank=scores.get(COMPOSITE))


# --- the parts ------------------------------------------------------------------------------


def _lines(texts: list[str]) -> str:
    return "".join(t.replace("\n", " ") + "\n" for t in texts)


def _last_accepted(history: list[ValidationRecord]) -> ValidationRecord | None:
    accepted = [r for r in history if not r.rolled_back]
    return accepted[-1] if accepted else None


def _best(history: list[ValidationRecord]) -> ValidationRecord | None:
    scored = [r for r in history if not r.rolled_back and COMPOSITE in r.scores]
    return max(scored, key=lambda r: r.scores[COMPOSITE]) if scored else None


def _teacher(
    state: RunState, trainer: TranslationTrainer, sources: list[str], references: list[str], memory: dict[str, Any]
) -> dict[str, Any] | None:
    """The teacher's scores on the validation sentences: translated and scored once per run."""
    if not state.recipe.section("validation").teacher:
        return None
    cached = memory.get("teacher")
    if cached is not None and cached["sources"] == len(sources):
        return cached
    started = time.perf_counter()
    hypotheses = trainer.teacher_translations(state, sources, beam_size=state.recipe.section("validation").beam_size)
    if hypotheses is None:
        return None
    decode_seconds = time.perf_counter() - started
    scores = score_all(state, hypotheses, references, sources)
    record = {
        "sources": len(sources),
        "scores": scores,
        "decode_seconds": round(decode_seconds, 3),
        "hypotheses": "teacher.hyp.txt",
    }
    directory = state.run_dir / "validation"
    atomic_write_text(directory / "teacher.hyp.txt", _lines(hypotheses))
    atomic_write_json(directory / "teacher.json", {**record, "beam_size": state.recipe.section("validation").beam_size})
    log.info(
        "teacher on the %d validation sentences: %s",
        len(sources),
        ", ".join(f"{k} {v:.2f}" for k, v in scores.items()),
    )
    memory["teacher"] = record
    return record


def _previous_hypotheses(
    state: RunState, previous: ValidationRecord | None, memory: dict[str, Any], count: int
) -> list[str] | None:
    """The previous validation's hypotheses: from memory, or (after a resume) from its file."""
    if previous is None:
        return None
    remembered = memory.get("previous")
    if remembered and remembered["step"] == previous.step and remembered["iteration"] == previous.iteration:
        hypotheses = remembered["hypotheses"]
    else:
        name = previous.details.get("hypotheses")
        path = state.run_dir / "validation" / name if name else None
        if path is None or not Path(path).is_file():
            return None
        hypotheses = Path(path).read_text(encoding="utf-8").split("\n")[:-1]
        memory.pop("previous", None)
    return hypotheses if len(hypotheses) == count else None


def _significance(
    state: RunState,
    baseline: list[str],
    hypotheses: list[str],
    references: list[str],
    sources: list[str],
    sentence_scores: dict[str, list[float]],
    memory: dict[str, Any],
) -> dict[str, Any]:
    samples = state.recipe.section("validation").significance_samples
    seed = state.recipe.run.seed + 12345
    results: dict[str, Any] = {}
    remembered = memory.get("previous") or {}
    for _path, metric in selected_metrics(state):
        if isinstance(metric, PairedTestMetric):
            results.update(metric.paired_test(baseline, hypotheses, references, sources, samples=samples))
        elif isinstance(metric, SentenceMetric):
            before = remembered.get("sentence_scores") or {}
            keys = list(metric_specs(metric))  # its declared keys (``scores``, or the older ``higher_is_better``)
            if any(k not in before for k in keys):
                before = {**before, **metric.sentence_scores(baseline, references, sources)}
            for key in keys:
                if key in sentence_scores and key in before:
                    results[key] = paired_bootstrap(before[key], sentence_scores[key], samples=samples, seed=seed)
    return results


def summary_line(step: int, scores: dict[str, float], details: dict[str, Any]) -> str:
    """One log line: each score with its change since the previous validation and the test's
    p-value, the composite's retention of the teacher, and the decoding time."""
    parts = []
    delta = details.get("delta_previous", {})
    significance = (details.get("significance") or {}).get("scores", {})
    for key, value in scores.items():
        text = f"{key} {value:.2f}"
        if key in delta:
            text += f" ({delta[key]:+.2f}"
            p = (significance.get(key) or {}).get("p_value")
            text += f", p={p:.3f})" if p is not None else ")"
        parts.append(text)
    line = f"validation step {step}: " + ", ".join(parts)
    share = (details.get("retention") or {}).get(COMPOSITE)
    if share is not None:
        line += f"; composite {100 * share:.0f}% of the teacher's"
    if "best_step" in details:
        line += f"; best so far: step {details['best_step']}"
    line += f"; decoded {details['sentences']} sentences in {details['decode_seconds']:.1f}s"
    return line
