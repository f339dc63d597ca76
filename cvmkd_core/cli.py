"""The ``cvmkd`` command: run, check, plugins, translate, report and monitor.

Errors a user can fix print one line each on stderr and exit with status 2; ``--debug`` shows
the traceback as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
import warnings
from typing import Any, Sequence

from cvmkd_core import __version__
from cvmkd_core.errors import CvmkdError, describe_failure, one_line

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: the run completed, but the student failed the retention gate; every output is kept
EXIT_GATE_FAILED = 3
EXIT_INTERRUPTED = 130

log = logging.getLogger("cvmkd")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")


def _recipe_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to a TOML recipe")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe key (value read as TOML, else as a string); repeatable",
    )
    parser.add_argument(
        "--plugin",
        dest="hook_files",
        action="append",
        default=[],
        metavar="FILE",
        help="load a Python file of @hookimpl functions as a plugin; repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvmkd", description="Knowledge distillation of translation models, with proof."
    )
    parser.add_argument("--version", action="version", version=f"cvmkd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run a recipe")
    _recipe_args(run)
    run.add_argument("--run-dir", metavar="DIR", help="write the run here (default: run.output_dir/run.name)")
    run.add_argument("--resume", action="store_true", help="continue the run in its run directory from its last checkpoint")
    run.add_argument("--quiet", action="store_true", help="no progress bar; only progress lines, warnings and errors")
    _common(run)

    check = sub.add_parser("check", help="validate a recipe and its components; runs nothing")
    _recipe_args(check)
    _common(check)

    plugins = sub.add_parser("plugins", help="list plugins, their hooks and components")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.add_argument("--plugin", dest="hook_files", action="append", default=[], metavar="FILE")
    _common(plugins)

    translate = sub.add_parser("translate", help="translate text with a model package (fp32 or quantized)")
    translate.add_argument("--model", required=True, metavar="DIR", help="a model package: runs/NAME/model or runs/NAME/model-SCHEME")
    translate.add_argument("--input", "-i", default="-", metavar="FILE", help="one sentence per line (default: stdin)")
    translate.add_argument("--output", "-o", default="-", metavar="FILE", help="one translation per line (default: stdout)")
    translate.add_argument("--batch-size", type=int, default=32, metavar="N", help="sentences decoded together (default 32)")
    translate.add_argument("--beam-size", type=int, default=1, metavar="N", help="1: greedy decoding (default); >1: beam search")
    translate.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu (default), cuda, or auto")
    _common(translate)

    report = sub.add_parser("report", help="write a run's reports (Markdown, HTML with plots, JSON) from its files")
    report.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/quick")
    report.add_argument(
        "--format", dest="formats", action="append", default=[], metavar="NAME",
        help="a reporter to run; repeatable (default: the run recipe's [[reports]], else every installed reporter)",
    )
    report.add_argument("--out", metavar="DIR", help="write here instead of RUN_DIR/reports")
    report.add_argument("--plugin", dest="hook_files", action="append", default=[], metavar="FILE")
    _common(report)

    monitor = sub.add_parser("monitor", help="show a run's progress from its files, also while it runs")
    monitor.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/default")
    monitor.add_argument("--follow", "-f", action="store_true", help="refresh until the run ends")
    monitor.add_argument("--interval", type=float, default=5.0, metavar="SECONDS", help="refresh period with --follow (default 5)")
    monitor.add_argument("--json", action="store_true", help="print one JSON snapshot")
    _common(monitor)
    return parser


def _setup_logging(debug: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("cvmkd").setLevel(level)
    # --quiet hides info lines but keeps the periodic progress lines
    logging.getLogger("cvmkd.progress").setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        # a failed plugin is reported once, as a one-line warning
        warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"  # type: ignore[assignment]


def cmd_run(args: argparse.Namespace) -> int:
    from cvmkd_core.builtins import progress
    from cvmkd_core.session import open_session, run_session

    progress.set_mode("lines" if args.quiet else "auto")
    session = open_session(args.recipe, args.overrides, args.hook_files)
    summary, run_dir = run_session(session, args.run_dir, resume=args.resume)
    log.info(
        "run %s: %s at step %d (%d iterations, %d rollbacks) in %.1fs; outputs in %s",
        session.recipe.run.name, summary.status, summary.final_step,
        summary.iterations_executed, summary.rollbacks, summary.wall_seconds, run_dir,
    )
    if summary.status == "interrupted":
        print(
            f"interrupted at step {summary.final_step}; continue with: cvmkd run {args.recipe} --resume --run-dir {run_dir}",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    gate = summary.extra.get("gate")
    if isinstance(gate, dict) and gate.get("passed") is False:
        print(f"retention gate failed: {gate.get('verdict', 'see summary.json')} ({run_dir})", file=sys.stderr)
        return EXIT_GATE_FAILED
    print(f"{summary.status}: {run_dir}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from cvmkd_core.session import open_session

    session = open_session(args.recipe, args.overrides, args.hook_files)
    refs = session.recipe.component_refs()
    chosen = ", ".join(f"{path}={ref.name}" for path, ref in refs)
    print(f"ok: {args.recipe}: {len(refs)} components ({chosen})")
    return EXIT_OK


def cmd_plugins(args: argparse.Namespace) -> int:
    from cvmkd_core.plugins import build_plugins

    plugins = build_plugins(args.hook_files)
    described = plugins.describe()
    if args.json:
        print(json.dumps(described, indent=2))
        return EXIT_OK
    for plugin in described:
        version = f" {plugin['version']}" if plugin["version"] else ""
        dist = f" [{plugin['distribution']}{version}]" if plugin["distribution"] else f" [{plugin['source']}]"
        print(f"{plugin['name']}{dist}")
        if plugin["error"]:
            print(f"  failed to load: {plugin['error']}")
            continue
        print(f"  hooks: {', '.join(plugin['hooks']) or '-'}")
        for comp in plugin["components"]:
            desc = f" - {comp['description']}" if comp["description"] else ""
            print(f"  {comp['kind']} {comp['name']}{desc}")
    return EXIT_OK


def cmd_translate(args: argparse.Namespace) -> int:
    from cvmkd_core.model.translate import translate_command

    return translate_command(args)


def cmd_report(args: argparse.Namespace) -> int:
    from cvmkd_core.reports import report_command

    return report_command(args)


def cmd_monitor(args: argparse.Namespace) -> int:
    from cvmkd_core.monitor import monitor_command

    return monitor_command(args)


COMMANDS: dict[str, Any] = {
    "run": cmd_run,
    "check": cmd_check,
    "plugins": cmd_plugins,
    "translate": cmd_translate,
    "report": cmd_report,
    "monitor": cmd_monitor,
}

def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    _setup_logging(debug, getattr(args, "quiet", False))
    try:
        return COMMANDS[args.command](args)
    except CvmkdError as exc:
        if debug:
            traceback.print_exc()
        for line in exc.lines():
            print(f"error: {one_line(line)}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug or a plugin's failure: one line, the traceback on request
        if debug:
            traceback.print_exc()
        print(f"error: {describe_failure(exc)}; rerun with --debug for the traceback", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
