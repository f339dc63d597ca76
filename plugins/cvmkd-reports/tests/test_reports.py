"""The reporters on one real tiny run (teacher, student, a dynamic-int8 variant, the guard's
gate), written at finalize and again with ``cvmkd report``; and on damaged or partial copies."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cvmkd_core.cli import main
from cvmkd_core.errors import ReportError
from cvmkd_core.plugins import build_plugins
from cvmkd_core.session import open_session, run_session
from cvmkd_core.state import RunSummary, Selected
from cvmkd_reports import HtmlReporter, JsonReporter
from cvmkd_reports.runview import REPORT_ERRORS, RunView, finalize_reports, select_reporters, write_reports
from cvmkd_testing import TINY_KD_RECIPE, write_tiny_corpus

RECIPE = (
    TINY_KD_RECIPE
    + """
[guard]
name = "guard"

[[quantize]]
name = "dynamic-int8"

[[reports]]
name = "markdown"

[[reports]]
name = "html"
examples = 3

[[reports]]
name = "json"
"""
)
PLOTS = ("loss", "learning_rate", "validation", "size_quality")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, tiny_kd_cache: Path) -> Path:
    """One real tiny run for the whole module (about 10 s on 2 cores)."""
    root = tmp_path_factory.mktemp("reports")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run faster on one thread
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        write_tiny_corpus(root)
        (root / "recipe.toml").write_text(RECIPE.replace('cache_dir = "cache"', f'cache_dir = "{tiny_kd_cache}"'))
        summary, path = run_session(open_session(root / "recipe.toml"))
    torch.set_num_threads(threads)
    assert summary.status == "completed"
    return (root / path).resolve()


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _row(page: str, name: str) -> str:
    """The first table row of the HTML page whose first cell is ``name``."""
    for row in re.findall(r"<tr>(.*?)</tr>", page, flags=re.S):
        if re.match(rf"<td[^>]*>{re.escape(name)}(<span|</td>)", row):
            return row
    raise AssertionError(f"no row {name!r}")


def test_reports_are_written_at_finalize_and_recorded_in_the_summary(run_dir: Path) -> None:
    reports = run_dir / "reports"
    for name in ("report.md", "report.html", "report.json", *(f"plots/{p}.png" for p in PLOTS)):
        assert (reports / name).is_file(), name
    summary = _json(run_dir / "summary.json")
    root = run_dir.parent.parent  # the run's paths are relative to where it ran
    assert root / summary["outputs"]["report_html"] == reports / "report.html"
    assert root / summary["outputs"]["report_markdown"] == reports / "report.md"
    assert root / summary["outputs"]["report_json"] == reports / "report.json"
    assert "report_errors" not in summary["extra"]


def test_the_html_page_is_self_contained_and_compares_every_model(run_dir: Path) -> None:
    page = (run_dir / "reports" / "report.html").read_text()
    assert len(re.findall(r'<img src="data:image/png;base64,[A-Za-z0-9+/=]{200,}"', page)) == len(PLOTS)
    assert "<script" not in page and "http://" not in page and "https://" not in page and "<link" not in page
    summary = _json(run_dir / "summary.json")
    gate = summary["gate"]
    banner = "passed" if gate["passed"] else "failed"
    assert f'<div class="banner {banner}">' in page
    assert gate["verdict"].replace("%", "%") in page.replace("&#x27;", "'")

    evaluation = _json(run_dir / "evaluation.json")
    quantization = _json(run_dir / "quantization.json")
    (variant,) = quantization["variants"]
    keys = list(evaluation["student"]["scores"])
    models = evaluation.get("models", {})
    for name, scores, retention, interval, size in (
        ("teacher", evaluation["teacher"]["scores"], None, None, models.get("teacher")),
        (
            "student",
            evaluation["student"]["scores"],
            evaluation["retention"],
            evaluation["retention_interval"],
            models.get("student") or quantization["baseline"],
        ),
        ("dynamic-int8", variant["scores"], variant["retention"], variant["retention_interval"], variant),
    ):
        rows = re.findall(rf"<tr><td[^>]*>{re.escape(name)}(?:<span.*?)?</td>(.*?)</tr>", page, flags=re.S)
        assert len(rows) >= 3, name  # size and speed, scores, retention
        text = " ".join(rows)
        # what the page should show, formatted here as docs/reports.md describes it (not with the
        # reporter's own helpers): 3 decimals for 0-1 scores (BERTScore), 2 otherwise; retention
        # in percent with one decimal; sizes in MB (10^6 bytes), ms and tokens/s
        for key in keys:
            decimals = 3 if key.startswith("bertscore") else 2
            assert f">{scores[key]:,.{decimals}f}<" in rows[1], (name, key)
            if retention is not None:
                # the point, and its 95% bootstrap interval in brackets
                low, high = interval[key]
                shown = f">{100 * retention[key]:.1f}% ({100 * low:.1f}%–{100 * high:.1f}%)<"
                assert shown in rows[2], (name, key)
                assert low <= retention[key] <= high or retention[key] == 0
        if size:
            assert f">{size['file_bytes'] / 1e6:,.2f}<" in text
            assert f">{size['parameter_bytes'] / 1e6:,.2f}<" in text
            assert f">{size['latency']['ms_per_sentence']:,.2f}<" in text
            assert f">{size['throughput']['tokens_per_second']:,.0f}<" in text
        else:  # the teacher's speed is not measured by this version of the trainer
            assert ">not measured<" in text
    assert f">{summary['extra']['trainer']['parameters']:,}<" in _row(page, "student")


def test_the_json_report_holds_the_source_files_numbers(run_dir: Path) -> None:
    report = _json(run_dir / "reports" / "report.json")
    evaluation = _json(run_dir / "evaluation.json")
    quantization = _json(run_dir / "quantization.json")
    summary = _json(run_dir / "summary.json")
    teacher, student, variant = report["models"]["rows"]
    assert (teacher["name"], student["name"], variant["name"]) == ("teacher", "student", "dynamic-int8")
    assert teacher["scores"] == evaluation["teacher"]["scores"]
    assert student["scores"] == evaluation["student"]["scores"]
    assert student["retention"] == evaluation["retention"]
    assert student["retention_interval"] == evaluation["retention_interval"] and evaluation["retention_samples"] > 0
    source = quantization["variants"][0]
    assert variant["scores"] == source["scores"] and variant["retention"] == source["retention"]
    assert variant["retention_interval"] == source["retention_interval"]
    assert variant["file_bytes"] == source["file_bytes"] and variant["parameter_bytes"] == source["parameter_bytes"]
    assert variant["latency_ms_per_sentence"] == source["latency"]["ms_per_sentence"]
    assert variant["throughput_tokens_per_second"] == source["throughput"]["tokens_per_second"]
    assert variant["accepted"] is source["accepted"]
    assert report["gate"]["verdict"] == summary["gate"]["verdict"]
    assert report["gate"]["passed"] == summary["gate"]["passed"]
    history = [json.loads(line) for line in (run_dir / "validation" / "history.jsonl").read_text().splitlines()]
    assert [r["step"] for r in report["validation"]["rows"]] == [h["step"] for h in history] == [6, 12]
    assert [r["scores"] for r in report["validation"]["rows"]] == [h["scores"] for h in history]
    assert ["run.steps", 12] in report["hyperparameters"]
    assert ["reports[1].examples", 3] in report["hyperparameters"]
    assert report["run"]["status"] == "completed" and report["run"]["final_step"] == 12
    assert [p["path"] for p in report["plots"]] == [f"plots/{p}.png" for p in PLOTS]
    assert len(report["analysis"]["examples"]) == 5  # the json reporter's default


def test_the_markdown_report_references_its_plots(run_dir: Path) -> None:
    text = (run_dir / "reports" / "report.md").read_text()
    evaluation = _json(run_dir / "evaluation.json")
    share, (low, high) = evaluation["retention"]["bleu"], evaluation["retention_interval"]["bleu"]
    assert f"{100 * share:.1f}% ({100 * low:.1f}%–{100 * high:.1f}%)" in text  # the interval beside the point
    assert "95% interval, from a paired bootstrap over the test sentences" in text
    images = re.findall(r"!\[[^\]]+\]\((plots/[a-z_]+\.png)\)", text)
    assert images and all((run_dir / "reports" / image).is_file() for image in images)
    assert sorted(images) == sorted(f"plots/{p}.png" for p in PLOTS)
    for heading in (
        "## Teacher, student and quantized students",
        "## Validation history",
        "## Error analysis",
        "## Run summary",
        "## Hyperparameters",
    ):
        assert heading in text


def test_cvmkd_report_regenerates_the_same_reports(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "again"
    monkeypatch.chdir(run_dir.parent.parent)  # the report names the run directory as it is given
    assert main(["report", "runs/tiny", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(out / "report.md")
    assert set(printed) == {
        str(out / n) for n in ("report.md", "report.html", "report.json", *(f"plots/{p}.png" for p in PLOTS))
    }
    for name in ("report.md", "report.html", "report.json"):
        assert (out / name).read_text() == (run_dir / "reports" / name).read_text(), name

    assert main(["report", str(run_dir), "--out", str(tmp_path / "one"), "--format", "json"]) == 0
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["plots", "report.json"]


def test_an_unknown_format_names_the_available_reporters(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", str(run_dir), "--format", "nope", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: unknown reporter 'nope'; available: html, json, markdown"]


def test_a_missing_or_wrong_run_directory_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no run directory at {tmp_path / 'absent'}"
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a run directory" in err[0]


def _copy(run_dir: Path, target: Path) -> Path:
    return Path(shutil.copytree(run_dir, target, ignore=shutil.ignore_patterns("checkpoints", "reports", "teacher")))


def test_a_run_without_its_history_file_still_reports(run_dir: Path, tmp_path: Path) -> None:
    copy = _copy(run_dir, tmp_path / "run")
    (copy / "validation" / "history.jsonl").unlink()
    view = RunView(copy)
    assert [r["step"] for r in view.history] == [6, 12]  # read from validation/step_*.json
    assert main(["report", str(copy), "--format", "html", "--format", "json"]) == 0
    report = _json(copy / "reports" / "report.json")
    assert [r["step"] for r in report["validation"]["rows"]] == [6, 12]

    # a run that failed before validating, evaluating, quantizing or writing its summary
    for name in ("validation", "evaluation.json", "quantization.json", "summary.json"):
        path = copy / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(copy / "reports")
    assert main(["report", str(copy)]) == 0
    page = (copy / "reports" / "report.html").read_text()
    report = _json(copy / "reports" / "report.json")
    assert report["run"]["status"] == "completed"  # from the run_end event of the training log
    assert report["validation"]["rows"] == [] and report["gate"] is None
    notes = " ".join(report["notes"])
    for missing in (
        "summary.json is missing",
        "no validation records",
        "no test-split evaluation",
        "no quantized variants",
        "no retention-gate verdict",
    ):
        assert missing in notes and missing in page
    assert page.count('<img src="data:image/png;base64,') == 2  # the training curves are still there
    assert "Validation scores over the run” not drawn: no validation records" in page


def test_a_partial_training_log_and_older_records_are_read(tmp_path: Path) -> None:
    run = tmp_path / "old"
    (run / "validation").mkdir(parents=True)
    (run / "train.jsonl").write_text(
        '{"event": "run_start", "step": 0}\n{"step": 1, "loss": 2.0, "lr": 0.1}\n{"step": 2, "loss": 1.5, "lr": 0.1}\n{"step": 3, "lo'
    )
    (run / "validation" / "history.jsonl").write_text(
        '{"step": 2, "iteration": 2, "scores": {"bleu": 1.0, "ter": 90.0}, "seconds": 1.0, "extra": {"note": 1}, "rolled_back": false}\n'
    )
    view = RunView(run)
    assert view.status == "running" and view.summary is None and view.problems == []
    assert view.series("loss") == ([1, 2], [2.0, 1.5])
    assert view.history[0]["details"] == {"note": 1}
    assert view.higher_is_better("bleu") and not view.higher_is_better("ter")
    assert "summary.json" in view.missing() and "recipe.toml" in view.missing()
    assert write_reports(view, [("json", JsonReporter()), ("html", HtmlReporter())], tmp_path / "out")
    report = _json(tmp_path / "out" / "report.json")
    assert report["run"]["status"] == "running"
    assert "the run is still running" in " ".join(report["notes"])


class Broken:
    def write(self, run: RunView, out_dir: Path) -> list[Path]:
        raise ValueError("no ink")


def test_a_failing_reporter_does_not_stop_the_others(
    run_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(ReportError) as caught:
        write_reports(run_dir, [("broken", Broken()), ("json", JsonReporter())], tmp_path / "out")
    (line,) = caught.value.lines()
    assert line.startswith("reporter 'broken' failed: ValueError: no ink (at ") and "test_reports.py" in line
    assert tmp_path / "out" / "report.json" in caught.value.written

    # at finalize: a warning, recorded in the summary, and the other reports are still written
    copy = _copy(run_dir, tmp_path / "run")
    chosen = [
        Selected(label="broken", path="reports[0]", name="broken", component=Broken()),
        Selected(label="json", path="reports[1]", name="json", component=JsonReporter()),
    ]
    state = SimpleNamespace(run_dir=copy, selected=lambda kind: chosen if kind == "reporter" else [])
    summary = RunSummary(status="completed")
    done = finalize_reports(state, summary)
    assert done["broken"] == [] and (copy / "reports" / "report.json") in done["json"]
    assert summary.outputs == {"report_json": str(copy / "reports" / "report.json")}
    assert summary.extra[REPORT_ERRORS][0].startswith("reporter 'broken' failed: ValueError: no ink")
    assert _json(copy / "summary.json")["outputs"] == summary.outputs
    assert any("reporter 'broken' failed" in r.getMessage() for r in caplog.records)


def test_reporters_take_the_run_recipe_settings(run_dir: Path) -> None:
    registry = build_plugins().registry
    view = RunView(run_dir)
    chosen = select_reporters(registry, view)
    assert [name for name, _ in chosen] == ["markdown", "html", "json"]
    assert chosen[1][1].config.examples == 3
    (only,) = select_reporters(registry, view, ["html"])
    assert only[1].config.examples == 3  # the recipe's settings for the reporter named


TOY = """
[run]
name = "toy"
steps = 12
validate_every = 3

