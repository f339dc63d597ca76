"""What a report says, gathered once from a :class:`~cvmkd_reports.runview.RunView` into plain,
JSON-serialisable data. The Markdown and HTML writers render this and nothing else, so they
never disagree; the JSON writer writes it as it is.

Values that were not measured are ``None`` (rendered "not measured"); ``notes`` lists, one line
each, what the run directory lacks and what that leaves out of the report.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeGuard

from cvmkd_reports.runview import RunView

COMPOSITE = "composite"
#: pretty names of the scores the bundled metrics return; any other key is shown as it is
SCORE_LABELS = {
    "bleu": "BLEU",
    "chrf": "chrF",
    "ter": "TER",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "bertscore_p": "BERTScore P",
    "bertscore_r": "BERTScore R",
    "bertscore_f1": "BERTScore F1",
    "composite": "composite",
}
MB = 1_000_000


def score_label(key: str) -> str:
    return SCORE_LABELS.get(key, key)


# --- number formatting, shared by every writer ---------------------------------------------------


def is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: prefixes of the score keys on a 0-1 scale (BERTScore); the bundled metrics' others are on 0-100
UNIT_SCALE_PREFIXES: tuple[str, ...] = ("bertscore",)


def unit_scale(key: str) -> bool:
    """Whether ``key`` is a score on a 0-1 scale: 3 decimals in tables, ×100 in plots."""
    return key.startswith(UNIT_SCALE_PREFIXES)


def score_decimals(key: str) -> int:
    """Decimals of a score in tables: 2, or 3 for a score on a 0-1 scale."""
    return 3 if unit_scale(key) else 2


def fmt_score(value: Any, decimals: int = 2) -> str:
    """A score with ``decimals`` decimals (see :func:`score_decimals`) and thousands separators."""
    if not is_number(value):
        return "—"
    return f"{value:,.{decimals}f}"


def fmt_delta(value: Any, decimals: int = 2) -> str:
    return f"{value:+,.{decimals}f}" if is_number(value) else "—"


def fmt_p(value: Any) -> str:
    if not is_number(value):
        return "—"
    return "<0.001" if value < 0.001 else f"{value:.3f}"


def fmt_percent(share: Any) -> str:
    """A share (1.0 = 100%) as ``97.3%``."""
    return f"{100 * share:.1f}%" if is_number(share) else "—"


def fmt_int(value: Any) -> str:
    return f"{int(value):,}" if is_number(value) else "not measured"


def fmt_count(value: Any) -> str:
    """A parameter count, short: 8.91M, 44.2k, 512."""
    if not is_number(value):
        return "—"
    for threshold, size, suffix in ((1e9, 1e9, "B"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / size:.3g}{suffix}" if value / size < 100 else f"{value / size:,.0f}{suffix}"
    return f"{int(value):,}"


def fmt_mb(value: Any) -> str:
    return f"{value / MB:,.2f}" if is_number(value) else "not measured"


def fmt_ms(value: Any) -> str:
    return f"{value:,.2f}" if is_number(value) else "not measured"


def fmt_rate(value: Any) -> str:
    return f"{value:,.0f}" if is_number(value) else "not measured"


def fmt_seconds(value: Any) -> str:
    if not is_number(value):
        return "—"
    seconds = int(round(value))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
    return f"{clock} ({value:,.0f} s)"


def fmt_value(value: Any) -> str:
    """A recipe value as TOML would write it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(fmt_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {fmt_value(v)}" for k, v in value.items()) + "}"
    return str(value)


# --- helpers ------------------------------------------------------------------------------------


def _dict(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, Mapping) else {}


def _scores(value: Any) -> dict[str, float]:
    return {k: v for k, v in _dict(value).items() if is_number(v)}


def _first(*values: Any) -> Any:
    for value in values:
        if value is not None:
            return value
    return None


def _ordered_keys(*score_dicts: Mapping[str, Any]) -> list[str]:
    keys: list[str] = []
    for scores in score_dicts:
        for key in scores:
            if key not in keys:
                keys.append(key)
    if COMPOSITE in keys:  # the composite last, after the metrics it combines
        keys.remove(COMPOSITE)
        keys.append(COMPOSITE)
    return keys


def _speed(measured: Mapping[str, Any], which: str) -> tuple[float | None, int | None]:
    part = _dict(measured.get(which))
    key = "ms_per_sentence" if which == "latency" else "tokens_per_second"
    value = part.get(key)
    return (float(value) if is_number(value) else None), (
        part.get("batch_size") if is_number(part.get("batch_size")) else None
    )


