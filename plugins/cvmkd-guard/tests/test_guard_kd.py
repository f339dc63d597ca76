"""The guard on real distillation runs (tiny corpus and models made here, the installed plugins
found through their entry points): damaged student weights are caught at the next validation and
the best checkpoint's weights come back; NaN weights are rolled back before the next step ends;
the retention gate judges the test-split evaluation and keeps every output."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.session import open_session, run_session
from cvmkd_nmt.model.package import load_package
from cvmkd_testing import write_tiny_corpus

# A teacher that learns the word mapping in 60 steps, and a student that climbs steadily from
# composite ~3 at step 20 to ~14 at step 40 and ~20 at step 60 (seed 3).
RECIPE = """
[run]
name = "guarded"
steps = 60
validate_every = 20
seed = 3
cache_dir = "cache"

[corpus]
name = "files"
train = "corpus.tsv"
valid_size = 8
test_size = 8

[tokenizer]
vocab_size = 40

[teacher]
steps = 60
validate_every = 60
batch_size = 16
learning_rate = 1e-2
warmup_steps = 2

[teacher.model]
name = "cvm"
preset = "tiny"

[student.model]
name = "cvm"
preset = "tiny"
d_model = 32
n_heads = 2

[distill]
name = "kd"
batch_size = 32
learning_rate = 5e-3
warmup_steps = 2
topk = 4

[distill.loss]
name = "kd"
temperature = 2.0

[validation]
metrics = ["bleu", "chrf", "ter"]
significance_samples = 0

[guard]
name = "guard"
"""

#: the natural ups and downs of so tiny a student are not what these tests are about
ONLY_LARGE_DROPS = ["guard.threshold=0.5"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the module, so the teacher is trained once and then read from the cache."""
    path = tmp_path_factory.mktemp("kd")
    write_tiny_corpus(path)
    (path / "recipe.toml").write_text(RECIPE)
    return path


@pytest.fixture
def kd_dir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(workdir)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run faster on one thread
    yield workdir
    torch.set_num_threads(threads)


class Damage:
    """Damages the student's weights after ``step``, once (``how``: "noise" adds N(0, 5²) noise
    to every parameter, "nan" fills the first one with NaN), and at every rollback records the
    weights restored and the checkpoint they came from."""

    def __init__(self, step: int, how: str) -> None:
        self.step, self.how = step, how
        self.done = False
        self.rollbacks: list[dict[str, Any]] = []
        self.trainer: Any = None

    @staticmethod
    def _student(state: Any) -> Any:
        from cvmkd_kd.student import KDTrainer

        return state.trainer if isinstance(state.trainer, KDTrainer) else None  # not the teacher stage

    @hookimpl
    def cvmkd_step_end(self, state: Any) -> None:
        trainer = self._student(state)
        if trainer is None or self.done or state.step != self.step:
            return
        self.done, self.trainer = True, trainer
        with torch.no_grad():
            if self.how == "noise":
                generator = torch.Generator().manual_seed(0)
                for parameter in trainer.model.parameters():
                    parameter.add_(5.0 * torch.randn(parameter.shape, generator=generator).to(parameter))
            else:
                next(trainer.model.parameters()).fill_(float("nan"))

    @hookimpl
    def cvmkd_event(self, state: Any, name: str, data: dict[str, Any]) -> None:
        trainer = self._student(state)
        if trainer is None or name != "rollback":
            return
        directory = state.run_dir / "checkpoints"
        manifest = json.loads((directory / "manifest.json").read_text())
        self.rollbacks.append(
            {
                **data,
                "best": manifest["best"],
                "restored": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                "saved": torch.load(directory / data["checkpoint"], weights_only=True)["trainer"]["model"],
            }
        )


def run(name: str, *overrides: str, damage: Damage | None = None) -> tuple[dict[str, Any], Path]:
    session = open_session("recipe.toml", [f"run.name={name}", *overrides])
    if damage is not None:
        session.plugins.add_plugin(damage, name="damage", source="test")
    summary, run_dir = run_session(session)
    return json.loads((run_dir / "summary.json").read_text()), run_dir


def history(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "validation" / "history.jsonl").read_text().splitlines()]


