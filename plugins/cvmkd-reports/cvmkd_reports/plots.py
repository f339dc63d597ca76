"""The report's plots, drawn with matplotlib's Agg canvas (headless: no display, no pyplot state).

Each plot is a PNG (``dpi`` 110). :func:`render_plots` returns, for every plot, either its bytes
or the reason it could not be drawn (no data, or an error), so a report always says which plots
are missing and why.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator

from cvmkd_reports.data import COMPOSITE, MB, is_number, score_label, unit_scale
from cvmkd_reports.runview import RunView, describe_exception

DPI = 110
#: the colours of the validation scores, the model kinds and the rollbacks
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"]
ROLLBACK_COLOUR = "#d62728"
ROLE_STYLE = {
    "teacher": {"marker": "s", "color": "#444444"},
    "student": {"marker": "o", "color": "#1f77b4"},
    "quantized": {"marker": "^", "color": "#2ca02c"},
    "rejected": {"marker": "X", "color": "#bbbbbb"},
}


class NoData(Exception):
    """The run has nothing to draw for this plot; the message says what is missing."""


def _figure(width: float, height: float, rows: int = 1, cols: int = 1, **kwargs: Any) -> tuple[Figure, Any]:
    figure = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, cols, squeeze=False, **kwargs)
    for ax in axes.flat:
        ax.grid(True, which="major", color="#dddddd", linewidth=0.7)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return figure, axes


def _png(figure: Figure) -> bytes:
    figure.tight_layout(rect=getattr(figure, "cvmkd_rect", (0, 0, 1, 1)))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None}, facecolor="white")
    return buffer.getvalue()


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` values (fewer at the start); non-finite values are skipped."""
    out: list[float] = []
    total, count, queue = 0.0, 0, []
    for value in values:
        finite = math.isfinite(value)
        queue.append(value if finite else None)
        if finite:
            total += value
            count += 1
        if len(queue) > window:
            old = queue.pop(0)
            if old is not None:
                total -= old
                count -= 1
        out.append(total / count if count else float("nan"))
    return out


def _window(n: int) -> int:
    return max(1, min(500, n // 50))


def _x_label(run: RunView) -> str:
    return "iteration (steps executed, rollbacks included)" if run.rollbacks else "step"


def _rollback_lines(ax: Any, run: RunView, *, label: bool) -> None:
    for index, event in enumerate(run.rollbacks):
        x = event.get("iteration")
        if is_number(x):
            ax.axvline(
                x,
                color=ROLLBACK_COLOUR,
                linestyle=":",
                linewidth=1.3,
                label="rollback" if label and index == 0 else None,
            )


def _thousands(ax: Any) -> None:
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))


# --- (a) the training loss, with its KD and CE terms ---------------------------------------------


def plot_loss(run: RunView, data: dict[str, Any]) -> Figure:
    panels = [(k, t) for k, t in (("loss", "total loss"), ("kd", "KD term"), ("ce", "CE term")) if run.series(k)[0]]
    if not panels:
        raise NoData(f"no loss values in {run.train_log_name}")
    figure, axes = _figure(10, 2.3 * len(panels) + 0.6, len(panels), 1, sharex=True)
    colours = {"loss": "#1f77b4", "kd": "#9467bd", "ce": "#ff7f0e"}
    for ax, (key, title) in zip(axes[:, 0], panels):
        xs, ys = run.series(key)
        window = _window(len(ys))
        ax.plot(xs, ys, color=colours[key], alpha=0.22, linewidth=0.6, label="per step")
        smooth = moving_average(ys, window)
        ax.plot(
            xs,
            smooth,
            color=colours[key],
            linewidth=1.8,
            label=f"moving average ({window:,} steps)" if window > 1 else key,
        )
        _rollback_lines(ax, run, label=True)
        ax.set_ylabel(title)
        finite = sorted(y for y in smooth if math.isfinite(y))
        if finite:  # the first steps' loss is far above the rest: keep the curve readable
            raw = sorted(y for y in ys if math.isfinite(y))
            top = max(finite[-1], raw[int(0.99 * (len(raw) - 1))]) if raw else finite[-1]
            bottom = min(finite[0], raw[int(0.01 * (len(raw) - 1))]) if raw else finite[0]
            margin = (top - bottom) * 0.08 or abs(top) * 0.1 or 1.0
            ax.set_ylim(bottom - margin, top + margin)
        if key == "kd" and finite and finite[-1] < 0.01:
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    axes[0, 0].set_title("Training loss: total, and its distillation (KD) and cross-entropy (CE) terms", fontsize=11)
    axes[-1, 0].set_xlabel(_x_label(run))
    _thousands(axes[-1, 0])
    return figure