def _model_row(name: str, role: str, measured: Mapping[str, Any], **fields: Any) -> dict[str, Any]:
    latency, latency_batch = _speed(measured, "latency")
    throughput, throughput_batch = _speed(measured, "throughput")
    row: dict[str, Any] = {
        "name": name,
        "role": role,
        "scheme": None,
        "status": None,
        "accepted": None,
        "package": None,
        "parameters": measured.get("parameters") if is_number(measured.get("parameters")) else None,
        "file_bytes": measured.get("file_bytes") if is_number(measured.get("file_bytes")) else None,
        "parameter_bytes": measured.get("parameter_bytes") if is_number(measured.get("parameter_bytes")) else None,
        "latency_ms_per_sentence": latency,
        "latency_batch_size": latency_batch,
        "throughput_tokens_per_second": throughput,
        "throughput_batch_size": throughput_batch,
        "scores": {},
        "retention": None,
        #: per score key, the 95% paired bootstrap interval of retention, [low, high]
        "retention_interval": None,
        "gate": None,
    }
    for key, value in fields.items():
        if value is not None or key not in row:
            row[key] = value
    return row


def _gate_for(gate: Mapping[str, Any] | None, model: str) -> bool | None:
    if not gate:
        return None
    checks = [c for c in gate.get("checks") or [] if isinstance(c, Mapping) and c.get("model") == model]
    judged = [c.get("passed") for c in checks if c.get("passed") is not None]
    return all(judged) if judged else None


# --- the sections -------------------------------------------------------------------------------


def models_section(run: RunView, notes: list[str]) -> dict[str, Any]:
    """Teacher, student and every quantized variant: size, speed, test scores, retention."""
    evaluation = _dict(run.evaluation)
    summary_eval = _dict((run.summary or {}).get("evaluation") or run.extra.get("evaluation"))
    summary_eval = {**summary_eval, **_dict(summary_eval.get("scores"))}  # {"scores": {"teacher": ...}} since 0.2
    trainer = _dict(run.extra.get("trainer"))
    teacher_info = _dict(trainer.get("teacher"))
    measured_models = _dict(evaluation.get("models"))
    quantization = _dict(run.quantization)
    baseline = _dict(quantization.get("baseline"))
    gate = run.gate

    teacher_scores = _scores(_dict(evaluation.get("teacher")).get("scores")) or _scores(summary_eval.get("teacher"))
    student_scores = _scores(_dict(evaluation.get("student")).get("scores")) or _scores(summary_eval.get("student"))
    student_retention = _dict(evaluation.get("retention")) or _dict(summary_eval.get("retention")) or None
    student_interval = (
        _dict(evaluation.get("retention_interval")) or _dict(summary_eval.get("retention_interval")) or None
    )

    # the teacher: measured beside the student (evaluation.json "models"), else what the run recorded
    teacher_measured = _dict(measured_models.get("teacher"))
    teacher_package = run.teacher.packages.get("model") if run.teacher is not None else None
    teacher_params = _first(
        teacher_measured.get("parameters"),
        teacher_info.get("parameters"),
        _dict(run.teacher.extra.get("trainer")).get("parameters") if run.teacher is not None else None,
    )
    teacher = _model_row(
        "teacher",
        "teacher",
        teacher_measured,
        parameters=teacher_params if is_number(teacher_params) else None,
        file_bytes=_first(
            teacher_measured.get("file_bytes"), teacher_package["file_bytes"] if teacher_package else None
        ),
        scheme="fp32",
        status="reference",
        package="teacher/model" if teacher_package else teacher_info.get("path"),
        scores=teacher_scores,
    )

    student_measured = _dict(measured_models.get("student")) or baseline
    student_package = run.packages.get("model")
    student_params = _first(
        _dict(measured_models.get("student")).get("parameters"),
        trainer.get("parameters"),
        (student_package or {}).get("metadata", {}).get("parameters"),
    )
    student = _model_row(
        "student",
        "student",
        student_measured,
        parameters=student_params if is_number(student_params) else None,
        file_bytes=_first(
            student_measured.get("file_bytes"), student_package["file_bytes"] if student_package else None
        ),
        scheme="fp32",
        status="distilled",
        package="model" if student_package else None,
        scores=student_scores,
        retention=student_retention,
        retention_interval=student_interval,
        gate=_gate_for(gate, "student"),
    )

    rows = [teacher, student]
    variants = quantization.get("variants")
    if not isinstance(variants, list):  # no quantization.json: what summary.json kept of it
        variants = (run.summary or {}).get("quantized") or [
            *(run.extra.get("quantized") or []),
            *(run.extra.get("quantization_rejected") or []),
        ]
    for index, variant in enumerate(v for v in variants if isinstance(v, Mapping)):
        name = str(variant.get("name") or f"quantized[{index}]")
        accepted = variant.get("accepted")
        if variant.get("error"):
            status = f"failed: {variant['error']}"
        elif accepted is False:
            losses = _dict(_dict(variant.get("budget")).get("losses_on_validation"))
            shown = ", ".join(
                f"BLEU −{v:.2f}" if k == "bleu" else f"composite −{100 * v:.1f}%"
                for k, v in losses.items()
                if is_number(v)
            )
            status = "rejected: over the quality budget" + (f" ({shown} on validation)" if shown else "")
        else:
            status = "accepted"
        package = variant.get("package")
        rows.append(
            _model_row(
                name,
                "quantized",
                variant,
                parameters=student["parameters"],  # quantization keeps the student's parameters
                scheme=variant.get("scheme"),
                status=status,
                accepted=accepted,
                package=str(package).rstrip("/").rsplit("/", 1)[-1] if package else None,
                scores=_scores(variant.get("scores")),
                retention=_dict(variant.get("retention")) or None,
                retention_interval=_dict(variant.get("retention_interval")) or None,
                gate=_gate_for(gate, name) if accepted else None,
            )
        )

    keys = _ordered_keys(teacher_scores, student_scores, *(r["scores"] for r in rows[2:]))
    split = evaluation.get("split") or summary_eval.get("split")
    sentences = evaluation.get("sentences") or summary_eval.get("sentences")

    if not evaluation and not summary_eval:
        notes.append(
            "no test-split evaluation (evaluation.json): the run failed, stopped before it, or is still running; "
            "test scores and retention are not available"
        )
    unmeasured = [
        r["name"] for r in rows if r["latency_ms_per_sentence"] is None and r["throughput_tokens_per_second"] is None
    ]
    if unmeasured:
        notes.append(f"CPU speed not measured for: {', '.join(unmeasured)}")
    if run.quantization is None and not ((run.summary or {}).get("quantized") or run.extra.get("quantized")):
        notes.append(
            "no quantized variants (no quantization.json: the recipe has no [[quantize]], or the run ended before it)"
        )
    return {
        "split": split,
        "sentences": sentences,
        "score_keys": keys,
        "retention_samples": evaluation.get("retention_samples"),
        "higher_is_better": {k: run.higher_is_better(k) for k in keys},
        "rows": rows,
        "measured_on": (
            "CPU, float32 for the teacher and the student; latency: ms per sentence at batch 1, "
            "throughput: tokens per second at batch 32, 32 tokens decoded per sentence"
        ),
    }


