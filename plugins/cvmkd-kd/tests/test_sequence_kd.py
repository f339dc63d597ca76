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


def test_extra_sources_are_read_from_every_format_plain_or_gzip(tmp_path: Path) -> None:
    import gzip

    from cvmkd_nmt.data.readers import read_sources
    from cvmkd_nmt.errors import CorpusError

    (tmp_path / "plain.txt").write_text("first line\n\n  second line  \n", "utf-8")
    (tmp_path / "plain.txt.gz").write_bytes(gzip.compress(b"first line\nsecond line\n"))
    (tmp_path / "pairs.tsv.gz").write_bytes(gzip.compress(b"first line\tref one\nsecond line\tref two\n"))
    (tmp_path / "pairs.jsonl").write_text('{"src": "first line", "tgt": "x"}\n{"src": "second line"}\n', "utf-8")
    for name in ("plain.txt", "plain.txt.gz", "pairs.tsv.gz", "pairs.jsonl"):
        assert read_sources(tmp_path / name) == ["first line", "second line"], name
    (tmp_path / "cut.txt.gz").write_bytes(gzip.compress(b"first line\n")[:-6])
    (tmp_path / "empty.txt").write_text("\n\n", "utf-8")
    (tmp_path / "bad.jsonl").write_text('{"tgt": "x"}\n', "utf-8")
    with pytest.raises(CorpusError, match="cut.txt.gz: not a complete gzip file"):
        read_sources(tmp_path / "cut.txt.gz")
    with pytest.raises(CorpusError, match="empty.txt: no source sentences"):
        read_sources(tmp_path / "empty.txt")
    with pytest.raises(CorpusError, match='bad.jsonl: line 1: expected a JSON object with a string under "src"'):
        read_sources(tmp_path / "bad.jsonl")
    with pytest.raises(CorpusError, match="no such corpus file"):
        read_sources(tmp_path / "missing.txt")


def test_extra_sources_need_the_teachers_targets() -> None:
    from cvmkd_core.config import ConfigValueError

    with pytest.raises(
        ConfigValueError, match='extra_sources are translated by the teacher: they need targets = "teacher"'
    ):
        SequenceKDConfig(extra_sources=["mono.txt"])


