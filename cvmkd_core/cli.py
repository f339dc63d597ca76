"""The ``cvmkd`` command. The core's own subcommands are ``run``, ``check`` and ``plugins``;
every other one (``report``, ``monitor``, ``compare``...) comes from a plugin's
``cvmkd_register_commands`` hook.

Errors a user can fix print one line each on stderr and exit with status 2; ``--debug`` shows
the traceback as well.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from cvmkd_core import __version__
from cvmkd_core.errors import CvmkdError, describe_failure, machine_error, one_line

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: the run completed, but a plugin's enforced verdict on it failed; every output is kept
EXIT_VERDICT_FAILED = 3
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM, what a shell reports for a process SIGTERM ended

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
    run.add_argument(
        "--resume", action="store_true", help="continue the run in its run directory from its last checkpoint"
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar; only progress lines, warnings and errors")
    _common(run)

    check = sub.add_parser("check", help="validate a recipe and its components; runs nothing")
    _recipe_args(check)
    _common(check)

    plugins = sub.add_parser("plugins", help="list plugins, their hooks and components")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.add_argument("--plugin", dest="hook_files", action="append", default=[], metavar="FILE")
    _common(plugins)

    commands = Commands(sub)
    installed = _command_plugins()
    if installed is not None:
        installed.pm.hook.cvmkd_register_commands(cli=commands)
    parser.set_defaults(_commands=commands)
    return parser


class Commands:
    """What ``cvmkd_register_commands`` receives: ``cli.command(...)`` adds a subcommand."""

    def __init__(self, subparsers: Any) -> None:
        self._subparsers = subparsers
        self.handlers: dict[str, Callable[[argparse.Namespace], int]] = dict(COMMANDS)
        self.owners: dict[str, str] = {name: "cvmkd" for name in COMMANDS}

    def command(
        self,
        name: str,
        help: str,
        configure: Callable[[argparse.ArgumentParser], None],
        run: Callable[[argparse.Namespace], int],
    ) -> None:
        """Add ``cvmkd NAME``: ``configure(parser)`` adds its arguments (``--debug`` is added
        for it), ``run(args)`` does the work and returns the exit status."""
        owner = getattr(run, "__module__", "?")
        if name in self.handlers:
            raise CvmkdError(f"two plugins add the command {name!r}: {self.owners[name]} and {owner}")
        parser = self._subparsers.add_parser(name, help=help)
        configure(parser)
        _common(parser)
        self.handlers[name] = run
        self.owners[name] = owner


def _command_plugins() -> Any:
    """The installed plugins, for their commands; a plugin that fails to load is a warning."""
    from cvmkd_core.plugins import build_plugins

    try:
        return build_plugins()
    except CvmkdError as exc:
        print(f"warning: plugin commands unavailable: {one_line(str(exc))}", file=sys.stderr)
        return None


def _setup_logging(debug: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if debug else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("cvmkd").setLevel(level)
    # --quiet hides info lines but keeps the periodic progress lines
    logging.getLogger("cvmkd.progress").setLevel(logging.DEBUG if debug else logging.INFO)
    if not debug:
        # a failed plugin is reported once, as a one-line warning
        warnings.formatwarning = lambda message, category, *a, **k: f"warning: {message}\n"  # type: ignore[assignment]


def resume_command(args: argparse.Namespace, run_dir: Any) -> str:
    """The command that continues this run exactly: the same recipe, ``--set`` options and hook
    files, with ``--resume --run-dir``."""
    import shlex

    words = ["cvmkd", "run", args.recipe]
    for override in args.overrides:
        words += ["--set", override]
    for hook_file in args.hook_files:
        words += ["--plugin", str(hook_file)]
    words += ["--resume", "--run-dir", str(run_dir)]
    return " ".join(shlex.quote(str(w)) for w in words)


def cmd_run(args: argparse.Namespace) -> int:
    from cvmkd_core.loop import Terminated
    from cvmkd_core.rundir import RECIPE_FILE, run_dir_for
    from cvmkd_core.session import open_session, run_session
    from cvmkd_core.state import SIGNAL

    rank = int(os.environ.get("RANK", "0"))  # torchrun's; rank 0 alone reports
    if rank:
        logging.getLogger("cvmkd").setLevel(logging.WARNING)
    session = open_session(args.recipe, args.overrides, args.hook_files)
    try:
        summary, run_dir = run_session(session, args.run_dir, resume=args.resume)
        if rank:
            return EXIT_INTERRUPTED if summary.status == "interrupted" else EXIT_OK
    except KeyboardInterrupt as stop:  # a second signal, or one while finalizing: stopped at once
        path = run_dir_for(session.recipe, args.run_dir)
        hint = f"; continue with: {resume_command(args, path)}" if (path / RECIPE_FILE).is_file() else ""
        print(f"error: interrupted{hint}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(stop, Terminated) else EXIT_INTERRUPTED
    log.info(
        "run %s: %s at step %d (%d iterations, %d rollbacks) in %.1fs; outputs in %s",
        session.recipe.run.name,
        summary.status,
        summary.final_step,
        summary.iterations_executed,
        summary.rollbacks,
        summary.wall_seconds,
        run_dir,
    )
    if summary.status == "interrupted":
        print(
            f"interrupted at step {summary.final_step}; continue with: {resume_command(args, run_dir)}", file=sys.stderr
        )
        return EXIT_TERMINATED if summary.extra.get(SIGNAL, None) == "SIGTERM" else EXIT_INTERRUPTED
    failed = [v for v in summary.verdicts if v.failed]
    for verdict in failed:
        print(f"{verdict.line} ({run_dir})", file=sys.stderr)
    if any(v.enforced for v in failed):
        return EXIT_VERDICT_FAILED
    print(f"{summary.status}: {run_dir}")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from cvmkd_core.rundir import run_dir_for
    from cvmkd_core.session import open_session, prepare_state

    session = open_session(args.recipe, args.overrides, args.hook_files)
    prepare_state(session, run_dir_for(session.recipe))  # builds every component; writes nothing
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


COMMANDS: dict[str, Any] = {
    "run": cmd_run,
    "check": cmd_check,
    "plugins": cmd_plugins,
}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
    except CvmkdError as exc:  # two plugins adding one command, say
        for line in exc.lines():
            print(f"error: {one_line(line)}", file=sys.stderr)
        return exc.exit_status
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    # under torchrun each process reports its own error, saying which it is
    error = f"error (rank {os.environ.get('RANK', '?')})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "error"
    _setup_logging(debug, getattr(args, "quiet", False))
    try:
        return args._commands.handlers[args.command](args)
    except CvmkdError as exc:
        if debug:
            traceback.print_exc()
        for line in exc.lines():
            print(f"{error}: {one_line(line)}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print(f"{error}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug or a plugin's failure: one line, the traceback on request
        if debug:
            traceback.print_exc()
        machine = machine_error(exc)
        if machine is not None:  # a full disk or a read-only folder, met inside any plugin
            print(f"{error}: {machine}", file=sys.stderr)
            return EXIT_USAGE
        print(f"{error}: {describe_failure(exc)}; rerun with --debug for the traceback", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
