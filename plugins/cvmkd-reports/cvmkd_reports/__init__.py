"""cvmkd-reports: the run reports ``markdown``, ``html`` and ``json``.

Selected in a recipe with ``[[reports]]`` tables; every key is optional (defaults shown)::

    [[reports]]
    name = "html"            # reports/report.html: one self-contained page, plots embedded
    file = "report.html"
    examples = 5             # example sentences per list (worst sentences, loops, test examples)

    [[reports]]
    name = "markdown"        # reports/report.md, and its plots in reports/plots/*.png
    file = "report.md"
    examples = 5

    [[reports]]
    name = "json"            # reports/report.json: the same data, machine-readable
    file = "report.json"
    examples = 5
    plots = true             # also write reports/plots/*.png and list them

Each reporter reads the run only through :class:`cvmkd_reports.runview.RunView` (the run
directory's files), at the end of the run or later with ``cvmkd report RUN_DIR``. What the
reports contain: the comparison of the teacher, the student and every quantized student (size,
CPU speed, test scores, retention of the teacher, the retention gate's verdict), the validation
history with rollbacks, the error analysis with example sentences, the run summary and every
hyperparameter, and four plots (training loss with its KD and CE terms, learning rate,
validation scores, size against quality). See ``docs/reports.md``.

All three render one gathered data set (:func:`cvmkd_reports.data.gather`); Markdown and HTML
serialise the same blocks (:mod:`cvmkd_reports.document`), so they never disagree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs

from cvmkd_core.config import ConfigValueError, ge
from cvmkd_core.files import atomic_write_bytes, atomic_write_text
from cvmkd_core.hookspecs import hookimpl
from cvmkd_reports import document, htmlpage, markdown
from cvmkd_reports.data import gather
from cvmkd_reports.plots import render_plots
from cvmkd_reports.runview import RunView

__version__ = "0.1.0"

PLOTS_DIR = "plots"


def _file_name(_instance: Any, _attribute: Any, value: str) -> None:
    if not value or "/" in value or "\\" in value or value in (".", ".."):
        raise ConfigValueError(f"must be a file name without folders, got {value!r}")


@attrs.frozen
class MarkdownConfig:
    """``[[reports]] name = "markdown"``."""

    file: str = attrs.field(default="report.md", validator=_file_name)
    examples: int = attrs.field(default=5, validator=ge(0))
    """example sentences shown per list"""


@attrs.frozen
class HtmlConfig:
    """``[[reports]] name = "html"``."""

    file: str = attrs.field(default="report.html", validator=_file_name)
    examples: int = attrs.field(default=5, validator=ge(0))
    """example sentences shown per list"""


@attrs.frozen
class JsonConfig:
    """``[[reports]] name = "json"``."""

    file: str = attrs.field(default="report.json", validator=_file_name)
    examples: int = attrs.field(default=5, validator=ge(0))
    """example sentences kept per list"""
    plots: bool = True
    """also write the plots to plots/*.png and list their paths"""


def _write_plots(plots: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    written = []
    for plot in plots:
        if plot.get("png"):
            path = out_dir / PLOTS_DIR / plot["file"]
            atomic_write_bytes(path, plot["png"])
            written.append(path)
    return written


class MarkdownReporter:
    """The run report in Markdown (report.md), with its plots in plots/*.png."""

    def __init__(self, config: MarkdownConfig | None = None) -> None:
        self.config = config if config is not None else MarkdownConfig()

    def write(self, run: RunView, out_dir: Path) -> list[Path]:
        data = gather(run, examples=self.config.examples)
        plots = render_plots(run, data)
        path = out_dir / self.config.file
        atomic_write_text(path, markdown.render(document.build(data, plots)))
        return [path, *_write_plots(plots, out_dir)]


class HtmlReporter:
    """The run report as one self-contained HTML page (plots embedded, no external resources)."""

    def __init__(self, config: HtmlConfig | None = None) -> None:
        self.config = config if config is not None else HtmlConfig()

    def write(self, run: RunView, out_dir: Path) -> list[Path]:
        data = gather(run, examples=self.config.examples)
        plots = render_plots(run, data)
        path = out_dir / self.config.file
        atomic_write_text(path, htmlpage.render(document.build(data, plots), f"cvmkd report: {data['run']['name']}"))
        return [path]


class JsonReporter:
    """The run report's data as JSON (report.json): models, gate, validations, hyperparameters."""

    def __init__(self, config: JsonConfig | None = None) -> None:
        self.config = config if config is not None else JsonConfig()

    def write(self, run: RunView, out_dir: Path) -> list[Path]:
        data = gather(run, examples=self.config.examples)
        written: list[Path] = []
        listed: list[dict[str, Any]] = []
        if self.config.plots:
            plots = render_plots(run, data)
            written = _write_plots(plots, out_dir)
            listed = [
                {"name": p["name"], "title": p["title"], "path": f"{PLOTS_DIR}/{p['file']}"}
                if p.get("png")
                else {"name": p["name"], "title": p["title"], "path": None, "missing": p["missing"]}
                for p in plots
            ]
        path = out_dir / self.config.file
        atomic_write_text(path, json.dumps({**data, "plots": listed}, indent=2, default=str) + "\n")
        return [path, *written]


def _report_arguments(parser: Any) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/quick")
    parser.add_argument(
        "--format",
        dest="formats",
        action="append",
        default=[],
        metavar="NAME",
        help="a reporter to run; repeatable (default: the run recipe's [[reports]], else every installed reporter)",
    )
    parser.add_argument("--out", metavar="DIR", help="write here instead of RUN_DIR/reports")
    parser.add_argument(
        "--baseline",
        metavar="RUN_DIR",
        help="a control run (trained without the teacher) on the same test split: the report shows the gain over it",
    )
    parser.add_argument("--plugin", dest="hook_files", action="append", default=[], metavar="FILE")


def _compare_arguments(parser: Any) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="finished runs; the first is the baseline")
    parser.add_argument("--out", metavar="DIR", help="also write compare.md and compare.json here")
    parser.add_argument(
        "--samples", type=int, default=1000, metavar="N", help="paired bootstrap resamples (default 1000)"
    )


def _compare(args: Any) -> int:
    from cvmkd_reports.compare import compare_command

    return compare_command(args)


@hookimpl
def cvmkd_register_commands(cli: Any) -> None:
    from cvmkd_reports.runview import report_command

    cli.command(
        "compare",
        help="finished runs side by side on the same test split: scores, size, speed, p-values",
        configure=_compare_arguments,
        run=_compare,
    )
    cli.command(
        "report",
        help="write a run's reports (Markdown, HTML with plots, JSON) from its files",
        configure=_report_arguments,
        run=report_command,
    )


@hookimpl
def cvmkd_report(state: Any, summary: Any) -> None:
    from cvmkd_reports.runview import finalize_reports

    finalize_reports(state, summary)


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.reporter("markdown", MarkdownReporter, config=MarkdownConfig)
    register.reporter("html", HtmlReporter, config=HtmlConfig)
    register.reporter("json", JsonReporter, config=JsonConfig)


__all__ = [
    "HtmlConfig",
    "HtmlReporter",
    "JsonConfig",
    "JsonReporter",
    "MarkdownConfig",
    "MarkdownReporter",
    "gather",
    "render_plots",
]