def gate_section(run: RunView, notes: list[str]) -> dict[str, Any] | None:
    gate = run.gate
    if gate is None:
        notes.append(
            "no retention-gate verdict (summary.json has no extra.gate: no [guard] in the recipe, "
            "or the run has not finished)"
        )
        return None
    return {
        "passed": gate.get("passed"),
        "verdict": gate.get("verdict"),
        "threshold": gate.get("threshold"),
        "scores": gate.get("scores"),
        "gate_on": gate.get("gate_on") or "point",
        "checks": [dict(c) for c in gate.get("checks") or [] if isinstance(c, Mapping)],
    }


def validation_section(run: RunView, notes: list[str]) -> dict[str, Any]:
    """One row per validation, the rollbacks, and the teacher's validation scores."""
    records = run.history
    keys = _ordered_keys(*(r["scores"] for r in records))
    best_index = None
    if any(COMPOSITE in r["scores"] for r in records):
        accepted = [
            (i, r) for i, r in enumerate(records) if not r.get("rolled_back") and is_number(r["scores"].get(COMPOSITE))
        ]
        if accepted:
            best_index = max(accepted, key=lambda ir: (ir[1]["scores"][COMPOSITE], -ir[0]))[0]
    rollback_events = run.rollbacks
    rows = []
    for index, record in enumerate(records):
        details = record["details"]
        significance = _dict(_dict(details.get("significance")).get("scores"))
        rollback = None
        if record.get("rolled_back"):
            match = next((e for e in rollback_events if e.get("iteration") == record.get("iteration")), None)
            rollback = {
                "to_step": match.get("to_step") if match else None,
                "reason": match.get("reason") if match else None,
                "lr_scale": match.get("lr_scale") if match else None,
            }
        rows.append(
            {
                "step": record.get("step"),
                "iteration": record.get("iteration"),
                "scores": _scores(record["scores"]),
                "delta_previous": _scores(details.get("delta_previous")),
                "previous_step": details.get("previous_step"),
                "p_values": {
                    k: _dict(v).get("p_value") for k, v in significance.items() if is_number(_dict(v).get("p_value"))
                },
                "retention": {k: v for k, v in _dict(details.get("retention")).items() if is_number(v)},
                "best": index == best_index,
                "rolled_back": bool(record.get("rolled_back")),
                "rollback": rollback,
                "seconds": record.get("seconds"),
            }
        )
    rollbacks = [
        {
            "event": e.get("event"),
            "from_step": e.get("from_step", e.get("step")),
            "to_step": e.get("to_step"),
            "iteration": e.get("iteration"),
            "reason": e.get("reason"),
            "lr_scale": e.get("lr_scale"),
            "checkpoint": e.get("checkpoint"),
        }
        for e in rollback_events
    ]
    teacher_scores = _scores(_dict(run.teacher_validation).get("scores"))
    if not teacher_scores:
        for record in reversed(records):
            teacher_scores = _scores(_dict(record["details"].get("teacher")).get("scores"))
            if teacher_scores:
                break
    weights: dict[str, Any] = {}
    for record in reversed(records):
        weights = _dict(record["details"].get("composite_weights"))
        if weights:
            break
    if not records:
        notes.append(
            "no validation records (validation/history.jsonl and validation/step_*.json absent): "
            "the run ended before its first validation"
        )
    return {
        "score_keys": keys,
        "higher_is_better": {k: run.higher_is_better(k) for k in keys},
        "rows": rows,
        "rollbacks": rollbacks,
        "teacher_scores": teacher_scores,
        "composite_weights": weights,
        "planned_every": run.recipe_get("run.validate_every"),
    }


