"""``cvmkd compare``: two tiny distillations side by side on the same test split, with p-values
computed again from their translations; runs tested on other sentences are refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cvmkd_core.cli import main
from cvmkd_core.session import open_session, run_session
from cvmkd_testing import TINY_KD_RECIPE, write_tiny_corpus


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("compare")
    write_tiny_corpus(root)
    recipe = TINY_KD_RECIPE.replace('cache_dir = "cache"', f'cache_dir = "{root / "cache"}"').replace(
        'train = "corpus.tsv"', f'train = "{root / "corpus.tsv"}"'
    )
    (root / "recipe.toml").write_text(recipe)
    torch.set_num_threads(1)
    dirs = []
    for name, loss in (("kd", "kd"), ("ce", "ce")):
        summary, run_dir = run_session(
            open_session(
                root / "recipe.toml",
                [f"run.name={name}", f"run.output_dir={root / 'runs'}", f"distill.loss.name={loss}"],
            )
        )
        assert summary.status == "completed"
        dirs.append(run_dir)
    return dirs[0], dirs[1]


def test_runs_are_compared_on_the_same_sentences(two_runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    kd, ce = two_runs
    assert main(["compare", str(ce), str(kd), "--out", str(tmp_path / "out"), "--samples", "200"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# Comparison on the same 8 test sentences")
    assert f"`{ce}`" in out and f"`{kd}`" in out and "p=" in out
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert result["baseline"] == str(ce) and result["sentences"] == 8
    first, second = result["runs"]
    evaluation = json.loads((kd / "evaluation.json").read_text())
    assert second["scores"] == evaluation["student"]["scores"]
    assert first["p_values"] == {} and set(second["p_values"]) == {"bleu", "chrf", "ter"}
    assert all(0 < p <= 1 for p in second["p_values"].values())
    assert (tmp_path / "out" / "compare.md").read_text() == out
    # the test split's text files hold what the run scored
    lines = (kd / "test.src").read_text().splitlines()
    assert len(lines) == 8 == len((kd / "test.student.hyp").read_text().splitlines())


def test_runs_tested_on_other_sentences_are_refused(
    two_runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kd, ce = two_runs
    other = tmp_path / "other"
    shutil.copytree(kd, other)
    refs = (other / "test.ref").read_text().splitlines()
    refs[2] = "something else entirely"
    (other / "test.ref").write_text("\n".join(refs) + "\n")
    before = {p: p.read_bytes() for p in other.rglob("*") if p.is_file()}
    assert main(["compare", str(ce), str(other)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {other} was tested on other sentences than {ce}: references differ at line 3 "
        "(8 vs 8 sentences); compare runs of the same test split\n"
    )
    assert {p: p.read_bytes() for p in other.rglob("*") if p.is_file()} == before
    assert main(["compare", str(ce)]) == 2
    assert capsys.readouterr().err == "error: give at least two run directories to compare\n"


def test_a_report_given_the_control_shows_the_gain_over_it(two_runs, tmp_path: Path, capsys) -> None:
    kd, ce = two_runs
    out = tmp_path / "report"
    assert (
        main(["report", str(kd), "--baseline", str(ce), "--out", str(out), "--format", "markdown", "--format", "json"])
        == 0
    )
    capsys.readouterr()
    text = (out / "report.md").read_text()
    assert "## Gain over training without the teacher" in text and f"`{ce}`" in text
    data = json.loads((out / "report.json").read_text())
    rows = {r["key"]: r for r in data["baseline"]["rows"]}
    kd_scores = json.loads((kd / "evaluation.json").read_text())["student"]["scores"]
    ce_scores = json.loads((ce / "evaluation.json").read_text())["student"]["scores"]
    assert rows["bleu"]["run"] == kd_scores["bleu"] and rows["bleu"]["control"] == ce_scores["bleu"]
    assert rows["bleu"]["gain"] == pytest.approx(kd_scores["bleu"] - ce_scores["bleu"])
    assert 0 < rows["bleu"]["p_value"] <= 1 and rows["composite"]["p_value"] is None  # no paired test for it
    # without --baseline there is no such section
    assert main(["report", str(kd), "--out", str(tmp_path / "plain"), "--format", "markdown"]) == 0
    assert "Gain over training" not in (tmp_path / "plain" / "report.md").read_text()


def test_unfinished_damaged_or_differently_decoded_runs_are_named_in_one_line(
    two_runs, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    kd, ce = two_runs

    def copy(name: str) -> Path:
        target = tmp_path / name
        shutil.copytree(kd, target)
        return target

    interrupted = copy("interrupted")
    summary = json.loads((interrupted / "summary.json").read_text())
    (interrupted / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    assert main(["compare", str(ce), str(interrupted)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {interrupted} ended interrupted: its test files may be an earlier invocation's")

    damaged = copy("damaged")
    (damaged / "evaluation.json").write_text('{"student": ')
    assert main(["compare", str(ce), str(damaged)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {damaged / 'evaluation.json'} is damaged (")

    for samples in ("0", "-3"):
        assert main(["compare", str(ce), str(kd), "--samples", samples]) == 2
        assert capsys.readouterr().err == (
            f"error: --samples must be at least 1 (a p-value needs resamples), got {samples}\n"
        )

    beam = copy("beam")
    evaluation = json.loads((beam / "evaluation.json").read_text())
    (beam / "evaluation.json").write_text(json.dumps({**evaluation, "beam_size": 4}))
    with caplog.at_level("WARNING", logger="cvmkd"):
        assert main(["compare", str(ce), str(beam), "--samples", "50"]) == 0
    assert "the runs decoded the test split differently" in caplog.text and "beam 4" in caplog.text


def test_runs_that_differ_only_in_seed_get_their_seed_to_seed_spread(
    two_runs, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The kd run again with another seed: one arm trained twice. The spread is the sample
    standard deviation of the two runs' scores; the ce run, another arm, is not in it."""
    kd, ce = two_runs
    root = kd.parent.parent
    summary, again = run_session(
        open_session(
            root / "recipe.toml",
            ["run.name=kd-seed-9", f"run.output_dir={root / 'runs'}", "distill.loss.name=kd", "run.seed=9"],
        )
    )
    assert summary.status == "completed"
    assert main(["compare", str(ce), str(kd), str(again), "--out", str(tmp_path / "out"), "--samples", "50"]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "out" / "compare.json").read_text())
    (group,) = result["seed_groups"]
    assert group["runs"] == [str(kd), str(again)] and group["seeds"] == [3, 9]
    a = json.loads((kd / "evaluation.json").read_text())["student"]["scores"]["bleu"]
    b = json.loads((again / "evaluation.json").read_text())["student"]["scores"]["bleu"]
    bleu = group["spread"]["bleu"]
    assert bleu["mean"] == pytest.approx((a + b) / 2) and bleu["std"] == pytest.approx(abs(a - b) / 2**0.5)
    assert (bleu["min"], bleu["max"], bleu["n"]) == (min(a, b), max(a, b), 2)
    assert "## Seed to seed: 2 runs of one recipe, seeds 3, 9" in out
