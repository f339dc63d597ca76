"""Quantize the distilled student with every ``[[quantize]]`` component and measure each variant
the same way: scores on the test split and retention of the teacher, the quality budget against
the fp32 student on the validation split, size on disk, parameter memory, and CPU translation
latency (batch 1) and throughput (batch 32). Each variant is packaged like the fp32 model, in
``runs/<name>/model-<label>/``.

A quantizer component implements ``quantize(model, context) -> QuantizationResult``; ``model`` is
a float32 CPU copy of the student it may change in place. See ``docs/quantization.md``.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import torch

from cvmkd_core.errors import CvmkdError
from cvmkd_core.files import atomic_write_json
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.stash import StashKey
from cvmkd_core.state import RunState, RunSummary
from cvmkd_kd.trainer import Seq2SeqTrainer
from cvmkd_nmt.contracts import QuantizationContext, QuantizationResult, within_budget
from cvmkd_nmt.model.translate import source_batches
from cvmkd_validation.metrics import COMPOSITE, retention
from cvmkd_validation.records import EVALUATION, EVALUATION_RECORD, QUANTIZED
from cvmkd_validation.validation import retention_bounds, score_all, score_specs, score_with_sentences

log = logging.getLogger("cvmkd")

#: the fp32 model's scores and speeds the variants were compared with (``quantization.json``)
QUANTIZATION_BASELINE: StashKey[dict[str, Any]] = StashKey("quantization_baseline")


#: each speed is the best of this many timings: one timing of a 2-core CPU varied by ±20% between
#: runs (the default run's QAT student measured 1.45x and 1.71x fp32 at batch 32 in two runs)
SPEED_REPEATS = 3


def measure_speed(
    model: Any, tokenizer: Any, sources: list[str], *, batch_size: int, steps: int = 32, repeats: int = 1
) -> dict[str, float]:
    """CPU decoding speed: encode ``sources`` in batches of ``batch_size`` and decode exactly
    ``steps`` tokens for each (eos ignored), so the number does not depend on how long the
    model's outputs are. One warm-up batch first; the best of ``repeats``."""
    from cvmkd_nmt.model.decoding import timed_decode

    # model: a CvmTransformer, or a quantized copy of one (same interface, other layer classes)
    batches = source_batches(tokenizer, sources, model.config.max_len, batch_size)
    timed_decode(model, batches[0], steps)  # warm-up
    seconds = min(sum((timed_decode(model, b, steps) for b in batches), 0.0) for _ in range(max(repeats, 1)))
    tokens = len(sources) * steps
    return {
        "sentences": len(sources),
        "batch_size": batch_size,
        "steps": steps,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else 0.0,
        "ms_per_sentence": round(1000 * seconds / max(len(sources), 1), 2),
    }


