"""``cvmkd compare RUN_DIR RUN_DIR [...]``: finished runs side by side on the same test split.

Each run's test split (``test.src``, ``test.ref``) and its student's translations
(``test.student.hyp``) are read from its directory; runs tested on different sentences are
refused. For each run: every test score (``evaluation.json``), parameters, file size and CPU
speed, retention of its teacher, and a paired bootstrap p-value of each score with a paired test
(BLEU, chrF, TER) against the first run, computed again from the translations by the metric
plugins themselves. Runs whose recipes differ only in ``run.seed`` (and in where they write) are
one arm trained several times: their seed-to-seed spread is given per score (mean, standard
deviation, range). Markdown on stdout; with ``--out DIR`` also ``compare.md`` and
``compare.json`` there.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cvmkd_core.errors import CvmkdError, RunDirError
from cvmkd_core.files import atomic_write_json, atomic_write_text
from cvmkd_core.rundir import RunFiles
from cvmkd_validation.metrics import PairedTestMetric

log = logging.getLogger("cvmkd")


class CompareError(CvmkdError):
    """Runs that cannot be compared."""


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def _run(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise RunDirError(f"no run directory at {path}")
    files = {name: path / name for name in ("test.src", "test.ref", "test.student.hyp", "evaluation.json")}
    missing = [name for name, file in files.items() if not file.is_file()]
    if missing:
        raise CompareError(
            f"{path}: no {', '.join(missing)}: only a finished run that scored a test split can be compared "
            "(runs made before cvmkd wrote its test translations cannot)"
        )
    try:
        evaluation = json.loads(files["evaluation.json"].read_text(encoding="utf-8"))
        if not isinstance(evaluation, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise CompareError(
            f"{files['evaluation.json']} is damaged ({exc}); run `cvmkd run ... --resume` to write it again"
        ) from None
    summary_path = path / "summary.json"
    try:
        status = json.loads(summary_path.read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    if status not in ("completed", "stopped"):
        shown = f"ended {status}" if status else "has no readable summary.json"
        raise CompareError(
            f"{path} {shown}: its test files may be an earlier invocation's; compare finished runs "
            "(--resume finishes it)"
        )
    student = evaluation.get("student") or {}
    models = evaluation.get("models") or {}
    return {
        "recipe": _flat(RunFiles(path).recipe() or {}),
        "path": str(path),
        "sources": _lines(files["test.src"]),
        "references": _lines(files["test.ref"]),
        "hypotheses": _lines(files["test.student.hyp"]),
        "scores": student.get("scores") or {},
        "teacher_scores": (evaluation.get("teacher") or {}).get("scores") or {},
        "retention": evaluation.get("retention") or {},
        "size": models.get("student") or {},
        "beam_size": evaluation.get("beam_size"),
    }


#: recipe keys that say where a run writes and how often it logs, not what it computes
_NOT_THE_ARM = ("run.name", "run.output_dir", "run.cache_dir", "run.log_every", "run.keep_checkpoints", "run.seed")


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def seed_groups(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs whose recipes are equal but for ``run.seed`` (and where they write), two or more with
    different seeds: per score, the mean, the sample standard deviation and the range over them."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        if not run["recipe"]:
            continue
        arm = {k: v for k, v in run["recipe"].items() if k not in _NOT_THE_ARM}
        groups.setdefault(json.dumps(arm, sort_keys=True, default=str), []).append(run)
    out = []
    for members in groups.values():
        seeds = [m["recipe"].get("run.seed") for m in members]
        if len(members) < 2 or len(set(map(str, seeds))) < 2:
            continue
        spread: dict[str, dict[str, float]] = {}
        for key in dict.fromkeys(k for m in members for k in m["scores"]):
            values = [float(m["scores"][key]) for m in members if isinstance(m["scores"].get(key), (int, float))]
            if len(values) < 2:
                continue
            mean = sum(values) / len(values)
            std = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
            spread[key] = {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": len(values)}
        retention = [
            m["retention"].get("bleu") for m in members if isinstance(m["retention"].get("bleu"), (int, float))
        ]
        if len(retention) >= 2:
            mean = sum(retention) / len(retention)
            std = (sum((v - mean) ** 2 for v in retention) / (len(retention) - 1)) ** 0.5
            spread["retention_bleu"] = {
                "mean": mean,
                "std": std,
                "min": min(retention),
                "max": max(retention),
                "n": len(retention),
            }
        out.append({"runs": [m["path"] for m in members], "seeds": seeds, "spread": spread})
    return out


def _same_test_set(first: dict[str, Any], other: dict[str, Any]) -> None:
    for what in ("sources", "references"):
        a, b = first[what], other[what]
        if a != b:
            where = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            raise CompareError(
                f"{other['path']} was tested on other sentences than {first['path']}: "
                f"{what} differ at line {where + 1} ({len(b)} vs {len(a)} sentences); compare runs of the same test split"
            )


def compare(paths: list[Path], registry: Any, samples: int = 1000) -> dict[str, Any]:
    """The comparison of the runs at ``paths``, the first being the baseline."""
    if len(paths) < 2:
        raise CompareError("give at least two run directories to compare")
    if samples < 1:
        raise CompareError(f"--samples must be at least 1 (a p-value needs resamples), got {samples}")
    runs = [_run(p) for p in paths]
    for other in runs[1:]:
        _same_test_set(runs[0], other)
    beams = {run["path"]: run["beam_size"] for run in runs}
    if len(set(beams.values())) > 1:
        shown = ", ".join(f"{path} beam {beam}" for path, beam in beams.items())
        log.warning("the runs decoded the test split differently (%s): their scores differ by decoding too", shown)
    metrics = []
    for name in ("bleu", "chrf", "ter"):  # each with its default settings, as runs score by default
        if name in registry.names("metric"):
            component = registry.get("metric", name)
            metrics.append(
                component.factory(component.config()) if component.config is not None else component.factory()
            )
    base = runs[0]
    for run in runs:
        run["p_values"] = {}
        if run is base:
            continue
        for metric in metrics:
            if isinstance(metric, PairedTestMetric):
                tested = metric.paired_test(
                    base["hypotheses"], run["hypotheses"], base["references"], base["sources"], samples=samples
                )
                run["p_values"].update({k: v.get("p_value") for k, v in tested.items()})
    keys = list(dict.fromkeys(k for run in runs for k in run["scores"]))
    return {
        "baseline": base["path"],
        "sentences": len(base["sources"]),
        "samples": samples,
        "keys": keys,
        "runs": [
            {k: v for k, v in run.items() if k not in ("sources", "references", "hypotheses", "recipe")} for run in runs
        ],
        "seed_groups": seed_groups(runs),
    }


def _number(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"


def markdown(result: dict[str, Any]) -> str:
    keys = result["keys"]
    lines = [
        f"# Comparison on the same {result['sentences']} test sentences",
        "",
        f"Baseline: `{result['baseline']}`. p: paired bootstrap ({result['samples']} resamples) against it.",
        "",
        "| run | " + " | ".join(keys) + " | retention (composite) | parameters | file MB | tokens/s, batch 32 |",
        "|---|" + "---|" * (len(keys) + 4),
    ]
    base = result["runs"][0]["scores"]
    for run in result["runs"]:
        cells = []
        for key in keys:
            value = run["scores"].get(key)
            text = _number(value)
            if run is not result["runs"][0] and isinstance(value, (int, float)) and key in base:
                text += f" ({value - base[key]:+.2f}"
                p = run["p_values"].get(key)
                text += f", p={p:.3f})" if isinstance(p, (int, float)) else ")"
            cells.append(text)
        size = run["size"]
        retention = run["retention"].get("composite")
        parameters = size.get("parameters")
        file_bytes = size.get("file_bytes")
        speed = (size.get("throughput") or {}).get("tokens_per_second")
        lines.append(
            f"| `{run['path']}` | "
            + " | ".join(cells)
            + f" | {_number(100 * retention, 1) + '%' if isinstance(retention, (int, float)) else '–'}"
            + f" | {f'{parameters:,}' if isinstance(parameters, int) else '–'}"
            + f" | {_number(file_bytes / 1e6) if isinstance(file_bytes, int) else '–'}"
            + f" | {_number(speed, 0)} |"
        )
    for group in result.get("seed_groups") or []:
        lines += [
            "",
            f"## Seed to seed: {len(group['runs'])} runs of one recipe, seeds {', '.join(map(str, group['seeds']))}",
            "",
            "| score | mean | standard deviation | range |",
            "|---|---|---|---|",
        ]
        for key, row in group["spread"].items():
            scale, unit = (100, "%") if key == "retention_bleu" else (1, "")
            lines.append(
                f"| {'retention (BLEU)' if key == 'retention_bleu' else key} | {_number(scale * row['mean'])}{unit} "
                f"| {_number(scale * row['std'])}{unit} | {_number(scale * row['min'])}–{_number(scale * row['max'])}{unit} |"
            )
        lines.append("")
        lines.append(
            "A difference between arms smaller than this spread is within what another seed gives: "
            "`" + "`, `".join(group["runs"]) + "`."
        )
    return "\n".join(lines) + "\n"


def compare_command(args: Any) -> int:
    from cvmkd_core.plugins import build_plugins

    plugins = build_plugins()
    result = compare([Path(p) for p in args.run_dirs], plugins.registry, samples=args.samples)
    text = markdown(result)
    print(text, end="")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "compare.md", text)
        atomic_write_json(out / "compare.json", result)
    return 0