# --- (b) the learning rate ------------------------------------------------------------------------


def plot_learning_rate(run: RunView, data: dict[str, Any]) -> Figure:
    xs, ys = run.series("lr")
    if not xs:
        raise NoData(f"no learning rates (lr) in {run.train_log_name}")
    figure, axes = _figure(10, 3.0)
    ax = axes[0, 0]
    ax.plot(xs, ys, color="#2ca02c", linewidth=1.6, label="learning rate")
    _rollback_lines(ax, run, label=True)
    ax.set_title("Learning rate", fontsize=11)
    ax.set_xlabel(_x_label(run))
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    _thousands(ax)
    if run.rollbacks:
        ax.legend(loc="upper right", fontsize=8, frameon=False)
    return figure


# --- (c) validation scores over the run ------------------------------------------------------------


def _plotted_keys(run: RunView, keys: list[str]) -> list[str]:
    """The scores the composite weighs and the composite, when the record says which; else all."""
    for record in reversed(run.history):
        weights = record["details"].get("composite_weights")
        if isinstance(weights, dict) and weights:
            chosen = [k for k in keys if k in weights or k == COMPOSITE]
            if chosen:
                return chosen
    return keys


def plot_validation(run: RunView, data: dict[str, Any]) -> Figure:
    section = data["validation"]
    rows = section["rows"]
    if not rows:
        raise NoData("no validation records")
    keys = _plotted_keys(run, section["score_keys"])
    higher = [k for k in keys if section["higher_is_better"].get(k, True)]
    lower = [k for k in keys if not section["higher_is_better"].get(k, True)]
    teacher = section["teacher_scores"]
    panels = [("higher is better", higher)] + ([("lower is better", lower)] if lower else [])
    widths = [3, 1.4] if lower else [1]
    figure, axes = _figure(11 if lower else 10, 4.4, 1, len(panels), gridspec_kw={"width_ratios": widths})
    metrics = [k for k in keys if k != COMPOSITE]
    colour = {k: PALETTE[i % len(PALETTE)] for i, k in enumerate(metrics)} | {COMPOSITE: "#111111"}
    for ax, (title, panel_keys) in zip(axes[0], panels):
        for key in panel_keys:
            scale = 100.0 if unit_scale(key) else 1.0
            label = score_label(key) + (" ×100" if scale != 1 else "")
            measured = [r for r in rows if is_number(r["scores"].get(key))]
            points = [(r["iteration"], r["scores"][key] * scale) for r in measured if not r["rolled_back"]]
            if points:
                ax.plot(
                    *zip(*points),
                    marker="o",
                    markersize=4,
                    linewidth=2.2 if key == COMPOSITE else 1.5,
                    color=colour[key],
                    label=label,
                )
            dropped = [(r["iteration"], r["scores"][key] * scale) for r in measured if r["rolled_back"]]
            if dropped:
                ax.scatter(*zip(*dropped), marker="x", s=40, color=colour[key], zorder=3)
            if is_number(teacher.get(key)):
                ax.axhline(teacher[key] * scale, color=colour[key], linestyle="--", linewidth=1.0, alpha=0.75)
        _rollback_lines(ax, run, label=ax is axes[0, 0])
        ax.set_title(f"Validation scores ({title})", fontsize=11)
        ax.set_xlabel(_x_label(run))
        ax.set_ylabel("score")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=6 if ax is axes[0, 0] else 3, integer=True))
        _thousands(ax)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    if len(panels) > 1:
        more, more_labels = axes[0, 1].get_legend_handles_labels()
        handles, labels = handles + more, labels + more_labels
    if teacher:
        handles.append(Line2D([], [], color="#555555", linestyle="--", linewidth=1.0))
        labels.append("teacher (dashed)")
    if any(r["rolled_back"] for r in rows):
        handles.append(Line2D([], [], color="#555555", marker="x", linestyle="none"))
        labels.append("rolled-back validation")
    columns = len(labels) if len(labels) <= 8 else math.ceil(len(labels) / 2)
    figure.legend(handles, labels, loc="lower center", ncol=columns, fontsize=8.5, frameon=False)
    # room for the legend below: an attribute of our own on the figure, which _png reads back
    figure.cvmkd_rect = (0, 0.08 if columns == len(labels) else 0.13, 1, 1)  # type: ignore[attr-defined]
    return figure


# --- (d) size against quality ---------------------------------------------------------------------


