"""The report as a list of blocks (headings, tables, plots, examples...), built once from the
gathered data; ``markdown.py`` and ``html.py`` only serialise these blocks, so the two reports
hold the same sections, rows and numbers.

A block is a dict with a ``type``:

- ``heading``: ``level``, ``text``, ``anchor``;
- ``banner``: ``state`` (``passed`` | ``failed`` | ``none``), ``title``, ``text``;
- ``facts``: ``items``, a list of ``(label, value)`` shown as the header's key figures;
- ``para``: ``text``, ``style`` (``None`` | ``note``);
- ``list``: ``items``, lines of text;
- ``table``: ``columns``, ``align`` (``l``/``r`` per column), ``rows`` (cells: text, or
  ``{"text", "sub", "mark"}`` with ``mark`` one of ``good``, ``bad`` (a check passed or
  failed), ``up``, ``down`` (a significant change for the better or the worse), ``best``,
  ``muted``);
- ``plot``: ``plot``, one entry of :func:`cvmkd_reports.plots.render_plots`;
- ``examples``: ``items``, each ``{"title", "fields": [(label, text), ...]}``;
- ``groups``: ``items``, ``(title, table block)`` pairs shown side by side where there is room.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from cvmkd_reports.data import (
    COMPOSITE,
    fmt_count,
    fmt_delta,
    fmt_int,
    fmt_mb,
    fmt_ms,
    fmt_p,
    fmt_percent,
    fmt_rate,
    fmt_score,
    fmt_seconds,
    fmt_value,
    is_number,
    score_decimals,
    score_label,
)

Block = dict[str, Any]


def heading(text: str, level: int = 2, anchor: str | None = None) -> Block:
    return {"type": "heading", "level": level, "text": text, "anchor": anchor}


def para(text: str, style: str | None = None) -> Block:
    return {"type": "para", "text": text, "style": style}


def table(columns: list[str], rows: list[list[Any]], align: str | None = None) -> Block:
    return {"type": "table", "columns": columns, "rows": rows, "align": align or "l" + "r" * (len(columns) - 1)}


def cell(text: str, sub: str | None = None, mark: str | None = None) -> dict[str, Any]:
    return {"text": text, "sub": sub, "mark": mark}


def _score_header(key: str, higher: Mapping[str, bool]) -> str:
    return score_label(key) + ("" if higher.get(key, True) else " ↓")


# --- the header ---------------------------------------------------------------------------------


def header_blocks(data: dict[str, Any]) -> list[Block]:
    run = data["run"]
    gate = data["gate"]
    blocks: list[Block] = [heading(f"cvmkd report: {run['name']}", 1)]
    if gate is None:
        blocks.append(
            {
                "type": "banner",
                "state": "none",
                "title": "Retention gate: no verdict",
                "text": "summary.json holds no retention-gate verdict",
            }
        )
    else:
        state = {True: "passed", False: "failed"}.get(gate["passed"], "none")
        title = {
            "passed": "Retention gate passed",
            "failed": "Retention gate FAILED",
            "none": "Retention gate not evaluated",
        }[state]
        threshold = ""
        if is_number(gate.get("threshold")):
            on = ", ".join(gate.get("scores") or [])
            threshold = f" (threshold {fmt_percent(gate['threshold'])} of the teacher on {on})"
        blocks.append({"type": "banner", "state": state, "title": title + threshold, "text": gate.get("verdict") or ""})
    steps = f"{fmt_int(run['final_step'])}" if is_number(run["final_step"]) else "—"
    if is_number(run.get("steps_planned")):
        steps += f" of {fmt_int(run['steps_planned'])}"
    models = data["models"]["rows"]
    teacher, student = models[0], models[1]
    size = "—"
    if is_number(teacher["parameters"]) and is_number(student["parameters"]):
        size = (
            f"{fmt_count(teacher['parameters'])} → {fmt_count(student['parameters'])} "
            f"({student['parameters'] / teacher['parameters']:.0%})"
        )
    facts = [
        ("status", run["status"]),
        ("final step", steps),
        ("iterations executed", fmt_int(run["iterations_executed"]) if is_number(run["iterations_executed"]) else "—"),
        ("rollbacks", str(run["rollbacks"]) if run["rollbacks"] is not None else "—"),
        ("wall time", fmt_seconds(run["wall_seconds"])),
        ("parameters, teacher → student", size),
    ]
    blocks.append({"type": "facts", "items": facts})
    blocks.append(
        para(
            f"Run directory `{run['directory']}`. Every number below is read from the run's files "
            "(summary.json, recipe.toml, the training log, validation/, evaluation.json, quantization.json)."
        )
    )
    if run.get("error"):
        blocks.append(para(f"The run ended with an error: {run['error']}", "note"))
    if run.get("stop_reason"):
        blocks.append(para(f"The run stopped early: {run['stop_reason']}", "note"))
    return blocks


# --- 1. the models ------------------------------------------------------------------------------


def models_blocks(data: dict[str, Any], plots: dict[str, dict[str, Any]]) -> list[Block]:
    models = data["models"]
    rows = models["rows"]
    keys = models["score_keys"]
    higher = models["higher_is_better"]
    split = models.get("split") or "test"
    sentences = f" ({fmt_int(models['sentences'])} sentences)" if is_number(models.get("sentences")) else ""
    blocks = [heading("Teacher, student and quantized students", 2, "models")]
    blocks.append(
        para(
            f"Size and CPU speed of each model, its scores on the {split} split{sentences}, and the share of "
            "the teacher's (normalised) score it keeps. " + models["measured_on"] + "; MB = 10⁶ bytes. "
            "Rejected quantized variants went over their quality budget and are shown for comparison only."
        )
    )
    blocks.append(heading("Size and speed", 3))
    size_rows = []
    for row in rows:
        mark = "muted" if row["accepted"] is False else None
        size_rows.append(
            [
                cell(
                    row["name"],
                    row["scheme"] if row["role"] == "quantized" and row["scheme"] != row["name"] else None,
                    mark,
                ),
                cell(fmt_int(row["parameters"]), None, mark),
                cell(fmt_mb(row["file_bytes"]), None, mark),
                cell(fmt_mb(row["parameter_bytes"]), None, mark),
                cell(fmt_ms(row["latency_ms_per_sentence"]), None, mark),
                cell(fmt_rate(row["throughput_tokens_per_second"]), None, mark),
                cell(
                    row["status"] or "—", None, "bad" if str(row["status"]).startswith(("rejected", "failed")) else mark
                ),
            ]
        )
    blocks.append(
        table(
            [
                "model",
                "parameters",
                "file size (MB)",
                "parameter memory (MB)",
                "latency (ms/sentence, batch 1)",
                "throughput (tokens/s, batch 32)",
                "status",
            ],
            size_rows,
            "lrrrrrl",
        )
    )
    if keys:
        blocks.append(heading(f"Scores on the {split} split", 3))
        decimals = {k: score_decimals(k) for k in keys}
        blocks.append(
            table(
                ["model"] + [_score_header(k, higher) for k in keys],
                [
                    [cell(r["name"], None, "muted" if r["accepted"] is False else None)]
                    + [
                        cell(
                            fmt_score(r["scores"].get(k), decimals[k]),
                            None,
                            "muted" if r["accepted"] is False else None,
                        )
                        for k in keys
                    ]
                    for r in rows
                ],
            )
        )
        blocks.append(heading("Retention of the teacher's score", 3))
        gate = data["gate"] or {}
        checked = {(c.get("model"), c.get("score")): c.get("passed") for c in gate.get("checks", [])}
        retention_rows = []
        for r in rows:
            if r["role"] == "teacher":
                reference = [cell("100.0%", None, "muted") for _ in keys]
                retention_rows.append([cell("teacher"), *reference, cell("reference", None, "muted")])
                continue
            line = [cell(r["name"], None, "muted" if r["accepted"] is False else None)]
            for key in keys:
                share = (r["retention"] or {}).get(key)
                verdict: Any = checked.get((r["name"], key))  # the check's "passed": True, False or None
                mark = {True: "good", False: "bad"}.get(verdict, "muted" if r["accepted"] is False else None)
                bounds = (r.get("retention_interval") or {}).get(key)
                text = fmt_percent(share)
                if isinstance(bounds, list) and len(bounds) == 2 and is_number(share):
                    text += f" ({fmt_percent(bounds[0])}–{fmt_percent(bounds[1])})"
                line.append(cell(text, "gate ✓" if verdict else "gate ✗" if verdict is False else None, mark))
            gate_text = {True: "passed", False: "failed", None: "not checked"}[r["gate"]]
            line.append(cell(gate_text, None, {True: "good", False: "bad"}.get(r["gate"], "muted")))
            retention_rows.append(line)
        blocks.append(table(["model"] + [_score_header(k, higher) for k in keys] + ["gate"], retention_rows))
        blocks.append(
            para(
                "Retention is the model's normalised score over the teacher's (for a lower-is-better score such "
                "as TER, the normalised score is inverted first); above 100%: better than the teacher. "
                "Marked cells are the ones the retention gate checks."
                + (
                    f" In brackets: its 95% interval, from a paired bootstrap over the test sentences "
                    f"({data['models'].get('retention_samples')} resamples of the teacher's and the model's "
                    'translations together); a gate on the lower bound ([guard] gate_on = "lower_bound") holds '
                    "the threshold against its lower end."
                    if any(r.get("retention_interval") for r in rows)
                    else ""
                )
            )
        )
    else:
        blocks.append(para("No test-split scores: the run has no evaluation.json.", "note"))
    blocks.append({"type": "plot", "plot": plots["size_quality"]})
    return blocks


# --- 2. training --------------------------------------------------------------------------------


def training_blocks(data: dict[str, Any], plots: dict[str, dict[str, Any]]) -> list[Block]:
    return [
        heading("Training", 2, "training"),
        para("Every logged step (faint) and a trailing moving average (bold); dotted red lines mark rollbacks."),
        {"type": "plot", "plot": plots["loss"]},
        {"type": "plot", "plot": plots["learning_rate"]},
    ]


# --- 3. validation ------------------------------------------------------------------------------


def validation_blocks(data: dict[str, Any], plots: dict[str, dict[str, Any]]) -> list[Block]:
    section = data["validation"]
    rows = section["rows"]
    keys = section["score_keys"]
    higher = section["higher_is_better"]
    blocks = [heading("Validation history", 2, "validation")]
    if not rows:
        blocks.append(para("No validation records: the run ended before its first validation.", "note"))
        blocks.append({"type": "plot", "plot": plots["validation"]})
        return blocks
    blocks.append(
        para(
            "One row per validation. Under each score: the change since the previous validation and the p-value "
            "of a paired bootstrap test of that change (p < 0.05: unlikely to be chance; such changes are coloured, "
            "green for better, red for worse). ★ marks the best "
            "accepted validation by composite score; rolled-back validations are greyed out."
        )
    )
    decimals = {k: score_decimals(k) for k in keys}
    # many scores do not fit one table: the composite and the scores it weighs first, the others after
    weights = section.get("composite_weights") or {}
    primary = [k for k in keys if k in weights or k == COMPOSITE] if len(keys) > 7 and weights else keys
    others = [k for k in keys if k not in primary]

    def score_cells(row: dict[str, Any], columns: list[str], mark: str | None) -> list[Any]:
        line = []
        for key in columns:
            delta = row["delta_previous"].get(key)
            p = row["p_values"].get(key)
            sub = None
            if is_number(delta):
                sub = fmt_delta(delta, decimals[key]) + (f" · p {fmt_p(p)}" if is_number(p) else "")
            significant = is_number(p) and p < 0.05 and is_number(delta) and delta != 0
            if mark:
                cell_mark = mark
            elif key == COMPOSITE and row["best"]:
                cell_mark = "best"
            elif significant:
                cell_mark = "up" if (delta > 0) == higher.get(key, True) else "down"
            else:
                cell_mark = None
            line.append(cell(fmt_score(row["scores"].get(key), decimals[key]), sub, cell_mark))
        return line

    with_retention = any(is_number(r["retention"].get(COMPOSITE)) for r in rows)
    table_rows, other_rows = [], []
    for row in rows:
        mark = "muted" if row["rolled_back"] else None
        line = [cell(fmt_int(row["step"]), None, mark), cell(fmt_int(row["iteration"]), None, mark)]
        other_rows.append(line + score_cells(row, others, mark))
        line = line + score_cells(row, primary, mark)
        if with_retention:
            line.append(cell(fmt_percent(row["retention"].get(COMPOSITE)), None, mark))
        if row["rolled_back"]:
            rollback = row["rollback"] or {}
            to = f" → step {fmt_int(rollback['to_step'])}" if is_number(rollback.get("to_step")) else ""
            note = f"rolled back{to}: {rollback.get('reason') or 'reason not recorded'}"
            line.append(cell(note, None, "bad"))
        else:
            line.append(cell("★ best" if row["best"] else "", None, "best" if row["best"] else None))
        table_rows.append(line)
    retention_column = ["composite, % of the teacher"] if with_retention else []
    blocks.append(
        table(
            ["step", "iteration"] + [_score_header(k, higher) for k in primary] + retention_column + ["note"],
            table_rows,
            "rr" + "r" * (len(primary) + len(retention_column)) + "l",
        )
    )
    if others:
        blocks.append(para("The other scores of the same validations:"))
        blocks.append(table(["step", "iteration"] + [_score_header(k, higher) for k in others], other_rows))
    if section["rollbacks"]:
        items = []
        for event in section["rollbacks"]:
            if event["event"] == "rollback_skipped":
                items.append(
                    f"step {fmt_int(event['from_step'])}: rollback asked for but impossible (no checkpoint yet): "
                    f"{event.get('reason') or ''}; the run stopped"
                )
            else:
                lr = f"; learning-rate scale now {event['lr_scale']:g}" if is_number(event.get("lr_scale")) else ""
                items.append(
                    f"iteration {fmt_int(event['iteration'])}: step {fmt_int(event['from_step'])} → "
                    f"{fmt_int(event['to_step'])} ({event.get('checkpoint') or 'checkpoint'}): {event.get('reason') or ''}{lr}"
                )
        blocks.append(heading("Rollbacks", 3))
        blocks.append({"type": "list", "items": items})
    else:
        blocks.append(para("No rollbacks: every validation was accepted."))
    blocks.append({"type": "plot", "plot": plots["validation"]})
    return blocks


# --- 4. error analysis --------------------------------------------------------------------------


def _analysis_facts(analysis: Mapping[str, Any]) -> list[str]:
    items = []
    length = analysis.get("length") or {}
    if length:
        items.append(
            f"length ratio (hypothesis / reference words) {fmt_score(length.get('ratio'))}; "
            f"{length.get('too_short', 0)} much too short, {length.get('too_long', 0)} much too long"
        )
    if is_number(analysis.get("chrf_mean")):
        items.append(f"mean sentence chrF {analysis['chrf_mean']:.1f}")
    for key, what in (
        ("loops", "with repeated phrases (loops)"),
        ("empty", "empty"),
        ("copies", "copied from the source untranslated"),
    ):
        part = analysis.get(key)
        if isinstance(part, Mapping) and is_number(part.get("count")):
            rate = f" ({fmt_percent(part['rate'])})" if is_number(part.get("rate")) else ""
            items.append(f"{fmt_int(part['count'])} {what}{rate}")
    unknown = analysis.get("unknown_tokens")
    if isinstance(unknown, Mapping) and is_number(unknown.get("count")):
        items.append(f"{fmt_int(unknown['count'])} unknown tokens")
    changes = analysis.get("changes")
    if isinstance(changes, Mapping) and changes.get("against_step") is not None:
        items.append(
            f"against step {fmt_int(changes['against_step'])}: {changes.get('worse', 0)} sentences clearly worse, "
            f"{changes.get('better', 0)} clearly better (sentence chrF moved by ≥ {changes.get('threshold_chrf', '?')}), "
            f"{changes.get('unchanged_output', 0)} with identical output"
        )
    return items


def _by_length(analysis: Mapping[str, Any]) -> Block | None:
    buckets = analysis.get("by_reference_length")
    if not isinstance(buckets, list) or not buckets:
        return None
    return table(
        ["reference words", "sentences", "BLEU", "mean chrF", "length ratio"],
        [
            [
                str(b.get("reference_words", "")),
                fmt_int(b.get("sentences")),
                fmt_score(b.get("bleu")),
                fmt_score(b.get("chrf_mean")),
                fmt_score(b.get("length_ratio")),
            ]
            for b in buckets
            if isinstance(b, Mapping)
        ],
    )


def _example(title: str, item: Mapping[str, Any], *extra: tuple[str, str]) -> dict[str, Any]:
    fields = [
        (label, str(item.get(key)))
        for label, key in (("source", "source"), ("reference", "reference"), ("hypothesis", "hypothesis"))
        if item.get(key) is not None
    ]
    return {"title": title, "fields": fields + [e for e in extra if e[1]]}


def _analysis_blocks(title: str, analysis: Mapping[str, Any]) -> list[Block]:
    blocks = [heading(title, 3)]
    facts = _analysis_facts(analysis)
    if facts:
        blocks.append({"type": "list", "items": facts})
    elif analysis.get("summary"):
        blocks.append(para(str(analysis["summary"])))
    by_length = _by_length(analysis)
    if by_length:
        blocks.append(heading("By reference length", 4))
        blocks.append(by_length)
    worst = [w for w in analysis.get("worst") or [] if isinstance(w, Mapping)]
    if worst:
        blocks.append(heading("Worst sentences (lowest sentence chrF)", 4))
        blocks.append(
            {
                "type": "examples",
                "items": [_example(f"#{w.get('index', '?')} · chrF {fmt_score(w.get('chrf'))}", w) for w in worst],
            }
        )
    loops = analysis.get("loops")
    if isinstance(loops, Mapping) and loops.get("examples"):
        blocks.append(heading("Loops (repeated phrases)", 4))
        blocks.append(
            {
                "type": "examples",
                "items": [
                    _example(f"#{e.get('index', '?')} · repeats “{e.get('repeated', '')}”", e)
                    for e in loops["examples"]
                    if isinstance(e, Mapping)
                ],
            }
        )
    for key, what in (("empty", "Empty translations"), ("copies", "Untranslated copies of the source")):
        part = analysis.get(key)
        if isinstance(part, Mapping) and part.get("examples"):
            blocks.append(heading(what, 4))
            blocks.append(
                {
                    "type": "examples",
                    "items": [
                        _example(f"#{e.get('index', '?')}", e) for e in part["examples"] if isinstance(e, Mapping)
                    ],
                }
            )
    changes = analysis.get("changes")
    if isinstance(changes, Mapping) and changes.get("worse_examples"):
        blocks.append(heading(f"Clearly worse than at step {fmt_int(changes.get('against_step'))}", 4))
        blocks.append(
            {
                "type": "examples",
                "items": [
                    _example(
                        f"#{e.get('index', '?')} · chrF {fmt_score(e.get('previous_chrf'))} → {fmt_score(e.get('chrf'))}",
                        e,
                        ("before", str(e.get("previous_hypothesis") or "")),
                    )
                    for e in changes["worse_examples"]
                    if isinstance(e, Mapping)
                ],
            }
        )
    return blocks


def analysis_blocks(data: dict[str, Any]) -> list[Block]:
    analysis = data["analysis"]
    blocks = [heading("Error analysis", 2, "analysis")]
    if analysis["test"]:
        split = analysis["test"].get("split") or "test"
        blocks += _analysis_blocks(f"The student on the {split} split", analysis["test"])
    if analysis["validation"]:
        blocks += _analysis_blocks(
            f"The last validation (step {fmt_int(analysis['validation'].get('step'))})", analysis["validation"]
        )
    if analysis["examples"]:
        blocks.append(heading("Example translations (test split)", 3))
        blocks.append(
            {
                "type": "examples",
                "items": [
                    {
                        "title": f"example {i + 1}",
                        "fields": [
                            (k, str(v))
                            for k, v in (
                                ("source", e["source"]),
                                ("reference", e["reference"]),
                                ("student", e["student"]),
                                ("teacher", e["teacher"]),
                            )
                            if v is not None
                        ],
                    }
                    for i, e in enumerate(analysis["examples"])
                ],
            }
        )
    if not (analysis["test"] or analysis["validation"] or analysis["examples"]):
        blocks.append(
            para("No error analysis: the run has neither a test evaluation nor an analysed validation.", "note")
        )
    return blocks


# --- 5. the run and its hyperparameters -----------------------------------------------------------


def run_blocks(data: dict[str, Any]) -> list[Block]:
    run = data["run"]
    teacher = run["teacher"]
    hardware = run["hardware"] or {}
    rows: list[list[Any]] = [
        ["status", run["status"]],
        ["final step", fmt_int(run["final_step"]) if is_number(run["final_step"]) else "—"],
        ["steps planned (run.steps)", fmt_int(run["steps_planned"]) if is_number(run["steps_planned"]) else "—"],
        ["iterations executed", fmt_int(run["iterations_executed"]) if is_number(run["iterations_executed"]) else "—"],
        ["rollbacks", str(run["rollbacks"]) if run["rollbacks"] is not None else "—"],
        ["wall time", fmt_seconds(run["wall_seconds"])],
        [
            "validations",
            str(run["validations"])
            + (
                f" ({fmt_seconds(run['validation_seconds'])}, {fmt_percent(run['validation_share'])} of the wall time)"
                if is_number(run.get("validation_seconds")) and is_number(run.get("validation_share"))
                else ""
            ),
        ],
    ]
    for label, key in (("error", "error"), ("stop reason", "stop_reason"), ("finalize error", "finalize_error")):
        if run.get(key):
            rows.append([label, str(run[key])])
    if hardware or run.get("device"):
        described = ", ".join(f"{k} {v}" for k, v in hardware.items()) if hardware else run.get("device")
        rows.append(["hardware", described])
    if run.get("precision"):
        rows.append(["training precision", run["precision"]])
    if is_number(run.get("student_parameters")):
        rows.append(["student parameters", fmt_int(run["student_parameters"])])
    if run.get("student_model"):
        rows.append(["student model", ", ".join(f"{k} {v}" for k, v in run["student_model"].items())])
    if run.get("corpus"):
        rows.append(["corpus", ", ".join(f"{k} {v}" for k, v in run["corpus"].items())])
    if teacher.get("source"):
        where = teacher.get("trained_in") or teacher.get("path") or ""
        rows.append(["teacher", f"{teacher['source']}" + (f" ({where})" if where else "")])
    if is_number(teacher.get("parameters")):
        rows.append(["teacher parameters", fmt_int(teacher["parameters"])])
    if teacher.get("weights_sha256"):
        rows.append(["teacher weights sha256", teacher["weights_sha256"]])
    if teacher.get("key"):
        rows.append(["teacher cache key", teacher["key"]])
    if is_number(teacher.get("training_seconds")):
        rows.append(["teacher training time", fmt_seconds(teacher["training_seconds"])])
    if run.get("recipe_sha256"):
        rows.append(["recipe sha256", run["recipe_sha256"]])
    if run["versions"]:
        plugins = "" if len(run["versions"]) > 1 else " (plugin versions not recorded)"
        rows.append(["versions", ", ".join(f"{k} {v}" for k, v in run["versions"].items()) + plugins])
    else:
        rows.append(["versions", "not recorded (the model package holds no cvmkd_version)"])
    if run.get("source_revision"):
        revision = run["source_revision"]
        rows.append(
            ["source revision", f"{revision.get('commit')}" + (" (modified)" if revision.get("modified") else "")]
        )
    for key, value in run["outputs"].items():
        rows.append([f"output: {key}", str(value)])
    return [heading("Run summary", 2, "run"), table(["", "value"], rows, "ll")]


def hyperparameter_blocks(data: dict[str, Any]) -> list[Block]:
    items = data["hyperparameters"]
    blocks = [heading("Hyperparameters", 2, "hyperparameters")]
    if not items:
        blocks.append(para("No recipe.toml: the hyperparameters are unknown.", "note"))
        return blocks
    blocks.append(para("The resolved recipe (recipe.toml), every default written out, as dotted keys, by section."))
    groups: dict[str, list[list[Any]]] = {}
    for key, value in items:
        section = re.split(r"[.\[]", key, maxsplit=1)[0]
        groups.setdefault(section, []).append([key, fmt_value(value)])
    blocks.append(
        {"type": "groups", "items": [(name, table(["key", "value"], rows, "ll")) for name, rows in groups.items()]}
    )
    return blocks


def notes_blocks(data: dict[str, Any], plots: dict[str, dict[str, Any]]) -> list[Block]:
    notes = list(data["notes"])
    notes += [f"plot “{p['title']}” not drawn: {p['missing']}" for p in plots.values() if p.get("missing")]
    if not notes:
        return []
    return [heading("What this report lacks", 2, "missing"), {"type": "list", "items": notes}]


def baseline_blocks(data: dict[str, Any]) -> list[Block]:
    """The gain over training without the teacher, when the report was given a control run."""
    section = data.get("baseline")
    if not section:
        return []
    rows = [
        [
            score_label(r["key"]),
            fmt_score(r["control"]),
            fmt_score(r["run"]),
            cell(
                fmt_delta(r["gain"]), mark="good" if isinstance(r["p_value"], float) and r["p_value"] < 0.05 else None
            ),
            fmt_p(r["p_value"]),
        ]
        for r in section["rows"]
    ]
    return [
        heading("Gain over training without the teacher", anchor="baseline"),
        para(
            f"Against the control run `{section['control']}` on the same {section['sentences']} test sentences; "
            f"p: paired bootstrap ({section['samples']} resamples), for the scores with a paired test."
        ),
        table(["score", "without the teacher", "this run", "gain", "p"], rows),
    ]


def build(data: dict[str, Any], plots: list[dict[str, Any]]) -> list[Block]:
    """The whole report, in order."""
    by_name = {p["name"]: p for p in plots}
    return [
        *header_blocks(data),
        *notes_blocks(data, by_name),
        *models_blocks(data, by_name),
        *baseline_blocks(data),
        *validation_blocks(data, by_name),
        *training_blocks(data, by_name),
        *analysis_blocks(data),
        *run_blocks(data),
        *hyperparameter_blocks(data),
    ]
