"""The data a translation run needs: corpus splits, the joint tokenizer, encoded training pairs.

Prepared once per process and corpus: the teacher stage and the student run share it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path
from typing import Any

import attrs

from cvmkd_core.errors import CvmkdError
from cvmkd_core.state import RunState
from cvmkd_nmt.contracts import Corpus, CorpusSplits
from cvmkd_nmt.data.tokens import TokenRows

log = logging.getLogger("cvmkd")


@attrs.define
class RunData:
    splits: CorpusSplits
    tokenizer: Any
    #: the encoded training pairs, held flat (``TokenRows``: a tenth of the memory of lists)
    train_src: TokenRows
    train_tgt: TokenRows
    seconds: float = 0.0
    #: what the training targets are: "reference", or the teacher's translations (sequence-level KD)
    targets: str = "reference"

    @property
    def fingerprint(self) -> str:
        return self.splits.fingerprint


_prepared: dict[tuple[str, str], RunData] = {}
#: bump when the cached token ids of a corpus would no longer be what encoding it gives
TOKEN_IDS_VERSION = "1"


def corpus_of(state: RunState) -> Corpus:
    corpus = state.components.get("corpus")
    if corpus is None:
        raise CvmkdError(
            'the recipe names no corpus: add [corpus] with name = "bible" (the embedded default) or name = "files"'
        )
    return corpus


def encoded_pairs(splits: CorpusSplits, tokenizer: Any, cache: Path) -> tuple[TokenRows, TokenRows]:
    """The training pairs' ids, encoded once per corpus and tokenizer and cached as ``.npy`` files
    under ``cache``, then memory-mapped: a run holds the pages its batches touch, and a rerun
    encodes nothing."""
    encode_targets = getattr(tokenizer, "encode_targets", None)
    key = hashlib.sha256(
        f"{TOKEN_IDS_VERSION}|{splits.fingerprint}|{tokenizer.sha256}|{encode_targets is not None}".encode()
    ).hexdigest()[:24]
    sides = []
    for side, column, encode in (("src", 0, tokenizer.encode), ("tgt", 1, encode_targets or tokenizer.encode)):
        prefix = cache / key / side
        rows = TokenRows.load(prefix, "cached token ids")
        if rows is None:
            TokenRows.encode(encode, [p[column] for p in splits.train]).save(prefix)
            rows = TokenRows.load(prefix, "cached token ids")
            assert rows is not None
        sides.append(rows)
    return sides[0], sides[1]


def prepare_data(state: RunState, tokenizer_path: str | Path | None = None, tokenizer: Any = None) -> RunData:
    """Load the corpus, train (or reuse) the tokenizer, encode the training pairs.

    ``tokenizer_path``: use this SentencePiece model (a loaded teacher's) instead of training one,
    so teacher and student share a vocabulary; ``tokenizer``: use this tokenizer object (a
    Hugging Face teacher's). Targets are encoded with ``encode_targets`` where the tokenizer has
    one (a tokenizer with a source and a target side).
    """
    from cvmkd_nmt.data.tokenizer import Tokenizer, train_tokenizer

    started = time.perf_counter()
    recipe = state.recipe
    splits = corpus_of(state).load()
    if tokenizer is not None:
        pass
    elif tokenizer_path is not None:
        tokenizer = Tokenizer.load(tokenizer_path)
    else:
        tokenizer = train_tokenizer(
            [(p[0], p[1]) for p in splits.train],
            vocab_size=recipe.section("tokenizer").vocab_size,
            cache_dir=recipe.run.cache_path() / "tokenizers",
            model_type=recipe.section("tokenizer").model_type,
            max_sentences=recipe.section("tokenizer").max_sentences,
        )
    key = (splits.fingerprint, tokenizer.sha256)
    if key in _prepared:
        return _prepared[key]
    train_src, train_tgt = encoded_pairs(splits, tokenizer, recipe.run.cache_path() / "token-ids")
    data = RunData(splits, tokenizer, train_src, train_tgt, seconds=time.perf_counter() - started)
    log.info(
        "corpus %s: %d train, %d valid, %d test pairs; tokenizer %d pieces%s (%.1fs)",
        splits.name,
        len(splits.train),
        len(splits.valid),
        len(splits.test),
        tokenizer.vocab_size,
        " (cached)" if getattr(tokenizer, "from_cache", False) else "",
        data.seconds,
    )
    _prepared.clear()  # one corpus at a time: encoded corpora can be large
    _prepared[key] = data
    return data
