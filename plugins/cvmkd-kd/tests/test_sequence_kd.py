"""Sequence-level KD: the teacher's translations are cached by what they depend on, resumed
chunk by chunk after an interruption, chosen from the n-best by closeness to the reference, and
a tiny distillation trains on them end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cvmkd_core.session import open_session, run_session
from cvmkd_kd.sequence import SequenceKDConfig, cache_key, closest, teacher_targets
from cvmkd_testing import TINY_KD_RECIPE, write_tiny_corpus

SOURCES = [f"source {i}" for i in range(7)]
REFERENCES = [f"reference {i}" for i in range(7)]


class FakeTeacher:
    """Translates by upper-casing, and counts the sentences it was asked for."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[list[str]] = []
        self.fail_after = fail_after

    def __call__(self, batch: list[str]) -> list[list[str]]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt  # the pass is interrupted here
        self.calls.append(batch)
        return [[s.upper()] for s in batch]


def test_translations_are_cached_and_an_interrupted_pass_resumes(tmp_path: Path) -> None:
    config = SequenceKDConfig(targets="teacher", chunk_size=3)
    interrupted = FakeTeacher(fail_after=1)
    with pytest.raises(KeyboardInterrupt):
        teacher_targets(interrupted, SOURCES, REFERENCES, config, tmp_path)
    assert interrupted.calls == [SOURCES[:3]]  # the first chunk is on disk

    resumed = FakeTeacher()
    out, info = teacher_targets(resumed, SOURCES, REFERENCES, config, tmp_path)
    assert out == [s.upper() for s in SOURCES]
    assert resumed.calls == [SOURCES[3:6], SOURCES[6:]]  # only the missing chunks
    assert (info["reused"], info["translated"]) == (3, 4)

    again = FakeTeacher()
    assert teacher_targets(again, SOURCES, REFERENCES, config, tmp_path)[0] == out
    assert again.calls == []  # a hit: the teacher is not run


def test_the_cache_key_changes_with_every_setting_it_depends_on() -> None:
    base = SequenceKDConfig(beam_size=4, nbest=1)
    key = cache_key("w", "t", SOURCES, REFERENCES, base, "cpu|bf16")
    assert key == cache_key("w", "t", SOURCES, REFERENCES, base, "cpu|bf16")
    others = [
        cache_key("w2", "t", SOURCES, REFERENCES, base, "cpu|bf16"),  # another teacher
        cache_key("w", "t2", SOURCES, REFERENCES, base, "cpu|bf16"),  # another tokenizer
        cache_key("w", "t", SOURCES[:-1], REFERENCES, base, "cpu|bf16"),  # other sources
        cache_key("w", "t", SOURCES, REFERENCES, SequenceKDConfig(beam_size=2), "cpu|bf16"),
        cache_key("w", "t", SOURCES, REFERENCES, SequenceKDConfig(beam_size=4, nbest=2), "cpu|bf16"),
        cache_key("w", "t", SOURCES, REFERENCES, base, "cpu|fp32"),
    ]
    assert key not in others and len(set(others)) == len(others)
    # references only matter when they choose among the n best
    assert key == cache_key("w", "t", SOURCES, ["x"] * 7, base, "cpu|bf16")
    two = SequenceKDConfig(beam_size=4, nbest=2)
    assert cache_key("w", "t", SOURCES, REFERENCES, two, "") != cache_key("w", "t", SOURCES, ["x"] * 7, two, "")


def test_the_hypothesis_closest_to_the_reference_is_kept() -> None:
    reference = "the cat sat on the mat"
    assert closest(["a dog ran", "the cat sat on a mat", "the cat"], reference) == "the cat sat on a mat"
    assert closest(["only one"], reference) == "only one"


def test_nbest_cannot_exceed_the_beam() -> None:
    from cvmkd_core.config import ConfigValueError

    with pytest.raises(ConfigValueError, match="nbest"):
        SequenceKDConfig(beam_size=2, nbest=3)


def test_a_tiny_distillation_trains_on_the_teachers_translations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_tiny_corpus(tmp_path)
    recipe = TINY_KD_RECIPE + '\n[distill.sequence]\ntargets = "teacher"\nbeam_size = 2\nnbest = 2\n'
    (tmp_path / "recipe.toml").write_text(recipe)
    torch.set_num_threads(1)
    summary, run_dir = run_session(open_session(tmp_path / "recipe.toml"))
    assert summary.status == "completed"
    info = json.loads((run_dir / "summary.json").read_text())["extra"]["trainer"]["teacher"]["sequence_kd"]
    assert info["translated"] == info["sentences"] > 0 and info["reused"] == 0
    cached = sorted(Path(info["path"]).glob("chunk_*.txt"))
    lines = [line for f in cached for line in f.read_text().splitlines()]
    assert len(lines) == info["sentences"]
    # a second run with the same teacher and settings translates nothing
    summary2, run_dir2 = run_session(open_session(tmp_path / "recipe.toml", ["run.name=again"]))
    info2 = json.loads((run_dir2 / "summary.json").read_text())["extra"]["trainer"]["teacher"]["sequence_kd"]
    assert (info2["translated"], info2["reused"]) == (0, info["sentences"])


