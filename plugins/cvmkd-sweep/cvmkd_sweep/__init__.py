"""``cvmkd sweep RECIPE --grid KEY=V1,V2 ...``: which student, which quantization, to ship.

Every combination of the grid's values is an **arm**: the recipe with those ``--set`` overrides,
run as a normal run folder ``<out>/<arm>`` (``cvmkd run``, one after another, or ``--workers N``
at a time, each on its share of the CPU's threads). A sweep is resumable: a finished arm is kept
(when it ran the settings this sweep gives it; one that ran others is refused), an interrupted one
resumed, a missing one started; running the same command again continues it.

Then every model of every arm (the student, and each accepted quantized student) is a point of
quality (test BLEU and its retention of the teacher) against size (file MB) and latency (ms per
sentence at batch 1). The points no other point beats on all three are the **Pareto front**; the
**chosen** model is the smallest, then fastest, of those that pass the run's gates (the retention
gate, and the deployment gate where the recipe has one). ``<out>/sweep.json``, ``sweep.md``,
``sweep.html`` and ``sweep.png`` hold the table, the front and the choice::

    cvmkd sweep recipes/quick.toml --grid student.model.n_encoder_layers=1,2,3 \\
        --grid 'quantize=[{name="qat-int8", start_step=500}],[{name="dynamic-int8"}]' --out runs/sweep

A grid value is read as TOML (``160``, ``"student-cpu"``, ``[{name = "dynamic-int8"}]``); values
are separated by commas outside brackets and quotes.
"""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import logging
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cvmkd_core.errors import CvmkdError
from cvmkd_core.files import atomic_write_json, atomic_write_text
from cvmkd_core.hookspecs import hookimpl

log = logging.getLogger("cvmkd")


class SweepError(CvmkdError):
    """A grid that cannot be swept."""


def split_values(text: str) -> list[str]:
    """``a,b,[c,d],"e,f"`` -> ``["a", "b", "[c,d]", '"e,f"']``: commas outside brackets and quotes."""
    values: list[str] = []
    current: list[str] = []
    depth, quote = 0, ""
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
            continue
        current.append(char)
    values.append("".join(current).strip())
    return [v for v in values if v]


def parse_grid(grid: list[str]) -> list[tuple[str, list[str]]]:
    axes = []
    for entry in grid:
        key, sep, values = entry.partition("=")
        if not sep or not key.strip() or not re.match(r"^[A-Za-z0-9_.-]+$", key.strip()):
            raise SweepError(f"--grid {entry!r}: expected KEY=V1,V2,...")
        parsed = split_values(values)
        if not parsed:
            raise SweepError(f"--grid {entry!r}: no values")
        axes.append((key.strip(), parsed))
    if not axes:
        raise SweepError("give at least one --grid KEY=V1,V2")
    return axes


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", value).strip("-")[:40] or "none"


