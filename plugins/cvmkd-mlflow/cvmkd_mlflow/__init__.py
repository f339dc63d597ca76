"""cvmkd-mlflow: the ``mlflow`` logger, every run tracked in MLflow.

Selected in the recipe's ``[[loggers]]`` (or ``--set 'loggers=["jsonl", "mlflow"]'``); every key
is optional (defaults shown). The array replaces the default ``[{name = "jsonl"}]``, so list
``jsonl`` too: ``cvmkd monitor`` and the reports read ``train.jsonl``::

    [[loggers]]
    name = "jsonl"

    [[loggers]]
    name = "mlflow"
    tracking_uri = ""        # empty: $MLFLOW_TRACKING_URI, else sqlite:///<run.output_dir>/mlflow.db
    experiment = "cvmkd"
    every = 0                # step metrics every N steps; 0 follows run.log_every
    log_model = true         # the model package(s) as artefacts

One MLflow run per cvmkd run, named by ``run.name``:

- **parameters**: the resolved recipe, flattened (``run.steps``, ``distill.loss.temperature``...;
  arrays as JSON text);
- **metrics**: ``train/<key>`` at the steps ``train.jsonl`` logs (loss and every numeric value
  the trainer logs), ``validation/<key>``, ``teacher/<key>`` and ``retention/<key>`` at each
  validation's step, ``run/rollbacks``; at the end the test split's scores
  (``test/<model>/<key>``, ``test/retention/<key>`` and its 95% interval
  ``test/retention_low/<key>``, ``test/retention_high/<key>``, the same for each quantized
  student) and ``run/wall_seconds``;
- **tags**: ``cvmkd.status``, ``cvmkd.run_dir``, ``cvmkd.teacher`` (the teacher's folder) and
  ``cvmkd.teacher_sha256``, ``cvmkd.gate`` (passed, failed or not evaluated) and
  ``cvmkd.gate_verdict`` (its line), ``cvmkd.verdicts`` (every failed verdict);
- **artefacts**: ``summary.json``, ``recipe.toml``, ``evaluation.json`` and ``quantization.json``
  when written, the ``reports/`` folder, and with ``log_model`` the ``model*/`` packages.

The store: MLflow 3 keeps its file store (``./mlruns``) in maintenance mode and refuses it unless
told otherwise, and recommends a database; the default is therefore an SQLite database beside the
runs, ``<run.output_dir>/mlflow.db``, with the artefacts in ``<run.output_dir>/mlartifacts``.
``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`` browses it; ``MLFLOW_TRACKING_URI`` or
``tracking_uri`` send the runs to any server. A resumed cvmkd run continues its MLflow run (its id
is kept in the run folder's ``mlflow.json``).

Tracking never costs a run: a failing store (a server that went away, a full disk) is one warning,
and the run goes on untracked. The ``mlflow`` package is this plugin's dependency, not cvmkd's; a
recipe selecting the logger without it fails before training (``ComponentError``, exit status 2).
"""

from __future__ import annotations

import json
import logging
import numbers
import os
import time
from pathlib import Path
from typing import Any

import attrs

from cvmkd_core.config import ge
from cvmkd_core.errors import ComponentError
from cvmkd_core.files import atomic_write_json
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.state import RunState, RunSummary, StepResult

log = logging.getLogger("cvmkd")

MISSING = "logger 'mlflow' needs the mlflow package: pip install mlflow"
#: in the run folder: the MLflow run this cvmkd run logs to, for --resume
RUN_FILE = "mlflow.json"
#: MLflow's limits: characters of a parameter's value, entries of one log_batch call
PARAM_CHARS = 6000
BATCH_PARAMS = 100
BATCH_METRICS = 1000
#: step metrics are sent in batches of this many values (and at each validation and at the end)
FLUSH_EVERY = 500


@attrs.frozen
class MlflowConfig:
    """``[[loggers]] name = "mlflow"``."""

    tracking_uri: str = ""
    """the MLflow store; empty: ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<run.output_dir>/mlflow.db``"""
    experiment: str = "cvmkd"
    """the MLflow experiment the runs go to (created when missing)"""
    every: int = attrs.field(default=0, validator=ge(0))
    """log step metrics every N steps; 0 follows ``run.log_every``"""
    log_model: bool = True
    """log the run's model packages (``model``, ``model-<quantizer>``) as artefacts"""