def float_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A float32 CPU copy of ``model`` in eval mode, with layers a training-time plugin swapped
    (fake quantization) put back to their float class: what a quantizer starts from and what
    speed is compared against."""
    fp32 = copy.deepcopy(model).float().cpu().eval()
    for module in fp32.modules():
        restore = getattr(type(module), "cvmkd_float_class", None)
        if restore is not None:
            module.__class__ = restore
    return fp32


def size_and_speed(model: torch.nn.Module, tokenizer: Any, sources: list[str], package: Path | None) -> dict[str, Any]:
    """Parameters, parameter memory, file size and CPU decoding speed of one model, measured the
    same way for the teacher, the student and every quantized variant: latency at batch 1 on the
    first 32 ``sources``, throughput at batch 32 on the first 256, 32 tokens per sentence."""
    from cvmkd_nmt.quantized import model_nbytes

    return {
        "parameters": sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()),
        "parameter_bytes": model_nbytes(model),
        "file_bytes": _file_bytes(package)
        if package is not None and (package / "model.safetensors").is_file()
        else None,
        "latency": measure_speed(model, tokenizer, sources[:32], batch_size=1, repeats=SPEED_REPEATS),
        "throughput": measure_speed(model, tokenizer, sources[:256], batch_size=32, repeats=SPEED_REPEATS),
    }


def _file_bytes(directory: Path) -> int:
    from cvmkd_nmt.model.package import WEIGHTS

    return (directory / WEIGHTS).stat().st_size


def quantize_all(trainer: Seq2SeqTrainer, state: RunState, evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """Run every selected quantizer on the student; measure, budget-check and package each."""
    from cvmkd_nmt.model.package import save_package
    from cvmkd_nmt.model.translate import translate

    quantizers = state.selected("quantizer")
    if not quantizers:
        return []
    assert trainer.data is not None and trainer.model is not None
    tokenizer = trainer.data.tokenizer
    config = state.recipe.section("validation")
    valid = trainer.data.splits.valid
    limit = config.max_sentences or len(valid)
    sources, references = [p[0] for p in valid][:limit], [p[1] for p in valid][:limit]
    test = trainer.data.splits.test or trainer.data.splits.valid
    test_sources, test_references = [p[0] for p in test], [p[1] for p in test]
    specs = score_specs(state)
    teacher_scores = (evaluation.get("teacher") or {}).get("scores")

    def run(model: torch.nn.Module, texts: list[str], batch_size: int = 64, precision: str = "fp32") -> list[str]:
        return translate(
            model,
            tokenizer,
            texts,
            beam_size=config.beam_size,
            batch_size=batch_size,
            device="cpu",
            precision=precision,
        )

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        return score_all(state, run(model, sources), references, sources)

    def calibration_batches(count: int) -> list[torch.Tensor]:
        return source_batches(tokenizer, sources, trainer.model.config.max_len, 32, count)

    fp32 = float_copy(trainer.model)
    started = time.perf_counter()
    reference_scores = evaluate(fp32)
    context = QuantizationContext(
        tokenizer=tokenizer,
        sources=sources,
        references=references,
        evaluate=evaluate,
        reference_scores=reference_scores,
        calibration_batches=calibration_batches,
        seed=state.recipe.run.seed,
    )
    # the student's size and speed were measured beside the teacher's for evaluation.json
    measured = evaluation.get("models", {}).get("student") or size_and_speed(
        fp32, tokenizer, test_sources, state.run_dir / "model"
    )
    baseline = {
        "scheme": "fp32",
        **{k: v for k, v in measured.items() if k != "parameters"},
        "validation_scores": reference_scores,
    }
    log.info(
        "fp32 student: %.0f tokens/s at batch 32, %.1f ms/sentence at batch 1 (measured %.0fs)",
        baseline["throughput"]["tokens_per_second"],
        baseline["latency"]["ms_per_sentence"],
        time.perf_counter() - started,
    )
    results: list[dict[str, Any]] = []
    for chosen in quantizers:
        path, label, quantizer = chosen.path, chosen.label, chosen.component
        began = time.perf_counter()
        try:
            result = quantizer.quantize(copy.deepcopy(fp32), context)
            if not isinstance(result, QuantizationResult):
                raise CvmkdError(f"quantize() returned {type(result).__name__}, not a QuantizationResult")
        except Exception as exc:  # one failing scheme must not cost the others (or the run's outputs)
            error = f"{type(exc).__name__}: {exc}"
            log.error("quantizer %s (%s) failed: %s", label, path, error)
            results.append({"name": label, "component": path, "scheme": None, "accepted": False, "error": error})
            continue
        model = result.model.eval()
        valid_scores = evaluate(model)
        budget = getattr(quantizer, "config", None)
        ok, losses = within_budget(
            valid_scores,
            reference_scores,
            max_bleu_loss=getattr(budget, "max_bleu_loss", 1.0),
            max_composite_loss=getattr(budget, "max_composite_loss", 0.02),
        )
        outputs = run(model, test_sources)
        scores, sentences = score_with_sentences(state, outputs, test_references, test_sources)
        # a variant over the quality budget is kept for inspection, under a name that says so
        directory = state.run_dir / (f"model-{label}" if ok else f"model-{label}-rejected")
        metadata = {
            "role": "quantized-student",
            "scheme": result.scheme,
            "quantization": {"scheme": result.scheme, **result.details},
            "source_model": str(state.run_dir / "model"),
            "within_budget": ok,
            "split": "test" if trainer.data.splits.test else "valid",
            "test_scores": scores,
            "retention": retention(scores, teacher_scores, specs) if teacher_scores else {},
        }
        save_package(directory, model, tokenizer, metadata)  # type: ignore[arg-type]  # a quantized CvmTransformer
        entry = {
            "name": label,
            "component": path,
            "scheme": result.scheme,
            "details": result.details,
            "package": str(directory),
            "accepted": ok,
            "budget": {
                "losses_on_validation": losses,
                "max_bleu_loss": getattr(budget, "max_bleu_loss", 1.0),
                "max_composite_loss": getattr(budget, "max_composite_loss", 0.02),
            },
            "validation_scores": valid_scores,
            "scores": scores,
            "retention": retention(scores, teacher_scores, specs) if teacher_scores else {},
            "retention_of_student": retention(scores, evaluation["student"]["scores"], specs),
            # the same resampled test sentences as the student's interval
            **(
                {"retention_interval": bounds}
                if teacher_scores
                and (bounds := retention_bounds(state, outputs, test_references, test_sources, sentences)) is not None
                else {}
            ),
            **size_and_speed(model, tokenizer, test_sources, directory),
            "seconds": 0.0,
        }
        if baseline["file_bytes"]:
            entry["file_ratio"] = round(entry["file_bytes"] / baseline["file_bytes"], 4)
        entry["parameter_ratio"] = round(entry["parameter_bytes"] / baseline["parameter_bytes"], 4)
        entry["speedup_batch32"] = round(
            entry["throughput"]["tokens_per_second"] / max(baseline["throughput"]["tokens_per_second"], 1e-9), 3
        )
        entry["speedup_batch1"] = round(
            baseline["latency"]["ms_per_sentence"] / max(entry["latency"]["ms_per_sentence"], 1e-9), 3
        )
        entry["seconds"] = round(time.perf_counter() - began, 1)
        log.info(
            "quantized %s (%s): test %s; file %.0f%% of fp32, %.2fx tokens/s at batch 32, %.2fx at batch 1; %s",
            label,
            result.scheme,
            ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if k in ("bleu", "chrf", COMPOSITE)),
            100 * entry.get("file_ratio", float("nan")),
            entry["speedup_batch32"],
            entry["speedup_batch1"],
            "within the quality budget" if ok else f"OVER the quality budget ({losses})",
        )
        results.append(entry)
    state.stash[QUANTIZATION_BASELINE] = baseline
    return results


@hookimpl
def cvmkd_quantize(state: RunState, summary: RunSummary) -> None:
    """Finalize phase 3: quantize the trained student with every ``[[quantize]]`` component.
    Works with the trainers of this plugin (``Seq2SeqTrainer``: the float model in ``model``,
    the ``RunData`` in ``data``); the test evaluation (phase 2) gives the scores the variants are compared with."""
    trainer = state.trainer
    if summary.status not in ("completed", "stopped") or summary[EVALUATION] is None or not state.selected("quantizer"):
        return
    if not isinstance(trainer, Seq2SeqTrainer) or trainer.model is None or trainer.data is None:
        return
    variants = quantize_all(trainer, state, state.stash.get(EVALUATION_RECORD, {}))
    if not variants:
        return
    atomic_write_json(
        state.run_dir / "quantization.json",
        {
            "baseline": state.stash.get(QUANTIZATION_BASELINE, None),
            "variants": variants,
        },
    )
    summary.outputs["quantization"] = str(state.run_dir / "quantization.json")
    keep = (
        "name",
        "scheme",
        "package",
        "accepted",
        "scores",
        "retention",
        "file_bytes",
        "file_ratio",
        "parameter_ratio",
        "speedup_batch32",
        "speedup_batch1",
        "budget",
        "error",
    )
    summary[QUANTIZED] = [{k: v.get(k) for k in keep} for v in variants]
    for v in variants:
        if v.get("package"):
            summary.outputs[f"model-{v['name']}"] = v["package"]
