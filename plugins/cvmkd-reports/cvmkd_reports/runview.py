"""Reports: a read-only view of a run directory, the reporter contract, and ``cvmkd report``.

A **reporter** is a component a plugin registers with ``register.reporter(name, factory,
config=ConfigClass)`` and a recipe selects in ``[[reports]]``. The object the factory returns has
one method::

    def write(self, run: RunView, out_dir: Path) -> list[Path]:
        '''Write the report into out_dir; return every file written, the main document first.'''

It reads the run only through :class:`RunView`, which is built from the run directory's files
and nothing else, so a report written at the end of a run (``Loop._finalize`` calls
:func:`finalize_reports` once ``summary.json`` is written) and one written later by
``cvmkd report RUN_DIR`` from the same files are the same. The view tolerates what is missing (a
run that failed early, one still running, an older run): every attribute is ``None`` or empty
when its file is absent, and :meth:`RunView.missing` lists what is not there.

At finalize, each selected reporter writes into ``RUN_DIR/reports/``; its first file is recorded
in ``summary.json`` under ``outputs["report_<name>"]`` (``report_html``...), and summary.json is
rewritten atomically. A reporter that raises is a one-line warning, listed in
``summary.extra[REPORT_ERRORS]``; it changes neither the run's status nor its exit status.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cvmkd_core.errors import (
    ComponentError,
    CvmkdError,
    RecipeError,
    ReportError,
    RunDirError,
    describe_failure,
    one_line,
)
from cvmkd_core.files import atomic_write_json
from cvmkd_core.rundir import DEFAULT_TRAIN_LOG, RECIPE_FILE, SUMMARY_FILE, RunFiles
from cvmkd_core.stash import StashKey

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

log = logging.getLogger("cvmkd")

#: ``summary.json`` ``extra.report_errors``: one line per reporter that failed
REPORT_ERRORS: StashKey[list[str]] = StashKey("report_errors")

#: the folder reports are written to by default, in the run directory
REPORTS_DIR = "reports"
#: at least one of these makes a folder a run directory
RUN_MARKERS = (RECIPE_FILE, SUMMARY_FILE, DEFAULT_TRAIN_LOG)
#: the weights file of a model package
WEIGHTS_FILE = "model.safetensors"


@runtime_checkable
class Reporter(Protocol):
    """What a reporter component is: an object with ``write``."""

    def write(self, run: RunView, out_dir: Path) -> list[Path]:
        """Write the report into ``out_dir`` (it exists); return the files written, main first."""
        ...


def _one_line(text: Any, limit: int = 300) -> str:
    return one_line(text, limit)


def describe_exception(exc: BaseException) -> str:
    """``ValueError: boom (at /path/file.py:12)``: the exception and where it was raised."""
    return describe_failure(exc, limit=300)


# --- the view of a run directory -----------------------------------------------------------------


class RunView:
    """A read-only view of a run directory, built only from its files.

    Attributes (each ``None`` or empty when its file is missing or unreadable):

    - ``path``: the run directory;
    - ``recipe``: ``recipe.toml`` as plain tables (the resolved recipe, defaults written out);
    - ``summary``: ``summary.json``; ``None`` while the run is still running (or was killed);
    - ``steps``: the step records of the training log (``{"step", "iteration", "loss", ...}``);
    - ``events``: its event records (``{"event": "run_start" | "validation" | "checkpoint" |
      "rollback" | "rollback_skipped" | "resume" | "run_end", ...}``);
    - ``history``: the validation records, oldest first, from ``validation/history.jsonl`` (or,
      without it, ``validation/step_*.json``); an older record's ``extra`` is read as ``details``;
    - ``teacher_validation``: ``validation/teacher.json``, the teacher's validation scores;
    - ``evaluation``: ``evaluation.json``, student and teacher on the test split;
    - ``quantization``: ``quantization.json``, the fp32 baseline and every quantized variant;
    - ``packages``: model packages by folder name (``model``, ``model-qat-int8``...), each
      ``{"path", "metadata", "file_bytes"}``;
    - ``teacher``: a :class:`RunView` of the teacher's own run (``teacher/``), when it was
      trained in this run;
    - ``problems``: one line per file that exists but could not be read;
    - ``memo``: scratch space reporters share while one set of reports is written (derived
      data, rendered plots), so the same work is not done twice.
    """

    def __init__(self, path: str | Path, *, nested: bool = True) -> None:
        self.path = Path(path)
        if not self.path.exists():
            raise RunDirError(f"no run directory at {self.path}")
        if not self.path.is_dir():
            raise RunDirError(f"{self.path} is a file, not a run directory")
        if not any((self.path / name).is_file() for name in RUN_MARKERS):
            raise RunDirError(f"{self.path} is not a run directory: it holds none of {', '.join(RUN_MARKERS)}")
        self.problems: list[str] = []
        self.memo: dict[Any, Any] = {}
        #: ``cvmkd compare``'s result of a control run (first) against this one, given by
        #: ``cvmkd report --baseline``: the report then shows the gain over training without the teacher
        self.baseline: dict[str, Any] | None = None
        self.recipe: dict[str, Any] | None = self._read_toml(RECIPE_FILE)
        self.summary: dict[str, Any] | None = self._read_json(SUMMARY_FILE)
        self.steps: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._read_train_log()
        self.history: list[dict[str, Any]] = self._read_history()
        self.teacher_validation: dict[str, Any] | None = self._read_json("validation/teacher.json")
        self.evaluation: dict[str, Any] | None = self._read_json("evaluation.json")
        self.quantization: dict[str, Any] | None = self._read_json("quantization.json")
        self.packages: dict[str, dict[str, Any]] = self._read_packages()
        self.teacher: RunView | None = None
        if nested and (self.path / "teacher").is_dir():
            try:
                self.teacher = RunView(self.path / "teacher", nested=False)
            except RunDirError:
                self.teacher = None

    # --- reading, tolerantly --------------------------------------------------------------------

    def _read_json(self, relative: str) -> Any:
        file = self.path / relative
        if not file.is_file():
            return None
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.problems.append(f"{relative}: unreadable ({_one_line(exc, 120)})")
            return None

    def _read_toml(self, relative: str) -> dict[str, Any] | None:
        file = self.path / relative
        if not file.is_file():
            return None
        try:
            return tomllib.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            self.problems.append(f"{relative}: unreadable ({_one_line(exc, 120)})")
            return None

    def _read_jsonl(self, relative: str) -> list[dict[str, Any]] | None:
        file = self.path / relative
        if not file.is_file():
            return None
        try:
            lines = file.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            self.problems.append(f"{relative}: unreadable ({_one_line(exc, 120)})")
            return None
        records, bad = [], 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number < len(lines):  # a half-written last line is a run still writing
                    bad += 1
                continue
            if isinstance(record, dict):
                records.append(record)
        if bad:
            self.problems.append(f"{relative}: {bad} unreadable line{'s' if bad > 1 else ''} skipped")
        return records

    @property
    def train_log_name(self) -> str:
        """The JSONL logger's file (``[[loggers]] name = "jsonl" file = ...``), else train.jsonl:
        the layout every reader of runs shares (:class:`cvmkd_core.rundir.RunFiles`)."""
        return RunFiles(self.path).train_log(self.recipe or {}).relative_to(self.path).as_posix()

    def _read_train_log(self) -> None:
        for record in self._read_jsonl(self.train_log_name) or []:
            if "event" in record:
                self.events.append(record)
            elif "step" in record:
                self.steps.append(record)

    def _read_history(self) -> list[dict[str, Any]]:
        records = self._read_jsonl("validation/history.jsonl")
        if records is None:
            records = []
            directory = self.path / "validation"
            files = sorted(directory.glob("step_*.json")) if directory.is_dir() else []
            for file in files:
                record = self._read_json(f"validation/{file.name}")
                if isinstance(record, dict):
                    records.append(record)
            records.sort(key=lambda r: (_int(r.get("iteration")) or 0, _int(r.get("step")) or 0))
        out = []
        for record in records:
            if "step" not in record or not isinstance(record.get("scores"), Mapping):
                continue
            record = dict(record)
            if not isinstance(record.get("details"), Mapping):
                extra = record.get("extra")  # an older record's name for the details
                record["details"] = dict(extra) if isinstance(extra, Mapping) else {}
            record.setdefault("iteration", record["step"])
            record.setdefault("rolled_back", False)
            out.append(record)
        return out

    def _read_packages(self) -> dict[str, dict[str, Any]]:
        packages: dict[str, dict[str, Any]] = {}
        for directory in sorted(self.path.glob("model*")):
            if not directory.is_dir():
                continue
            metadata = self._read_json(f"{directory.name}/metadata.json")
            weights = directory / WEIGHTS_FILE
            if metadata is None and not weights.is_file():
                continue  # the empty model/ folder of a run that never exported one
            packages[directory.name] = {
                "path": directory,
                "metadata": metadata if isinstance(metadata, dict) else {},
                "file_bytes": weights.stat().st_size if weights.is_file() else None,
            }
        return packages

    # --- what the files say ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        run = (self.recipe or {}).get("run")
        if isinstance(run, Mapping) and isinstance(run.get("name"), str):
            return run["name"]
        return self.path.name

    @property
    def status(self) -> str:
        """``completed``, ``stopped``, ``interrupted``, ``failed``, or ``running`` when there is
        no summary.json (the run is still running, or was killed before it could write one)."""
        if isinstance(self.summary, Mapping) and isinstance(self.summary.get("status"), str):
            return self.summary["status"]
        ended = self.last_event("run_end")
        if ended is not None and isinstance(ended.get("status"), str):
            return ended["status"]
        return "running"

    @property
    def extra(self) -> dict[str, Any]:
        """``summary.json``'s ``extra`` (empty without a summary)."""
        extra = (self.summary or {}).get("extra")
        return extra if isinstance(extra, dict) else {}

    @property
    def gate(self) -> dict[str, Any] | None:
        """The retention gate's verdict (``summary.json`` ``gate``; ``extra.gate`` in runs made
        before it was a field of its own), if the run has one."""
        gate = (self.summary or {}).get("gate") or self.extra.get("gate")
        return gate if isinstance(gate, dict) else None

    def recipe_get(self, dotted: str, default: Any = None) -> Any:
        """A recipe value by dotted key (``"run.steps"``), or ``default``."""
        value: Any = self.recipe or {}
        for part in dotted.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return default
            value = value[part]
        return value

    def recipe_items(self) -> list[tuple[str, Any]]:
        """The resolved recipe as ``(dotted key, value)`` pairs, in file order; arrays of
        tables are indexed (``validation.metrics[0].name``), arrays of values kept whole."""
        return list(_flatten(self.recipe or {}, ""))

    def recipe_reports(self) -> list[tuple[str, dict[str, Any]]]:
        """The recipe's ``[[reports]]``: ``(name, options)`` each."""
        out: list[tuple[str, dict[str, Any]]] = []
        for entry in self.recipe_get("reports", []) or []:
            if isinstance(entry, str):
                out.append((entry, {}))
            elif isinstance(entry, Mapping) and isinstance(entry.get("name"), str):
                out.append((entry["name"], {k: v for k, v in entry.items() if k != "name"}))
        return out

    def events_named(self, *names: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") in names]

    def last_event(self, name: str) -> dict[str, Any] | None:
        found = self.events_named(name)
        return found[-1] if found else None

    @property
    def rollbacks(self) -> list[dict[str, Any]]:
        """The ``rollback`` and ``rollback_skipped`` events, in order."""
        return self.events_named("rollback", "rollback_skipped")

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """``key`` of every step record that has a number for it, against the iteration (the
        step when the log has no iterations): x never goes back, even across a rollback."""
        xs, ys = [], []
        for record in self.steps:
            value = record.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                x = record.get("iteration", record.get("step"))
                if isinstance(x, (int, float)):
                    xs.append(int(x))
                    ys.append(float(value))
        return xs, ys

    def higher_is_better(self, key: str) -> bool:
        """A score's direction, as validation recorded it; TER-like names are lower-is-better."""
        for record in reversed(self.history):
            directions = record["details"].get("higher_is_better")
            if isinstance(directions, Mapping) and key in directions:
                return bool(directions[key])
        return key.lower() not in ("ter", "wer", "cer", "loss")

    def missing(self) -> list[str]:
        """The run's usual files that are not there (relative paths), and unreadable ones."""
        expected = [
            RECIPE_FILE,
            SUMMARY_FILE,
            self.train_log_name,
            "validation/history.jsonl",
            "evaluation.json",
            "quantization.json",
            "model/",
        ]
        absent = []
        for name in expected:
            target = self.path / name.rstrip("/")
            present = target.is_dir() and "model" in self.packages if name == "model/" else target.is_file()
            if not present:
                absent.append(name)
        return absent

    def __repr__(self) -> str:
        return f"RunView({str(self.path)!r}, status={self.status!r})"


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _flatten(value: Any, prefix: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, Mapping):
        if not value and prefix:
            yield prefix, {}
        for key, item in value.items():
            yield from _flatten(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        for index, item in enumerate(value):
            yield from _flatten(item, f"{prefix}[{index}]")
    else:
        yield prefix, value


# --- running reporters ---------------------------------------------------------------------------


def write_reports(
    run_dir: str | Path | RunView,
    reporters: Sequence[tuple[str, Any]],
    out_dir: str | Path | None = None,
) -> list[Path]:
    """Run each ``(name, reporter)`` on the run (a path or a :class:`RunView`) and return every
    file written, in order. ``out_dir`` defaults to ``RUN_DIR/reports``. A reporter that raises
    does not stop the others: once all have run, :class:`ReportError` names each failure (one line
    each) and carries the files that were written (``error.written``)."""
    run = run_dir if isinstance(run_dir, RunView) else RunView(run_dir)
    out = Path(out_dir) if out_dir is not None else run.path / REPORTS_DIR
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(f"cannot write reports to {out}: {exc.strerror or exc}") from None
    written: list[Path] = []
    failures: list[tuple[str, str]] = []
    for name, reporter in reporters:
        write = getattr(reporter, "write", None)
        if not callable(write):
            failures.append((name, f"{type(reporter).__name__} has no write(run, out_dir) method"))
            continue
        try:
            files = write(run, out)
            written.extend(Path(f) for f in (files or []))
        except Exception as exc:  # one reporter's failure must not cost the others their reports
            failures.append((name, describe_exception(exc)))
    written = list(dict.fromkeys(written))  # two reporters may write the same plot files
    if failures:
        raise ReportError(failures, written)
    return written


def make_reporter(registry: Any, name: str, options: Mapping[str, Any] | None = None, *, where: str = "") -> Any:
    """Build the reporter ``name`` from the registry with ``options`` structured by its config
    class, as the loop builds a recipe's components. Unknown name: :class:`ComponentError`
    listing the available reporters."""
    from cvmkd_core.config import structure

    component = registry.get("reporter", name)
    if component.config is None:
        return component.factory()
    try:
        config = structure(dict(options or {}), component.config, where)
    except RecipeError as exc:
        # the options of an older run's recipe may no longer fit: say so and use the defaults
        log.warning(
            "reporter %r: its recipe settings do not fit (%s); using its defaults", name, "; ".join(exc.problems)
        )
        config = structure({}, component.config, where)
    return component.factory(config)


def select_reporters(registry: Any, run: RunView, formats: Sequence[str] = ()) -> list[tuple[str, Any]]:
    """The reporters ``cvmkd report`` runs: those named by ``--format`` (with the run recipe's
    settings for them, if it has any), else the run recipe's ``[[reports]]``, else every
    installed reporter with its defaults."""
    from_recipe = run.recipe_reports()
    chosen: list[tuple[str, dict[str, Any], str]] = []
    if formats:
        for name in dict.fromkeys(formats):
            index = next((i for i, (n, _) in enumerate(from_recipe) if n == name), None)
            options = from_recipe[index][1] if index is not None else {}
            chosen.append((name, options, f"reports[{index}]" if index is not None else name))
    elif from_recipe:
        chosen = [(name, options, f"reports[{i}]") for i, (name, options) in enumerate(from_recipe)]
    elif run.recipe is None and (run.path / RECIPE_FILE).is_file():
        # the run's choice of reports is unknown: guessing "all of them" would write what it never asked for
        raise RunDirError(
            f"{run.path / RECIPE_FILE} is unreadable, so the run's reports are unknown: name them with --format"
        )
    else:
        names = registry.names("reporter")
        if not names:
            raise ComponentError("no reporter is installed: pip install cvmkd-reports, or pass --plugin FILE")
        chosen = [(name, {}, name) for name in names]
    return [(name, make_reporter(registry, name, options, where=where)) for name, options, where in chosen]


def report_command(args: Any) -> int:
    """``cvmkd report RUN_DIR [--format NAME ...] [--out DIR] [--plugin FILE]``: write the run's
    reports from its files; print one line per file written. Never changes the run's files
    other than the reports it writes (summary.json is left as it is)."""
    from cvmkd_core.plugins import build_plugins

    run = RunView(args.run_dir)
    plugins = build_plugins(list(getattr(args, "hook_files", None) or []))
    if getattr(args, "baseline", None):
        from cvmkd_reports.compare import compare

        run.baseline = compare([Path(args.baseline), run.path], plugins.registry)
    reporters = select_reporters(plugins.registry, run, list(getattr(args, "formats", None) or []))
    out = Path(args.out) if getattr(args, "out", None) else run.path / REPORTS_DIR
    try:
        written = write_reports(run, reporters, out)
    except ReportError as exc:
        for file in exc.written:
            print(file)
        raise
    for file in written:
        print(file)
    return 0


# --- at the end of a run -------------------------------------------------------------------------


def finalize_reports(state: Any, summary: Any) -> dict[str, list[Path]]:
    """Write the reports the recipe selected (``state.components["reports[i]"]``) into
    ``RUN_DIR/reports``, once summary.json is written; record each reporter's main file in
    ``summary.outputs["report_<name>"]`` and rewrite summary.json. Never raises: a failure is a
    one-line warning, kept in ``summary.extra[REPORT_ERRORS]``. Returns the files by reporter."""
    try:
        return _finalize_reports(state, summary)
    except Exception as exc:
        log.warning("reports not written: %s", describe_exception(exc))
        return {}


def _finalize_reports(state: Any, summary: Any) -> dict[str, list[Path]]:
    selected = state.selected("reporter")
    if not selected:
        return {}
    run = RunView(state.run_dir)
    out = state.run_dir / REPORTS_DIR
    done: dict[str, list[Path]] = {}
    errors: list[str] = []
    for chosen in selected:
        try:
            done[chosen.label] = write_reports(run, [(chosen.name, chosen.component)], out)
        except ReportError as exc:
            errors.extend(exc.lines())
            done[chosen.label] = exc.written
        except CvmkdError as exc:
            errors.append(f"reporter {chosen.name!r}: {_one_line(exc)}")
    for line in errors:
        log.warning("%s; the run's outputs are not affected", line)
    for label, files in done.items():
        if files:
            summary.outputs[f"report_{label}"] = str(files[0])
    if errors:
        summary.extra[REPORT_ERRORS] = errors
    main = [str(files[0]) for files in done.values() if files]
    if main:
        log.info("reports: %s", ", ".join(main))
    try:
        atomic_write_json(state.run_dir / SUMMARY_FILE, summary.to_dict())
    except OSError as exc:
        log.warning("summary.json not updated with the reports: %s", exc)
    return done


__all__ = [
    "REPORTS_DIR",
    "RunView",
    "Reporter",
    "describe_exception",
    "finalize_reports",
    "make_reporter",
    "report_command",
    "select_reporters",
    "write_reports",
]