def test_translations_shipped_with_the_teacher_package_are_used_instead_of_translating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from cvmkd_core.errors import ModelError
    from cvmkd_core.session import prepare_state
    from cvmkd_kd.data import prepare_data
    from cvmkd_kd.sequence import SHIPPED_SETTINGS, ship_targets

    monkeypatch.chdir(tmp_path)
    write_tiny_corpus(tmp_path)
    (tmp_path / "recipe.toml").write_text(TINY_KD_RECIPE + '\n[distill.sequence]\ntargets = "teacher"\n')
    torch.set_num_threads(1)
    _, run_dir = run_session(open_session(tmp_path / "recipe.toml"))
    teacher = json.loads((run_dir / "summary.json").read_text())["extra"]["trainer"]["teacher"]
    made = teacher["sequence_kd"]
    lines = [line for f in sorted(Path(made["path"]).glob("chunk_*.txt")) for line in f.read_text().splitlines()]
    # the package ships those translations; the run's own cache of them is gone
    session = open_session(tmp_path / "recipe.toml", ["run.name=shipped"])
    data = prepare_data(prepare_state(session, tmp_path / "not-written"))
    sources, references = [p[0] for p in data.splits.train], [p[1] for p in data.splits.train]
    config = SequenceKDConfig(targets="teacher")
    key = cache_key(teacher["weights_sha256"], data.tokenizer.sha256, sources, references, config, SHIPPED_SETTINGS)
    package = Path(teacher["path"])
    shipped = ship_targets(package, key, [h.upper() for h in lines], {"device": "cpu", "seconds": 1.0})
    shutil.rmtree(made["path"])

    _, run_dir2 = run_session(session)
    info = json.loads((run_dir2 / "summary.json").read_text())["extra"]["trainer"]["teacher"]["sequence_kd"]
    assert info["source"] == "package" and info["translated"] == 0 and info["sentences"] == len(lines)
    assert not Path(made["path"]).exists()  # the teacher translated nothing
    assert info["made_with"] == {"device": "cpu", "seconds": 1.0}

    # a shipped file that no longer matches its record is named, not silently replaced
    shipped.write_bytes(shipped.read_bytes()[:-4])
    with pytest.raises(ModelError, match=f"{shipped.name} is damaged"):
        run_session(open_session(tmp_path / "recipe.toml", ["run.name=damaged"]))


def test_evaluation_translations_shipped_with_the_teacher_package_are_scored_instead_of_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from cvmkd_core.session import prepare_state
    from cvmkd_kd.data import prepare_data
    from cvmkd_kd.sequence import SHIPPED_SETTINGS, SHIPPED_TRANSLATIONS, ship_targets, translations_key

    monkeypatch.chdir(tmp_path)
    write_tiny_corpus(tmp_path)
    (tmp_path / "recipe.toml").write_text(TINY_KD_RECIPE)
    torch.set_num_threads(1)
    _, run_dir = run_session(open_session(tmp_path / "recipe.toml"))
    teacher = json.loads((run_dir / "summary.json").read_text())["extra"]["trainer"]["teacher"]
    session = open_session(tmp_path / "recipe.toml", ["run.name=shipped"])
    data = prepare_data(prepare_state(session, tmp_path / "not-written"))
    package = Path(teacher["path"])
    beam = session.recipe.section("validation").beam_size
    shipped: dict[str, list[str]] = {}
    for split in ("valid", "test"):
        sources = [p[0] for p in getattr(data.splits, split)]
        key = translations_key(teacher["weights_sha256"], data.tokenizer.sha256, beam, SHIPPED_SETTINGS, sources)
        shipped[split] = [f"SHIPPED {i}" for i in range(len(sources))]
        ship_targets(package, key, shipped[split], {"split": split}, folder_name=SHIPPED_TRANSLATIONS)
    shutil.rmtree(tmp_path / "cache" / "teacher-translations")  # what the first run decoded

    _, run_dir2 = run_session(session)
    assert (run_dir2 / "validation" / "teacher.hyp.txt").read_text().splitlines() == shipped["valid"]
    assert (run_dir2 / "test.teacher.hyp").read_text().splitlines() == shipped["test"]
    assert not (tmp_path / "cache" / "teacher-translations").exists()  # the teacher decoded nothing
    # another beam is another key: decoded, not taken from the package
    _, run_dir3 = run_session(
        open_session(tmp_path / "recipe.toml", ["run.name=beam2", f"validation.beam_size={beam + 1}"])
    )
    assert (run_dir3 / "validation" / "teacher.hyp.txt").read_text().splitlines() != shipped["valid"]