def _trim_analysis(analysis: Any, examples: int) -> dict[str, Any] | None:
    """The error analysis with at most ``examples`` example sentences per list."""
    analysis = _dict(analysis)
    if not analysis:
        return None
    out: dict[str, Any] = {}
    for key, value in analysis.items():
        if key == "worst" and isinstance(value, list):
            out[key] = value[:examples]
        elif isinstance(value, Mapping):
            part = dict(value)
            for list_key in ("examples", "worse_examples", "better_examples"):
                if isinstance(part.get(list_key), list):
                    part[list_key] = part[list_key][:examples]
            out[key] = part
        else:
            out[key] = value
    return out


def analysis_section(run: RunView, notes: list[str], examples: int) -> dict[str, Any]:
    validation = None
    for record in reversed(run.history):
        if record.get("rolled_back"):
            continue
        errors = _dict(record["details"].get("analysis")).get("errors")
        if errors:
            validation = {"step": record.get("step"), **(_trim_analysis(errors, examples) or {})}
        break
    evaluation = _dict(run.evaluation)
    student = _dict(evaluation.get("student"))
    teacher = _dict(evaluation.get("teacher"))
    test = _trim_analysis(student.get("analysis"), examples)
    if test is not None:
        test = {"split": evaluation.get("split"), **test}
    pairs = []
    teacher_examples = teacher.get("examples")
    if not isinstance(teacher_examples, list):
        teacher_examples = []
    for index, example in enumerate((student.get("examples") or [])[:examples]):
        if not isinstance(example, Mapping):
            continue
        other = (
            teacher_examples[index]
            if index < len(teacher_examples) and isinstance(teacher_examples[index], Mapping)
            else {}
        )
        same = other.get("source") == example.get("source")
        pairs.append(
            {
                "source": example.get("source"),
                "reference": example.get("reference"),
                "student": example.get("hypothesis"),
                "teacher": other.get("hypothesis") if same else None,
            }
        )
    if validation is None and run.history:
        notes.append(
            "the last validation holds no error analysis ([validation.analysis] enabled = false, or an older run)"
        )
    return {"validation": validation, "test": test, "examples": pairs}