def plot_size_quality(run: RunView, data: dict[str, Any]) -> Figure:
    models = data["models"]
    rows = [r for r in models["rows"] if is_number(r["file_bytes"]) and r["scores"]]
    keys = [k for k in (COMPOSITE, "bleu") if any(is_number(r["scores"].get(k)) for r in rows)]
    if not rows or not keys:
        raise NoData("no model with both a file size and test scores")
    figure, axes = _figure(5.2 * len(keys), 4.0, 1, len(keys))
    x_max = max(r["file_bytes"] for r in rows) / MB * 1.25
    for ax, key in zip(axes[0], keys):
        shown = [r for r in rows if is_number(r["scores"].get(key))]
        lo, hi = min(r["scores"][key] for r in shown), max(r["scores"][key] for r in shown)
        pad = (hi - lo) * 0.2 or abs(hi) * 0.1 or 1.0
        seen: set[str] = set()
        for row in shown:
            kind = "rejected" if row["accepted"] is False else row["role"]
            style = ROLE_STYLE[kind]
            label = {
                "teacher": "teacher",
                "student": "student (fp32)",
                "quantized": "quantized",
                "rejected": "quantized, rejected",
            }[kind]
            ax.scatter(
                row["file_bytes"] / MB,
                row["scores"][key],
                s=70,
                marker=style["marker"],
                color=style["color"],
                edgecolor="white",
                linewidth=0.8,
                zorder=3,
                label=None if label in seen else label,
            )
            seen.add(label)
        ax.set_xlabel("file size (MB)")
        ax.set_ylabel(f"{score_label(key)} ({models.get('split') or 'test'} split)")
        ax.set_title(f"{score_label(key)} against model size", fontsize=11)
        ax.set_xlim(left=0, right=x_max)
        ax.set_ylim(lo - pad, hi + pad)
        _label_points(figure, ax, [(r["name"], r["file_bytes"] / MB, r["scores"][key]) for r in shown])
        ax.legend(loc="best", fontsize=8, frameon=True, framealpha=0.9, edgecolor="#dddddd")
    return figure


def _label_points(figure: Figure, ax: Any, points: list[tuple[str, float, float]]) -> None:
    """Label each point where the text covers neither an earlier label nor another point: right
    above, right below, left above, left below (measured with the renderer), else right above."""
    figure.tight_layout()
    canvas = figure.canvas
    assert isinstance(canvas, FigureCanvasAgg)  # _figure gave every figure an Agg canvas
    renderer = canvas.get_renderer()
    pixels = [ax.transData.transform((x, y)) for _, x, y in points]
    boxes: list[Any] = []
    candidates = [((7, 5), "left"), ((7, -13), "left"), ((-7, 5), "right"), ((-7, -13), "right")]
    for index, (name, x, y) in enumerate(points):
        for attempt, (offset, align) in enumerate([*candidates, candidates[0]]):
            text = ax.annotate(name, (x, y), textcoords="offset points", xytext=offset, ha=align, fontsize=8.5)
            box = text.get_window_extent(renderer).expanded(1.08, 1.2)
            covers = any(box.overlaps(b) for b in boxes) or any(
                box.contains(px, py) for j, (px, py) in enumerate(pixels) if j != index
            )
            if not covers or attempt == len(candidates):
                boxes.append(box)
                break
            text.remove()


#: (name, title, drawing function), in the order reports show them
PLOTS: list[tuple[str, str, Callable[[RunView, dict[str, Any]], Figure]]] = [
    ("loss", "Training loss with its KD and CE terms", plot_loss),
    ("learning_rate", "Learning rate", plot_learning_rate),
    ("validation", "Validation scores over the run", plot_validation),
    ("size_quality", "Model size against quality", plot_size_quality),
]


def render_plots(run: RunView, data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every plot: ``{"name", "title", "file", "png"}``, or ``{"name", "title", "missing"}`` with
    the reason it is not drawn. Memoised on the view, so reporters of one set share them."""
    if "cvmkd_reports.plots" in run.memo:
        return run.memo["cvmkd_reports.plots"]
    plots: list[dict[str, Any]] = []
    for name, title, draw in PLOTS:
        try:
            png = _png(draw(run, data))
        except NoData as exc:
            plots.append({"name": name, "title": title, "missing": str(exc)})
        except Exception as exc:  # a plot that cannot be drawn must not cost the report
            plots.append({"name": name, "title": title, "missing": f"could not be drawn: {describe_exception(exc)}"})
        else:
            plots.append({"name": name, "title": title, "file": f"{name}.png", "png": png})
    run.memo["cvmkd_reports.plots"] = plots
    return plots
