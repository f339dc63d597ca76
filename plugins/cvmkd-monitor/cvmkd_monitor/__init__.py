"""cvmkd-monitor: ``cvmkd monitor RUN_DIR``, a run's progress read from its files while it runs."""

from __future__ import annotations

from typing import Any

from cvmkd_core.hookspecs import hookimpl


def _arguments(parser: Any) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory, e.g. runs/default")
    parser.add_argument("--follow", "-f", action="store_true", help="refresh until the run ends")
    parser.add_argument(
        "--interval", type=float, default=5.0, metavar="SECONDS", help="refresh period with --follow (default 5)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON snapshot")


def _monitor(args: Any) -> int:
    from cvmkd_monitor.monitor import monitor_command

    return monitor_command(args)


@hookimpl
def cvmkd_register_commands(cli: Any) -> None:
    cli.command(
        "monitor", help="show a run's progress from its files, also while it runs", configure=_arguments, run=_monitor
    )