def run_section(run: RunView, notes: list[str]) -> dict[str, Any]:
    summary = _dict(run.summary)
    extra = run.extra
    trainer = _dict(extra.get("trainer"))
    metadata = _dict(_dict(run.packages.get("model")).get("metadata"))
    teacher_info = _dict(trainer.get("teacher")) or _dict(metadata.get("teacher"))
    validation = _dict(extra.get("validation"))
    last_step = run.steps[-1] if run.steps else {}
    status = run.status
    if run.summary is None:
        ended = run.last_event("run_end")
        if (run.path / "summary.json").is_file():
            note = "summary.json is damaged (unreadable): how the run ended is unknown"
        elif ended is None:
            note = "summary.json is missing: the run is still running, or was killed before it ended"
        else:
            note = "summary.json is missing; the training log says the run ended"
        notes.append(note)
    else:
        note = None
    teacher = {
        "source": teacher_info.get("source"),
        "path": teacher_info.get("path"),
        "trained_in": teacher_info.get("trained_in"),
        "weights_sha256": teacher_info.get("weights_sha256"),
        "key": teacher_info.get("key"),
        "parameters": teacher_info.get("parameters"),
        "training_seconds": teacher_info.get("training_seconds"),
        "steps": run.teacher.recipe_get("run.steps") if run.teacher is not None else None,
    }
    versions: dict[str, Any] = {}
    if metadata.get("cvmkd_version"):
        versions["cvmkd"] = metadata["cvmkd_version"]
    for dist, version in sorted(_dict(metadata.get("plugins")).items()):
        versions.setdefault(dist, version)
    revision = _dict(metadata.get("source_revision"))
    outputs = {k: v for k, v in _dict(summary.get("outputs")).items() if not str(k).startswith("report_")}
    return {
        "name": run.name,
        "directory": str(run.path),
        "status": status,
        "status_note": note,
        "error": summary.get("error"),
        "stop_reason": extra.get("stop_reason"),
        "finalize_error": extra.get("finalize_error"),
        "final_step": _first(summary.get("final_step"), last_step.get("step")),
        "steps_planned": run.recipe_get("run.steps"),
        "iterations_executed": _first(summary.get("iterations_executed"), last_step.get("iteration")),
        "rollbacks": _first(summary.get("rollbacks"), len(run.events_named("rollback")) if run.events else None),
        "wall_seconds": summary.get("wall_seconds"),
        "validations": _first(validation.get("count"), len(run.history)),
        "validation_seconds": validation.get("seconds"),
        "validation_share": validation.get("share_of_wall_time"),
        "device": trainer.get("device"),
        "precision": trainer.get("precision"),
        "hardware": _dict(trainer.get("hardware")) or _dict(metadata.get("hardware")),
        "student_parameters": trainer.get("parameters", metadata.get("parameters")),
        "student_model": _dict(trainer.get("model_config")),
        "corpus": _dict(metadata.get("corpus")),
        "recipe_sha256": metadata.get("recipe_sha256"),
        "teacher": teacher,
        "versions": versions,
        "source_revision": revision or None,
        "outputs": outputs,
    }


def baseline_section(run: RunView) -> dict[str, Any] | None:
    """The gain over a control run (``cvmkd report --baseline``): per test score, the control's
    value, this run's, the difference and its paired bootstrap p-value."""
    if run.baseline is None:
        return None
    control, this = run.baseline["runs"][0], run.baseline["runs"][1]
    rows = []
    for key in run.baseline["keys"]:
        before, after = control["scores"].get(key), this["scores"].get(key)
        rows.append(
            {
                "key": key,
                "control": before,
                "run": after,
                "gain": after - before if is_number(before) and is_number(after) else None,
                "p_value": this["p_values"].get(key),
            }
        )
    return {
        "control": control["path"],
        "sentences": run.baseline["sentences"],
        "samples": run.baseline["samples"],
        "rows": rows,
    }


def gather(run: RunView, *, examples: int = 5) -> dict[str, Any]:
    """Everything a report shows, as plain data (memoised on the view: every writer of one set of
    reports shares it)."""
    memo_key = ("cvmkd_reports.data", examples, run.baseline is not None)
    if memo_key in run.memo:
        return run.memo[memo_key]
    notes: list[str] = []
    run_part = run_section(run, notes)
    data = {
        "format": "cvmkd-report/1",
        "run": run_part,
        "gate": gate_section(run, notes),
        "models": models_section(run, notes),
        "baseline": baseline_section(run),
        "validation": validation_section(run, notes),
        "analysis": analysis_section(run, notes, examples),
        "hyperparameters": [[key, value] for key, value in run.recipe_items()],
        "notes": notes,
    }
    if run.recipe is None:
        notes.append("recipe.toml is missing or unreadable: no hyperparameters to show")
    if not run.steps:
        notes.append(f"no step records in {run.train_log_name}: no training curves")
    if run.teacher is None and run_part["teacher"].get("source") in ("cache", "loaded"):
        notes.append(
            f"the teacher was {'reused from the cache' if run_part['teacher']['source'] == 'cache' else 'loaded'}, "
            "not trained in this run: its training log is not in this run directory"
        )
    notes.extend(run.problems)
    run.memo[memo_key] = data
    return data


__all__ = [
    "gather",
    "score_label",
    "score_decimals",
    "unit_scale",
    "fmt_count",
    "fmt_int",
    "fmt_mb",
    "fmt_ms",
    "fmt_percent",
    "fmt_rate",
    "fmt_score",
]