def test_the_teacher_translates_extra_text_once_and_the_student_trains_on_the_union(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    write_tiny_corpus(tmp_path)
    # extra text: new sentences, plus one that is a held-out source, which must be left out
    (tmp_path / "mono.txt").write_text("le chien dort\nla maison est grande\nle chat mange\n", "utf-8")
    recipe = TINY_KD_RECIPE + '\n[distill.sequence]\ntargets = "teacher"\nextra_sources = ["mono.txt"]\n'
    (tmp_path / "recipe.toml").write_text(recipe)
    torch.set_num_threads(1)
    session = open_session(tmp_path / "recipe.toml")
    from cvmkd_core.session import prepare_state
    from cvmkd_kd.data import prepare_data

    data = prepare_data(prepare_state(session, tmp_path / "not-written"))
    held_out = {p[0] for p in data.splits.valid} | {p[0] for p in data.splits.test}
    (tmp_path / "mono.txt").write_text(
        "le chien dort\nla maison est grande\nle chat mange\n" + f"{sorted(held_out)[0]}\n", "utf-8"
    )
    summary, run_dir = run_session(session)
    assert summary.status == "completed"
    info = json.loads((run_dir / "summary.json").read_text())["extra"]["trainer"]["teacher"]["sequence_kd"]
    assert (info["extra_sources"], info["extra_left_out"]) == (3, 1)
    assert info["sentences"] == len(data.splits.train) + 3 and info["translated"] == info["sentences"]
    cached = [line for f in sorted(Path(info["path"]).glob("chunk_*.txt")) for line in f.read_text().splitlines()]
    assert len(cached) == len(data.splits.train) + 3

    # the student's training data is the union: the pairs with the teacher's targets, then the extra text
    from cvmkd_kd.sequence import with_targets

    hypotheses = cached
    extra = ["le chien dort", "la maison est grande", "le chat mange"]
    union = with_targets(data, hypotheses, SequenceKDConfig(targets="teacher"), extra)
    assert len(union.train_src) == len(data.train_src) + sum(1 for h in hypotheses[-3:] if h.strip())
    assert union.train_src[len(data.train_src) :] == [
        ids for ids, h in zip(data.tokenizer.encode(extra), hypotheses[-3:]) if h.strip()
    ]
    kept = len(union.train_src) - len(data.train_src)
    both = with_targets(data, hypotheses, SequenceKDConfig(targets="both"), extra)
    assert len(both.train_src) == 2 * len(data.train_src) + kept
    assert (
        union.targets
        != with_targets(data, hypotheses[: len(data.train_src)], SequenceKDConfig(targets="teacher")).targets
    )

    # other extra text is another cache key: translated anew, the pairs' chunks included
    (tmp_path / "mono.txt").write_text("le chien dort\n", "utf-8")
    _, run_dir2 = run_session(open_session(tmp_path / "recipe.toml", ["run.name=other"]))
    info2 = json.loads((run_dir2 / "summary.json").read_text())["extra"]["trainer"]["teacher"]["sequence_kd"]
    assert info2["path"] != info["path"] and info2["extra_sources"] == 1


def test_a_cached_chunk_is_reused_only_for_the_very_sources_it_translates(tmp_path: Path) -> None:
    first = FakeTeacher()
    out, _ = teacher_targets(first, SOURCES, REFERENCES, SequenceKDConfig(targets="teacher", chunk_size=3), tmp_path)
    # another chunk size: chunk 2 of one sentence was the last sentence's; it is not reused
    other = FakeTeacher()
    again, info = teacher_targets(
        other, SOURCES, REFERENCES, SequenceKDConfig(targets="teacher", chunk_size=1), tmp_path
    )
    assert again == out and info["reused"] == 0 and sum(len(b) for b in other.calls) == len(SOURCES)
    # other sources at the same positions: translated, not paired with the cached translations
    changed = ["changed 0", *SOURCES[1:]]
    fresh = FakeTeacher()
    result, info = teacher_targets(
        fresh, changed, REFERENCES, SequenceKDConfig(targets="teacher", chunk_size=3), tmp_path
    )
    assert result == [s.upper() for s in changed] and fresh.calls == [changed[:3]] and info["reused"] == 4


def test_a_resumed_run_trains_on_the_targets_it_started_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A run resumed on another device (``--resume --set run.device=cuda``) keeps the targets
    the teacher translated at its start while they are cached; without them it says so."""
    import shutil

    from cvmkd_kd.student import TARGETS_RECORD, KDTrainer

    monkeypatch.chdir(tmp_path)
    write_tiny_corpus(tmp_path)
    (tmp_path / "recipe.toml").write_text(TINY_KD_RECIPE + '\n[distill.sequence]\ntargets = "teacher"\n')
    torch.set_num_threads(1)

    def sequence_kd(run_dir: Path) -> dict:
        return json.loads((run_dir / "summary.json").read_text())["extra"]["trainer"]["teacher"]["sequence_kd"]

    # the first invocation translated on another device than this one
    original = KDTrainer._targets_settings
    monkeypatch.setattr(KDTrainer, "_targets_settings", lambda self, *args: "elsewhere|bf16")
    summary, run_dir = run_session(open_session(tmp_path / "recipe.toml"))
    assert summary.status == "completed"
    first = sequence_kd(run_dir)
    assert json.loads((run_dir / TARGETS_RECORD).read_text())["settings"] == "elsewhere|bf16"
    monkeypatch.setattr(KDTrainer, "_targets_settings", original)

    with caplog.at_level("INFO", logger="cvmkd"):
        run_session(open_session(tmp_path / "recipe.toml"), resume=True)
    second = sequence_kd(run_dir)
    assert second["path"] == first["path"] and (second["translated"], second["reused"]) == (0, first["sentences"])
    assert "resumes on the targets it started with (translated on elsewhere|bf16)" in caplog.text

    shutil.rmtree(first["path"])
    caplog.clear()
    with caplog.at_level("INFO", logger="cvmkd"):
        run_session(open_session(tmp_path / "recipe.toml"), resume=True)
    third = sequence_kd(run_dir)
    assert third["path"] != first["path"] and third["translated"] == first["sentences"]
    assert "the targets this run started with (translated on elsewhere|bf16) are no longer cached" in caplog.text
    assert json.loads((run_dir / TARGETS_RECORD).read_text())["settings"] != "elsewhere|bf16"


def test_every_rank_of_a_multi_gpu_run_keys_the_targets_alike(tmp_path: Path) -> None:
    """The key names the device's type, not its index: the ranks after the first reuse the
    translations rank 0 made while they waited, so every rank trains on the same targets."""
    import types

    from cvmkd_kd.student import KDTrainer

    trainer = KDTrainer.__new__(KDTrainer)
    trainer.precision = "bf16"
    state = types.SimpleNamespace(run_dir=tmp_path)
    settings = set()
    for device in ("cuda:0", "cuda:1", "cuda"):
        trainer.device = torch.device(device)
        settings.add(trainer._targets_settings(state, "w", "t", SOURCES, REFERENCES))  # type: ignore[arg-type]
    assert settings == {"cuda|bf16"}