[distill]
name = "toy"
learning_rate = 0.2
sabotage_at_step = 7

[validation]
metrics = ["exact"]

[guard]
name = "guard"
gate_scores = ["composite"]

[[reports]]
name = "html"

[[reports]]
name = "json"
"""


def test_rollbacks_are_shown_with_their_reason(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cvmkd_core.recipe import load_recipe
    from cvmkd_core.session import Session
    from cvmkd_testing import ToyPlugin

    monkeypatch.chdir(tmp_path)
    plugins = build_plugins()
    plugins.add_plugin(ToyPlugin(), name="toy", source="test")
    Path("recipe.toml").write_text(TOY)
    recipe = load_recipe("recipe.toml", registry=plugins.registry)
    summary, run_dir = run_session(Session(recipe=recipe, plugins=plugins, recipe_path=Path("recipe.toml")))
    assert summary.rollbacks == 1 and summary.outputs["report_html"].endswith("report.html")
    report = _json(run_dir / "reports" / "report.json")
    (rolled,) = [r for r in report["validation"]["rows"] if r["rolled_back"]]
    (event,) = report["validation"]["rollbacks"]
    assert (rolled["step"], rolled["iteration"], event["from_step"], event["to_step"]) == (9, 9, 9, 6)
    assert rolled["rollback"]["to_step"] == 6 and "below the best" in rolled["rollback"]["reason"]
    page = (run_dir / "reports" / "report.html").read_text()
    assert "rolled back → step 6: composite 0.00 is 100.0% below the best" in page and "iteration 9: step 9 → 6" in page
    assert page.count('<img src="data:image/png;base64,') == 3  # no test split: no size/quality plot


def test_the_third_party_reporter_of_the_docs_works(run_dir: Path, tmp_path: Path) -> None:
    docs = Path(__file__).resolve().parents[3] / "docs" / "reports.md"
    (example,) = re.findall(r"```python\n(# csv_report\.py\n.*?)```", docs.read_text(), flags=re.S)
    hook_file = tmp_path / "csv_report.py"
    hook_file.write_text(example)
    out = tmp_path / "out"
    assert main(["report", str(run_dir), "--format", "csv", "--plugin", str(hook_file), "--out", str(out)]) == 0
    rows = (out / "validation.csv").read_text().splitlines()
    assert rows[0] == "step,iteration,rolled_back,bleu,chrf,composite" and len(rows) == 3
