"""The mlflow logger in real runs of the toy trainer, against a real local MLflow store, read
back through MLflow's own client and ``mlflow.search_runs``: the parameters are the resolved
recipe, the step metrics equal train.jsonl's, the validation scores history.jsonl's, the
artefacts and tags are there; a resumed run continues its MLflow run; a failing store costs the
run nothing."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

import cvmkd_guard
import cvmkd_mlflow
from cvmkd_core.plugins import Plugins, build_plugins
from cvmkd_core.recipe import load_recipe
from cvmkd_core.session import Session, run_session
from cvmkd_testing import TOY_RECIPE, toy_plugin_manager

mlflow = pytest.importorskip("mlflow")

LOGGERS = """
[[loggers]]
name = "jsonl"

[[loggers]]
name = "mlflow"
"""
RECIPE = TOY_RECIPE + LOGGERS


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Plugins:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    plugins = toy_plugin_manager()
    plugins.add_plugin(cvmkd_mlflow, name="mlflow", source="test")
    return plugins


def run(plugins: Plugins, overrides: list[str] | None = None, text: str = RECIPE, resume: bool = False) -> Any:
    path = Path("recipe.toml")
    path.write_text(text)
    recipe = load_recipe(path, overrides=overrides or [], registry=plugins.registry)
    return run_session(Session(recipe=recipe, plugins=plugins, recipe_path=path), resume=resume)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def store() -> str:
    return f"sqlite:///{Path('runs').resolve() / 'mlflow.db'}"


def search() -> list[Any]:
    """The runs of the experiment, as ``mlflow.search_runs`` returns them to a user."""
    mlflow.set_tracking_uri(store())
    return mlflow.search_runs(experiment_names=["cvmkd"], output_format="list")


def test_registered_by_the_entry_point() -> None:
    assert build_plugins().registry.get("logger", "mlflow").plugin == "mlflow"


def test_a_run_is_tracked_with_its_recipe_metrics_tags_and_artefacts(plugins: Plugins) -> None:
    plugins.add_plugin(cvmkd_guard, name="guard", source="test")
    summary, run_dir = run(
        plugins, ["run.steps=7", "run.log_every=2", "guard.name=guard", 'guard.gate_scores=["exact"]']
    )
    assert summary.status == "completed"

    runs = search()
    (tracked,) = runs
    assert tracked.info.run_name == "toy" and tracked.info.status == "FINISHED"
    assert summary.outputs["mlflow"] == f"{store()}#{tracked.info.run_id}"
    # the parameters: the resolved recipe, flattened
    params = tracked.data.params
    assert params["run.steps"] == "7" and params["distill.name"] == "toy" and params["guard.name"] == "guard"
    assert json.loads(params["validation.metrics"]) == [{"name": "exact"}]

    client = mlflow.tracking.MlflowClient(tracking_uri=store())
    run_id = tracked.info.run_id

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    # the step metrics: the steps train.jsonl logs, the same values
    records = [r for r in lines(run_dir / "train.jsonl") if "event" not in r]
    assert [r["step"] for r in records] == [2, 4, 6, 7]
    for key in ("loss", "weight", "lr"):
        assert history(f"train/{key}") == [(r["step"], pytest.approx(r[key])) for r in records], key
    # each validation's scores, and the teacher's and the retention beside them
    validations = lines(run_dir / "validation" / "history.jsonl")
    for key in ("exact", "composite"):
        assert history(f"validation/{key}") == [(h["step"], pytest.approx(h["scores"][key])) for h in validations]
        assert history(f"retention/{key}") == [
            (h["step"], pytest.approx(h["details"]["retention"][key])) for h in validations
        ]
    written = json.loads((run_dir / "summary.json").read_text())
    assert tracked.data.metrics["run/wall_seconds"] == pytest.approx(written["wall_seconds"])
    # the tags: how the run ended and the gate's verdict
    tags = tracked.data.tags
    assert tags["cvmkd.status"] == "completed" and tags["cvmkd.run_dir"] == str(run_dir.resolve())
    assert tags["cvmkd.gate"] == {True: "passed", False: "failed", None: "not evaluated"}[written["gate"]["passed"]]
    assert tags["cvmkd.gate_verdict"] == written["gate"]["verdict"]
    # the artefacts: the run's files and its model package
    names = {f.path for f in client.list_artifacts(run_id)}
    assert {"summary.json", "recipe.toml"} <= names
    local = Path(client.download_artifacts(run_id, "summary.json", str(run_dir.parent / "download")))
    assert json.loads(local.read_text())["status"] == "completed"


def test_a_resumed_run_continues_its_mlflow_run(plugins: Plugins) -> None:
    summary, run_dir = run(plugins, ["run.steps=3"])
    first = json.loads((run_dir / "mlflow.json").read_text())["run_id"]
    summary, _ = run(plugins, ["run.steps=6"], resume=True)
    assert summary.status == "completed"
    (tracked,) = search()
    assert tracked.info.run_id == first and tracked.info.status == "FINISHED"
    client = mlflow.tracking.MlflowClient(tracking_uri=store())
    steps = [m.step for m in client.get_metric_history(first, "validation/exact")]
    assert sorted(steps) == [3, 6]


def test_a_failing_store_is_one_warning_and_the_run_goes_on(
    plugins: Plugins, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the store's folder should be")
    text = RECIPE.replace('name = "mlflow"', f'name = "mlflow"\ntracking_uri = "sqlite:///{blocked}/sub/mlflow.db"')
    with caplog.at_level("WARNING", logger="cvmkd"):
        summary, run_dir = run(plugins, [], text)
    assert summary.status == "completed"
    warnings = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mlflow:")]
    assert len(warnings) == 1 and "the run goes on untracked" in warnings[0]
    assert (run_dir / "train.jsonl").is_file()


def test_a_distillation_run_tracks_its_test_scores_retention_teacher_and_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the installed plugins and the recipe alone, as a user runs it."""
    import torch

    from cvmkd_core.session import open_session
    from cvmkd_testing import TINY_KD_RECIPE, write_tiny_corpus

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    write_tiny_corpus(tmp_path)
    (tmp_path / "recipe.toml").write_text(TINY_KD_RECIPE)
    torch.set_num_threads(1)
    summary, run_dir = run_session(open_session(tmp_path / "recipe.toml", ['loggers=["jsonl", "mlflow"]']))
    assert summary.status == "completed"
    written = json.loads((run_dir / "summary.json").read_text())
    evaluation = written["evaluation"]

    # the teacher the run trained first is a run of its own (its stage folder), the student's is this one
    tracked_runs = {r.data.tags["cvmkd.run_dir"]: r for r in search()}
    assert set(tracked_runs) == {str(run_dir.resolve()), str((run_dir / "teacher").resolve())}
    tracked = tracked_runs[str(run_dir.resolve())]
    metrics, tags = tracked.data.metrics, tracked.data.tags
    for model in ("student", "teacher"):
        for key, value in evaluation["scores"][model].items():
            assert metrics[f"test/{model}/{key}"] == pytest.approx(value), (model, key)
    for key, value in evaluation["retention"].items():
        assert metrics[f"test/retention/{key}"] == pytest.approx(value)
    low, high = evaluation["retention_interval"]["bleu"]
    assert metrics["test/retention_low/bleu"] == pytest.approx(low)
    assert metrics["test/retention_high/bleu"] == pytest.approx(high)
    teacher = written["extra"]["trainer"]["teacher"]
    assert tags["cvmkd.teacher"] == teacher["path"] and tags["cvmkd.teacher_sha256"] == teacher["weights_sha256"]
    assert written["gate"] is None and tags["cvmkd.gate"] == "not evaluated"  # the recipe has no [guard]
    client = mlflow.tracking.MlflowClient(tracking_uri=store())
    names = {f.path for f in client.list_artifacts(tracked.info.run_id)}
    assert {"summary.json", "recipe.toml", "evaluation.json", "model"} <= names
    model_files = {Path(f.path).name for f in client.list_artifacts(tracked.info.run_id, "model")}
    assert {"metadata.json", "model.safetensors"} <= model_files
