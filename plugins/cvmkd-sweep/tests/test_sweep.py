"""``cvmkd sweep``: a grid of tiny distillations run as normal run folders, resumed after an
interruption, then the Pareto front and the chosen model; and the pieces on hand-made points."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cvmkd_core.cli import main
from cvmkd_sweep import arms, choose, pareto, parse_grid, split_values
from cvmkd_testing import TINY_KD_RECIPE, write_tiny_corpus


def test_grid_values_split_outside_brackets_and_quotes() -> None:
    assert split_values('16,24,[{name="a", x=1}],"p,q"') == ["16", "24", '[{name="a", x=1}]', '"p,q"']
    planned = arms(parse_grid(["student.model.d_model=16,24", 'quantize=[{name="dynamic-int8"}],[]']))
    assert [a["name"] for a in planned] == [
        "d_model-16__quantize-name-dynamic-int8",
        "d_model-16__quantize-none",
        "d_model-24__quantize-name-dynamic-int8",
        "d_model-24__quantize-none",
    ]
    assert planned[0]["overrides"] == ["student.model.d_model=16", 'quantize=[{name="dynamic-int8"}]']


def test_the_front_and_the_choice() -> None:
    rows = [
        {"arm": "a", "model": "student", "bleu": 20.0, "size_mb": 10.0, "latency_ms": 5.0, "gate": True},
        {"arm": "a", "model": "int8", "bleu": 19.5, "size_mb": 3.0, "latency_ms": 3.0, "gate": True},
        {"arm": "b", "model": "student", "bleu": 19.0, "size_mb": 12.0, "latency_ms": 6.0, "gate": True},
        {"arm": "b", "model": "int8", "bleu": 15.0, "size_mb": 2.0, "latency_ms": 2.0, "gate": False},
    ]
    pareto(rows)
    assert [r["pareto"] for r in rows] == [True, True, False, True]  # b's student is beaten by a's on all
    assert choose(rows) is rows[1]  # the smallest that passes its gate (b's int8 fails it)


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    write_tiny_corpus(tmp_path)
    (tmp_path / "recipe.toml").write_text(TINY_KD_RECIPE)
    return tmp_path


def test_a_sweep_runs_its_arms_resumes_and_names_the_chosen_model(
    tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "sweep",
        "recipe.toml",
        "--grid",
        "student.model.d_model=16,24",
        "--set",
        'quantize=[{name="dynamic-int8", max_bleu_loss=100.0, max_composite_loss=1.0}]',
        "--out",
        "runs/sweep",
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads((tiny / "runs" / "sweep" / "sweep.json").read_text())
    assert [a["state"] for a in result["arms"]] == ["run", "run"]
    for arm in ("d_model-16", "d_model-24"):
        summary = json.loads((tiny / "runs" / "sweep" / arm / "summary.json").read_text())
        assert summary["status"] == "completed"
    # every model of every arm is a point: the students and their int8 variants
    assert sorted((r["arm"], r["model"]) for r in result["rows"]) == [
        ("d_model-16", "dynamic-int8"),
        ("d_model-16", "student"),
        ("d_model-24", "dynamic-int8"),
        ("d_model-24", "student"),
    ]
    assert all(r["size_mb"] > 0 and r["latency_ms"] > 0 for r in result["rows"])
    assert any(r["pareto"] for r in result["rows"])
    chosen = result["chosen"]
    assert chosen is not None and chosen["size_mb"] == min(r["size_mb"] for r in result["rows"])
    for name in ("sweep.md", "sweep.html", "sweep.png"):
        assert (tiny / "runs" / "sweep" / name).is_file()
    assert out == (tiny / "runs" / "sweep" / "sweep.md").read_text() and "**Chosen**" in out

    # an arm interrupted before it finished: the same command resumes it and keeps the other
    (tiny / "runs" / "sweep" / "d_model-24" / "summary.json").unlink()
    assert main(argv) == 0
    again = json.loads((tiny / "runs" / "sweep" / "sweep.json").read_text())
    assert [a["state"] for a in again["arms"]] == ["kept", "resumed"]
    assert len(again["rows"]) == 4

    # the same folder swept with other settings: its finished arms are another experiment's,
    # refused in one line before anything runs, and nothing of the sweep is touched
    capsys.readouterr()
    before = {p: p.read_bytes() for p in (tiny / "runs" / "sweep").rglob("*") if p.is_file()}
    other = [*argv[:-2], "--set", "run.seed=7", *argv[-2:]]
    assert main(other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: arm d_model-16 in ") and "run.seed 3 -> 7" in err[0]
    assert {p: p.read_bytes() for p in (tiny / "runs" / "sweep").rglob("*") if p.is_file()} == before


def test_workers_run_arms_side_by_side_each_on_its_share_of_the_threads(
    tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cvmkd_sweep

    monkeypatch.setattr(cvmkd_sweep.os, "cpu_count", lambda: 4)  # 2 workers: 2 threads each
    argv = ["sweep", "recipe.toml", "--grid", "student.model.d_model=16,24", "--out", "runs/par", "--workers", "2"]
    assert main(argv) == 0
    result = json.loads((tiny / "runs" / "par" / "sweep.json").read_text())
    assert [a["state"] for a in result["arms"]] == ["run", "run"]
    spans = []
    for arm in ("d_model-16", "d_model-24"):
        folder = tiny / "runs" / "par" / arm
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["status"] == "completed"
        assert summary["extra"]["trainer"]["hardware"]["threads"] == 2
        events = [json.loads(line) for line in (folder / "train.jsonl").read_text().splitlines()]
        times = [e["time"] for e in events if e.get("event") in ("run_start", "run_end")]
        spans.append((min(times), max(times)))
    (a_start, a_end), (b_start, b_end) = spans
    assert a_start < b_end and b_start < a_end  # the two arms trained at the same time
    assert result["chosen"] is not None
    assert main([*argv[:-1], "0"]) == 2  # --workers 0: one line, status 2