def _mlflow() -> tuple[Any, Any]:
    """``MlflowClient`` and MLflow's entities, imported only when a recipe selects the logger."""
    try:
        from mlflow import entities
        from mlflow.tracking import MlflowClient
    except ImportError as exc:
        detail = "" if isinstance(exc, ModuleNotFoundError) else f" ({exc})"
        raise ComponentError(MISSING + detail) from None
    return MlflowClient, entities


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"run.steps": "12", "distill.loss.temperature": "6.0", ...}``: MLflow's parameters are
    text; arrays and inline tables become JSON, cut at MLflow's length limit."""
    flat: dict[str, str] = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            flat[name] = text[:PARAM_CHARS]
    return flat


def default_tracking_uri(output_dir: str | Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(output_dir).resolve() / 'mlflow.db'}"


class MlflowLogger:
    """Track the run in MLflow: the recipe, step and validation metrics, test results, artefacts."""

    def __init__(self, config: MlflowConfig) -> None:
        self.config = config
        # fails here, when the run's components are built, before any training
        self._client_class, self._entities = _mlflow()
        self.client: Any = None
        self.run_id: str | None = None
        self.tracking_uri = ""
        self._pending: list[Any] = []
        self._failed = False
        self._ended = False

    # --- the store ------------------------------------------------------------------------------

    def _guarded(self, what: str, action: Any) -> Any:
        """Run one call to MLflow; the first failure is a warning and tracking stops there."""
        if self._failed:
            return None
        try:
            return action()
        except Exception as exc:  # a store that went away must not cost the run
            self._failed = True
            log.warning("mlflow: %s failed (%s: %s); the run goes on untracked", what, type(exc).__name__, exc)
            return None

    def _start(self, state: RunState) -> None:
        run = state.recipe.run
        self.tracking_uri = self.config.tracking_uri or default_tracking_uri(run.output_dir)
        client = self.client = self._client_class(tracking_uri=self.tracking_uri)
        record = state.run_dir / RUN_FILE
        earlier = _read_json(record).get("run_id")
        if earlier and _exists(client, earlier):  # a resumed run continues its MLflow run
            self.run_id = earlier
            client.update_run(earlier, status="RUNNING")
            log.info("mlflow: continuing run %s in %s", earlier, self.tracking_uri)
            return
        experiment = client.get_experiment_by_name(self.config.experiment)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            artifacts = None
            if (
                self.tracking_uri.startswith("sqlite:///")
                and not self.config.tracking_uri
                and not os.environ.get("MLFLOW_TRACKING_URI")
            ):
                artifacts = (Path(run.output_dir).resolve() / "mlartifacts").as_uri()
            experiment_id = client.create_experiment(self.config.experiment, artifact_location=artifacts)
        created = client.create_run(
            experiment_id,
            run_name=run.name,
            tags={"cvmkd.run_dir": str(state.run_dir.resolve()), "cvmkd.status": "running"},
        )
        self.run_id = created.info.run_id
        atomic_write_json(record, {"run_id": self.run_id, "tracking_uri": self.tracking_uri})
        params = [self._entities.Param(k, v) for k, v in flatten(state.recipe.to_dict()).items()]
        for start in range(0, len(params), BATCH_PARAMS):
            client.log_batch(self.run_id, params=params[start : start + BATCH_PARAMS])
        log.info(
            "mlflow: run %s in %s (browse: mlflow ui --backend-store-uri %s)",
            self.run_id,
            self.tracking_uri,
            self.tracking_uri,
        )

    def _metrics(self, prefix: str, values: dict[str, Any] | None, step: int) -> None:
        now = int(time.time() * 1000)
        for key, value in (values or {}).items():
            number = _number(value)
            if number is not None:
                self._pending.append(self._entities.Metric(f"{prefix}/{key}", number, now, step))

    def _flush(self) -> None:
        if not self._pending or self.run_id is None:
            self._pending = []
            return
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), BATCH_METRICS):
            batch = pending[start : start + BATCH_METRICS]
            self._guarded("logging metrics", lambda batch=batch: self.client.log_batch(self.run_id, metrics=batch))

    # --- the hooks ------------------------------------------------------------------------------

    @hookimpl
    def cvmkd_step_end(self, state: RunState, result: StepResult) -> None:
        if self.run_id is None or self._failed:
            return
        every = self.config.every or state.recipe.run.log_every
        if state.step % every and state.step != state.total_steps:
            return
        self._metrics("train", {"loss": result.loss, **result.metrics}, state.step)
        if len(self._pending) >= FLUSH_EVERY:
            self._flush()

    @hookimpl
    def cvmkd_event(self, state: RunState, name: str, data: dict[str, Any]) -> None:
        if name == "run_start" and self.run_id is None:
            self._guarded("starting the MLflow run", lambda: self._start(state))
            self._metrics("run", {"rollbacks": state.rollbacks}, state.step)
        if self.run_id is None or self._failed:
            return
        if name == "validation":
            step, details = int(data["step"]), data.get("details") or {}
            self._metrics("validation", data.get("scores"), step)
            teacher = details.get("teacher")
            if isinstance(teacher, dict):
                self._metrics("teacher", teacher.get("scores"), step)
            if isinstance(details.get("retention"), dict):
                self._metrics("retention", details["retention"], step)
            self._flush()
        elif name == "rollback":
            self._metrics("run", {"rollbacks": data.get("rollbacks")}, int(data["from_step"]))

    @hookimpl
    def cvmkd_run_error(self, state: RunState, error: BaseException) -> None:
        self._flush()

    @hookimpl
    def cvmkd_finalize(self, state: RunState, summary: RunSummary) -> None:
        self._flush()
        if self.run_id is not None:
            summary.outputs.setdefault("mlflow", f"{self.tracking_uri}#{self.run_id}")

    @hookimpl(trylast=True)
    def cvmkd_report(self, state: RunState, summary: RunSummary) -> None:
        """After the reports are written: the test results, the tags, every artefact; then the
        MLflow run ends with the cvmkd run's status."""
        if self.run_id is None or self._failed or self._ended:
            return
        self._ended = True
        self._guarded("recording the run's results", lambda: self._results(state, summary))

    def _results(self, state: RunState, summary: RunSummary) -> None:
        client, run_dir = self.client, state.run_dir
        written = _read_json(run_dir / "summary.json")
        self._metrics("run", {"wall_seconds": summary.wall_seconds, "iterations": summary.iterations_executed}, 0)
        evaluation = written.get("evaluation") or {}
        for model, scores in (evaluation.get("scores") or {}).items():
            self._metrics(f"test/{model}", scores, state.step)
        self._metrics("test/retention", evaluation.get("retention"), state.step)
        self._interval("test", evaluation.get("retention_interval"), state.step)
        for variant in written.get("quantized") or []:
            label = str(variant.get("name"))
            self._metrics(f"test/{label}", variant.get("scores"), state.step)
            self._metrics(f"test/{label}/retention", variant.get("retention"), state.step)
            self._interval(f"test/{label}", variant.get("retention_interval"), state.step)
        self._flush()
        teacher = ((written.get("extra") or {}).get("trainer") or {}).get("teacher") or {}
        gate = written.get("gate") or {}
        tags = {
            "cvmkd.status": summary.status,
            "cvmkd.gate": {True: "passed", False: "failed"}.get(bool(gate["passed"]), "")
            if isinstance(gate.get("passed"), bool)
            else "not evaluated",
            "cvmkd.gate_verdict": str(gate.get("verdict") or ""),
            "cvmkd.teacher": str(teacher.get("path") or ""),
            "cvmkd.teacher_sha256": str(teacher.get("weights_sha256") or ""),
            "cvmkd.verdicts": " | ".join(v.line for v in summary.verdicts if v.failed),
        }
        client.log_batch(self.run_id, tags=[self._entities.RunTag(k, v[:5000]) for k, v in tags.items() if v])
        for name in ("summary.json", "recipe.toml", "evaluation.json", "quantization.json"):
            if (run_dir / name).is_file():
                client.log_artifact(self.run_id, str(run_dir / name))
        if (run_dir / "reports").is_dir() and any((run_dir / "reports").iterdir()):
            client.log_artifacts(self.run_id, str(run_dir / "reports"), "reports")
        if self.config.log_model:
            for folder in sorted(run_dir.glob("model*")):
                if folder.is_dir() and (folder / "metadata.json").is_file():
                    client.log_artifacts(self.run_id, str(folder), folder.name)
        status = {"completed": "FINISHED", "stopped": "FINISHED", "interrupted": "KILLED"}.get(summary.status, "FAILED")
        client.set_terminated(self.run_id, status=status)

    def _interval(self, prefix: str, interval: Any, step: int) -> None:
        if not isinstance(interval, dict):
            return
        for key, bounds in interval.items():
            if isinstance(bounds, list) and len(bounds) == 2:
                self._metrics(prefix, {f"retention_low/{key}": bounds[0], f"retention_high/{key}": bounds[1]}, step)


def _exists(client: Any, run_id: str) -> bool:
    try:
        client.get_run(run_id)
    except Exception:  # gone from the store, or another store: a new MLflow run
        return False
    return True


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.logger("mlflow", MlflowLogger, config=MlflowConfig)


__all__ = ["MlflowConfig", "MlflowLogger", "default_tracking_uri", "flatten"]