def test_scrambled_weights_are_caught_at_the_next_validation_and_the_best_is_restored(kd_dir: Path) -> None:
    damage = Damage(41, "noise")
    summary, run_dir = run("scrambled", *ONLY_LARGE_DROPS, damage=damage)
    assert summary["status"] == "completed"
    assert summary["rollbacks"] == 1
    assert summary["final_step"] == 60 and summary["iterations_executed"] == 80

    records = history(run_dir)
    assert [(r["step"], r["rolled_back"]) for r in records] == [(20, False), (40, False), (60, True), (60, False)]
    best, damaged = records[1]["scores"]["composite"], records[2]["scores"]["composite"]
    assert best > records[0]["scores"]["composite"] and damaged < 0.5 * best
    (rollback,) = damage.rollbacks
    assert rollback["from_step"] == 60 and rollback["to_step"] == 40
    assert rollback["reason"].startswith(f"composite {damaged:.2f} is ")
    assert rollback["reason"].endswith(f"% below the best ({best:.2f} at step 40; threshold 50%)")
    assert rollback["checkpoint"] == rollback["best"] == "step_00000040_it00000040.pt"
    # the weights after the rollback are the best checkpoint's, as saved on disk
    assert rollback["restored"].keys() == rollback["saved"].keys()
    for key, saved in rollback["saved"].items():
        assert torch.equal(rollback["restored"][key], saved), key
    # and training went on from them: the student translates again
    assert records[3]["scores"]["composite"] > damaged
    assert (run_dir / "validation" / "step_00000060_it00000060_rolled_back.json").is_file()


def test_nan_weights_are_rolled_back_to_the_last_checkpoint_before_the_next_step_ends(kd_dir: Path) -> None:
    damage = Damage(22, "nan")
    summary, run_dir = run("nan-loss", *ONLY_LARGE_DROPS, damage=damage)
    assert summary["status"] == "completed"
    assert summary["rollbacks"] == 1
    assert summary["final_step"] == 60 and summary["iterations_executed"] == 63
    (rollback,) = damage.rollbacks
    assert rollback["from_step"] == 23 and rollback["to_step"] == 20
    assert rollback["reason"].startswith("non-finite training loss at step 23 (loss=nan")
    assert rollback["checkpoint"] == "step_00000020_it00000020.pt"
    for key, saved in rollback["saved"].items():
        assert torch.equal(rollback["restored"][key], saved), key
    # no validation saw the NaN weights, and the run ends with finite ones
    records = history(run_dir)
    assert [(r["step"], r["rolled_back"]) for r in records] == [(20, False), (40, False), (60, False)]
    assert all(torch.isfinite(p).all() for p in damage.trainer.model.parameters())
    model, _, _ = load_package(run_dir / "model")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(("threshold", "passed"), [(0.0001, True), (100.0, False)])
def test_the_retention_gate_judges_the_test_evaluation_and_keeps_every_output(
    kd_dir: Path, threshold: float, passed: bool
) -> None:
    summary, run_dir = run(f"gate-{passed}", f"guard.retention_threshold={threshold}", "run.steps=20")
    assert summary["status"] == "completed"
    gate = summary["gate"]
    retention = summary["evaluation"]["retention"]
    assert gate["threshold"] == threshold and gate["scores"] == ["composite", "bleu"]
    assert gate["passed"] is passed
    assert [(c["model"], c["score"]) for c in gate["checks"]] == [("student", "composite"), ("student", "bleu")]
    for check in gate["checks"]:
        assert check["retention"] == retention[check["score"]]
        assert check["passed"] is (retention[check["score"]] >= threshold)
    if passed:
        assert gate["verdict"].startswith("retention gate passed: the student keeps at least 0.01% of the teacher")
    else:
        assert gate["verdict"].startswith("retention gate failed: student composite ")
        assert gate["verdict"].endswith("of the teacher, below the threshold 10000%")
    # a failed gate takes nothing away
    for output in ("model", "evaluation.json", "validation", "summary.json", "train.jsonl"):
        assert (run_dir / output).exists(), output
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert summary["outputs"]["evaluation"] == str(run_dir / "evaluation.json")


def test_an_unknown_score_fails_before_the_teacher_is_trained(kd_dir: Path) -> None:
    from cvmkd_core.errors import RecipeError

    with pytest.raises(
        RecipeError,
        match=r"guard.score: no selected metric returns 'blue'; available scores: bleu, chrf, ter, composite$",
    ):
        run("typo", "guard.score=blue", "run.cache_dir=empty-cache")
    assert not (kd_dir / "runs" / "typo").exists()  # checked before anything is written