def arms(axes: list[tuple[str, list[str]]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values: ``{"name", "overrides"}``, in grid order."""
    out = []
    for combination in itertools.product(*(values for _, values in axes)):
        pairs = list(zip((k for k, _ in axes), combination))
        name = "__".join(f"{_slug(k.rsplit('.', 1)[-1])}-{_slug(v)}" for k, v in pairs)
        out.append({"name": name, "overrides": [f"{k}={v}" for k, v in pairs], "grid": dict(pairs)})
    names = [a["name"] for a in out]
    for index, arm in enumerate(out):  # two values that slug alike stay apart
        if names.count(arm["name"]) > 1:
            arm["name"] = f"{arm['name']}-{index}"
    return out


def _read(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def arm_state(folder: Path) -> str:
    """``done`` (a finished run), ``started`` (a run folder to resume) or ``new``."""
    status = _read(folder / "summary.json").get("status")
    if status in ("completed", "stopped"):
        return "done"
    return "started" if (folder / "recipe.toml").is_file() else "new"


def _arm_overrides(arm: dict[str, Any], sets: list[str]) -> list[str]:
    return [*sets, *arm["overrides"], f"run.name={arm['name']}"]


def check_kept_arms(recipe: str, planned: list[dict[str, Any]], out: Path, sets: list[str]) -> None:
    """A finished arm is kept only when it ran the recipe this sweep gives it: one that ran with
    other settings (another ``--set``, an edited recipe) would put another experiment's results in
    this sweep's table, so it is refused, naming the arm and what differs, before any arm runs."""
    kept = [arm for arm in planned if arm_state(out / arm["name"]) == "done"]
    if not kept:
        return
    from cvmkd_core.rundir import recipe_changes
    from cvmkd_core.session import open_session

    for arm in kept:
        folder = out / arm["name"]
        session = open_session(recipe, _arm_overrides(arm, sets))
        changes = recipe_changes(folder, session.recipe, session.plugins.registry)
        if changes:
            shown = ", ".join(f"{key} {before!r} -> {after!r}" for key, (before, after) in list(changes.items())[:3])
            more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
            raise SweepError(
                f"arm {arm['name']} in {folder} finished with other settings than this sweep gives it "
                f"({shown}{more}); sweep into another --out, or delete that folder to run the arm again"
            )


def run_arm(recipe: str, arm: dict[str, Any], folder: Path, sets: list[str], threads: int | None) -> dict[str, Any]:
    """``cvmkd run`` of one arm in its own process; returns how it went."""
    state = arm_state(folder)
    if state == "done":
        return {"name": arm["name"], "state": "kept", "exit_status": 0, "seconds": 0.0}
    command = [sys.executable, "-m", "cvmkd_core", "run", recipe, "--quiet", "--run-dir", str(folder)]
    for override in _arm_overrides(arm, sets):
        command += ["--set", override]
    if state == "started":
        command.append("--resume")
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    log.info("sweep: %s arm %s", "resuming" if state == "started" else "starting", arm["name"])
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = round(time.perf_counter() - started, 1)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error")]
    if done.returncode not in (0, 3):
        log.warning("sweep: arm %s ended with exit status %d: %s", arm["name"], done.returncode, (errors or [""])[-1])
    return {
        "name": arm["name"],
        "state": "resumed" if state == "started" else "run",
        "exit_status": done.returncode,
        "seconds": seconds,
        **({"error": errors[-1]} if errors else {}),
    }


def points(arm: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    """The models an arm's run produced, each a point: quality, retention, size, latency, gates."""
    summary = _read(folder / "summary.json")
    evaluation = _read(folder / "evaluation.json")
    if not summary or not evaluation:
        return []
    gate = summary.get("gate") or {}
    checks = gate.get("checks") or []
    deployment = summary.get("deployment") or {}

    def gate_for(model: str) -> bool | None:
        judged = [c.get("passed") for c in checks if c.get("model") == model and c.get("passed") is not None]
        return all(judged) if judged else None

    student = (evaluation.get("models") or {}).get("student") or {}
    rows = [
        {
            "arm": arm["name"],
            "grid": arm["grid"],
            "model": "student",
            "folder": str(folder / "model"),
            "bleu": ((evaluation.get("student") or {}).get("scores") or {}).get("bleu"),
            "retention_bleu": (evaluation.get("retention") or {}).get("bleu"),
            "size_mb": student.get("file_bytes", 0) / 1e6 if student.get("file_bytes") else None,
            "latency_ms": (student.get("latency") or {}).get("ms_per_sentence"),
            "gate": gate_for("student"),
        }
    ]
    # quantization.json has each variant's measurements in full; summary.json keeps fewer
    variants = _read(folder / "quantization.json").get("variants") or summary.get("quantized") or []
    for variant in variants:
        if not variant.get("accepted"):
            continue
        name = str(variant.get("name"))
        rows.append(
            {
                "arm": arm["name"],
                "grid": arm["grid"],
                "model": name,
                "folder": str(variant.get("package") or ""),
                "bleu": (variant.get("scores") or {}).get("bleu"),
                "retention_bleu": (variant.get("retention") or {}).get("bleu"),
                "size_mb": variant["file_bytes"] / 1e6 if variant.get("file_bytes") else None,
                "latency_ms": (variant.get("latency") or {}).get("ms_per_sentence"),
                "gate": gate_for(name),
            }
        )
    if deployment:
        for row in rows:  # the deployment gate judged one artefact: the rows it names
            if str(deployment.get("artefact")) and row["folder"].endswith(str(deployment.get("artefact"))):
                row["deployment"] = deployment.get("passed")
    return rows


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def pareto(rows: list[dict[str, Any]]) -> None:
    """Mark each row ``pareto``: no other row is at least as good on BLEU, size and latency and
    better on one (rows without all three measured are left off the front)."""
    measured = [r for r in rows if all(_number(r.get(k)) for k in ("bleu", "size_mb", "latency_ms"))]
    for row in rows:
        row["pareto"] = False
    for row in measured:
        row["pareto"] = not any(
            other is not row
            and other["bleu"] >= row["bleu"]
            and other["size_mb"] <= row["size_mb"]
            and other["latency_ms"] <= row["latency_ms"]
            and (
                other["bleu"] > row["bleu"]
                or other["size_mb"] < row["size_mb"]
                or other["latency_ms"] < row["latency_ms"]
            )
            for other in measured
        )


def choose(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The smallest, then fastest, model that passes its gates (a gate not run counts as passed
    only when the recipe has none: a model the gate did not judge is not chosen over one it did)."""
    judged = any(r.get("gate") is not None for r in rows)
    passing = [
        r
        for r in rows
        if (r.get("gate") is True or (not judged and r.get("gate") is None))
        and r.get("deployment", True) is not False
        and _number(r.get("size_mb"))
    ]
    if not passing:
        return None
    return min(passing, key=lambda r: (r["size_mb"], r["latency_ms"] if _number(r.get("latency_ms")) else float("inf")))


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if _number(value) else "–"


def table(rows: list[dict[str, Any]], chosen: dict[str, Any] | None) -> list[list[str]]:
    out = []
    for row in rows:
        marks = ("chosen " if row is chosen else "") + ("pareto" if row.get("pareto") else "")
        gate = {True: "passed", False: "failed", None: "–"}[row.get("gate")]
        out.append(
            [
                row["arm"],
                row["model"],
                _fmt(row.get("bleu")),
                _fmt(100 * row["retention_bleu"], 1) + "%" if _number(row.get("retention_bleu")) else "–",
                _fmt(row.get("size_mb")),
                _fmt(row.get("latency_ms")),
                gate,
                marks.strip() or "",
            ]
        )
    return out


HEADER = ["arm", "model", "BLEU", "retention (BLEU)", "size MB", "latency ms (batch 1)", "gate", ""]


def markdown(result: dict[str, Any]) -> str:
    chosen = result["chosen"]
    lines = [
        f"# Sweep of {result['recipe']}: {len(result['arms'])} arms",
        "",
        "Grid: " + "; ".join(f"`{k}` = {', '.join(f'`{v}`' for v in vs)}" for k, vs in result["grid"]),
        "",
        "| " + " | ".join(HEADER) + " |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = result["rows"]
    chosen_row = next((r for r in rows if chosen and r["arm"] == chosen["arm"] and r["model"] == chosen["model"]), None)
    lines += ["| " + " | ".join(cells) + " |" for cells in table(rows, chosen_row)]
    lines.append("")
    lines.append("Pareto: no other model is at least as good on BLEU, file size and batch-1 latency and better on one.")
    if chosen:
        lines.append(
            f"**Chosen**: `{chosen['arm']}` {chosen['model']} ({_fmt(chosen['size_mb'])} MB, "
            f"{_fmt(chosen.get('latency_ms'))} ms, BLEU {_fmt(chosen.get('bleu'))}): the smallest, then fastest, "
            f"model that passes its gates; its folder: `{chosen['folder']}`."
        )
    else:
        lines.append("**Chosen**: none: no model of the sweep passes its gates.")
    failed = [a for a in result["arms"] if a["exit_status"] not in (0, 3)]
    for arm in failed:
        lines.append(f"- arm `{arm['name']}` ended with exit status {arm['exit_status']}: {arm.get('error', '')}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], chosen: dict[str, Any] | None, path: Path) -> bytes | None:
    measured = [r for r in rows if all(_number(r.get(k)) for k in ("bleu", "size_mb", "latency_ms"))]
    if not measured:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # points are labelled by their arm's number and model; the key under the plots gives each
    # arm's grid values (arm names are too long to print beside a point)
    numbers: dict[str, int] = {}
    for row in measured:
        numbers.setdefault(row["arm"], len(numbers) + 1)
    key_lines = []
    for arm, number in numbers.items():
        grid = next(r.get("grid") or {} for r in measured if r["arm"] == arm)
        values = ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in grid.items()) or arm
        key_lines.append(f"{number}: {values}"[:110])
    height = 4 + 0.17 * len(key_lines)
    figure = Figure(figsize=(10, height))
    FigureCanvasAgg(figure)
    for axis, key, label in (
        (figure.add_subplot(1, 2, 1), "size_mb", "file size, MB"),
        (figure.add_subplot(1, 2, 2), "latency_ms", "latency at batch 1, ms"),
    ):
        for row in measured:
            number = numbers[row["arm"]]
            marker = "*" if row is chosen else ("o" if row["pareto"] else "x")
            color = f"C{(number - 1) % 10}"
            axis.scatter(row[key], row["bleu"], marker=marker, s=140 if row is chosen else 40, color=color)
            axis.annotate(f"{number} {row['model']}", (row[key], row["bleu"]), fontsize=7, color=color,
                          xytext=(4, 2), textcoords="offset points")  # fmt: skip
        axis.set_xlabel(label)
        axis.set_ylabel("test BLEU")
        axis.grid(True, alpha=0.3)
    figure.text(0.02, 0.01, "\n".join(key_lines), fontsize=7, va="bottom", family="monospace")
    figure.subplots_adjust(bottom=(0.12 * 4 + 0.17 * len(key_lines)) / height, top=0.88, wspace=0.25)
    figure.suptitle("Sweep: quality against size and latency (o Pareto, * chosen, x dominated)")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    data = buffer.getvalue()
    path.write_bytes(data)
    return data


def write_html(result: dict[str, Any], image: bytes | None, path: Path) -> None:
    rows = result["rows"]
    chosen = result["chosen"]
    chosen_row = next((r for r in rows if chosen and r["arm"] == chosen["arm"] and r["model"] == chosen["model"]), None)
    cells = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table(rows, chosen_row)
    )
    picture = f'<img alt="sweep" src="data:image/png;base64,{base64.b64encode(image).decode()}">' if image else ""
    text = markdown(result).split("\n")
    summary = html.escape(next((line for line in text if line.startswith("**Chosen**")), "")).replace("**", "")
    atomic_write_text(
        path,
        "<!doctype html><meta charset=utf-8><title>cvmkd sweep</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:.2em .6em;border-bottom:1px solid #ddd}</style>"
        f"<h1>Sweep of {html.escape(result['recipe'])}</h1><p>{summary}</p>"
        "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in HEADER) + f"</tr>{cells}</table>{picture}\n",
    )


def sweep(recipe: str, grid: list[str], out: Path, sets: list[str], workers: int = 1) -> dict[str, Any]:
    if not Path(recipe).is_file():
        raise SweepError(f"no such recipe file: {recipe}")
    if workers < 1:
        raise SweepError(f"--workers must be at least 1, got {workers}")
    axes = parse_grid(grid)
    planned = arms(axes)
    check_kept_arms(recipe, planned, out, sets)
    out.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(lambda a: run_arm(recipe, a, out / a["name"], sets, threads), planned))
    rows = [row for arm in planned for row in points(arm, out / arm["name"])]
    pareto(rows)
    chosen = choose(rows)
    result = {"recipe": recipe, "grid": axes, "sets": sets, "arms": outcomes, "rows": rows, "chosen": chosen}
    text = markdown(result)
    atomic_write_json(out / "sweep.json", result)
    atomic_write_text(out / "sweep.md", text)
    image = plot(rows, next((r for r in rows if r is chosen), None), out / "sweep.png")
    write_html(result, image, out / "sweep.html")
    return result


def _arguments(parser: Any) -> None:
    parser.add_argument("recipe", help="the recipe every arm starts from")
    parser.add_argument(
        "--grid", action="append", default=[], metavar="KEY=V1,V2", help="a recipe key and its values; repeatable"
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="for every arm"
    )
    parser.add_argument(
        "--out", default="runs/sweep", help="the sweep's folder: one run folder per arm (default runs/sweep)"
    )
    parser.add_argument("--workers", type=int, default=1, help="arms at a time, each on its share of the threads")


def _command(args: Any) -> int:
    result = sweep(args.recipe, args.grid, Path(args.out), args.overrides, args.workers)
    print(markdown(result), end="")
    failed = [a for a in result["arms"] if a["exit_status"] not in (0, 3)]
    return 1 if failed else 0


@hookimpl
def cvmkd_register_commands(cli: Any) -> None:
    cli.command(
        "sweep",
        help="run a grid of recipe variants (resumable), then the Pareto front of quality, size and latency",
        configure=_arguments,
        run=_command,
    )


__all__ = ["arms", "choose", "pareto", "parse_grid", "points", "split_values", "sweep"]
