"""A joint SentencePiece subword vocabulary for both sides of a corpus: training (cached by content hash),
loading, saving with a model package, batched encoding and decoding.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import sentencepiece as spm

from cvmkd_core.errors import ModelError
from cvmkd_nmt.cache import record_digest, verified_cache_file
from cvmkd_nmt.errors import CorpusError

from .readers import Pair

__all__ = ["MODEL_FILENAME", "Tokenizer", "train_tokenizer"]

log = logging.getLogger("cvmkd")

PathLike = str | os.PathLike[str]

#: The file name a saved tokenizer gets inside a directory (model packages, run directories).
MODEL_FILENAME = "tokenizer.model"

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")


class Tokenizer:
    """A loaded SentencePiece model. ``encode`` does not add bos/eos: batching adds them where needed."""

    def __init__(self, model_bytes: bytes, path: Path | None = None, from_cache: bool = False) -> None:
        self._model_bytes = model_bytes
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError) as e:
            where = path if path is not None else "tokenizer"
            raise ModelError(f"{where}: not a valid SentencePiece model ({e})") from None
        #: Where the model was loaded from (``None`` if built from bytes).
        self.path = path
        #: True when :func:`train_tokenizer` found the model in its cache instead of training.
        self.from_cache = from_cache
        self.sha256 = hashlib.sha256(model_bytes).hexdigest()
        # The control ids a model without them reports as -1 would make batching silently wrong.
        self._special = {
            "pad": self._sp.pad_id(),
            "bos": self._sp.bos_id(),
            "eos": self._sp.eos_id(),
        }
        self._strip_ids = frozenset(i for i in self._special.values() if i >= 0)

    @classmethod
    def load(cls, path: PathLike) -> Tokenizer:
        """Load a ``.model`` file, or the :data:`MODEL_FILENAME` inside a directory."""
        p = Path(path)
        if p.is_dir():
            p = p / MODEL_FILENAME
        try:
            data = p.read_bytes()
        except FileNotFoundError:
            missing = "" if p.parent.is_dir() else f" (no folder {p.parent})"
            raise ModelError(f"no such tokenizer model: {p}{missing}") from None
        return cls(data, path=p)

    def save(self, directory: PathLike) -> Path:
        """Write the model file as ``directory/tokenizer.model`` (byte-identical, so ``sha256`` is kept)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        target = d / MODEL_FILENAME
        _atomic_write(target, self._model_bytes)
        return target

    @property
    def model_bytes(self) -> bytes:
        """The serialized model, exactly as in the file."""
        return self._model_bytes

    @property
    def vocab_size(self) -> int:
        return int(self._sp.get_piece_size())

    @property
    def pad_id(self) -> int:
        return int(self._sp.pad_id())

    @property
    def bos_id(self) -> int:
        return int(self._sp.bos_id())

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def unk_id(self) -> int:
        return int(self._sp.unk_id())

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        """Subword ids for each text, without bos/eos."""
        if isinstance(texts, str):
            raise TypeError("Tokenizer.encode takes a list of texts, not one string")
        return self._sp.encode(list(texts), out_type=int, num_threads=_threads())

    def encode_pairs(self, pairs: Sequence[Pair]) -> tuple[list[list[int]], list[list[int]]]:
        """Encode both sides of the pairs: ``(source_ids, target_ids)``."""
        return self.encode([p.src for p in pairs]), self.encode([p.tgt for p in pairs])

    def decode(self, ids_batch: Iterable[Sequence[int]]) -> list[str]:
        """Detokenised text for each id sequence; pad, bos and eos ids are dropped wherever they occur.

        Accepts lists of ints or rows of an integer tensor.
        """
        cleaned = [[i for i in (int(x) for x in ids) if i not in self._strip_ids] for ids in ids_batch]
        return self._sp.decode(cleaned, num_threads=_threads())

    def id_to_piece(self, i: int) -> str:
        return str(self._sp.id_to_piece(i))

    def piece_to_id(self, piece: str) -> int:
        """The id of a piece (the unknown id for a piece not in the vocabulary)."""
        return int(self._sp.piece_to_id(piece))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, sha256={self.sha256[:12]}..., path={self.path})"

    # SentencePieceProcessor cannot be pickled; the model bytes can (DataLoader workers, multiprocessing).
    def __getstate__(self) -> dict[str, Any]:
        return {
            "model_bytes": self._model_bytes,
            "path": self.path,
            "from_cache": self.from_cache,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tokenizer's own __init__: the state holds exactly its arguments (see __getstate__).
        Tokenizer.__init__(self, state["model_bytes"], path=state["path"], from_cache=state["from_cache"])


def _threads() -> int:
    return min(2, os.cpu_count() or 1)


def _atomic_write(target: Path, data: bytes) -> None:
    # Write-then-rename, so a crash or a concurrent run never leaves a half-written model behind.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _sentences(texts_or_pairs: Iterable[str] | Iterable[tuple[str, str]]) -> list[str]:
    out: list[str] = []
    for item in texts_or_pairs:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, tuple) and len(item) == 2:
            out.extend(item)  # both sides of a pair: the vocabulary is joint
        else:
            raise TypeError(f"train_tokenizer expects strings or (src, tgt) pairs, got {type(item).__name__}")
    # SentencePiece treats a newline inside a sentence as an ordinary character; replace it so the
    # hash and the training see the same text as a file-based run would.
    return [s.replace("\n", " ") for s in out if s.strip()]


def train_tokenizer(
    texts_or_pairs: Iterable[str] | Iterable[tuple[str, str]],  # Pairs, or any (src, tgt) tuples
    vocab_size: int,
    cache_dir: PathLike,
    model_type: str = "unigram",
    character_coverage: float = 1.0,
    num_threads: int = 2,
    seed: int = 1234,
    max_sentence_length: int = 8192,
    hard_vocab_limit: bool = True,
    extra_options: dict[str, Any] | None = None,
    max_sentences: int = 2_000_000,
) -> Tokenizer:
    """Train one joint vocabulary on all texts (for pairs: both sides), or load it from ``cache_dir``.

    The model is cached as ``cache_dir/<sha256>.model``, the hash covering the training text, every
    setting and the sentencepiece version; a second call with the same input loads it (logged on
    ``cvmkd``, and ``Tokenizer.from_cache`` is True). Ids: pad=0, bos=1, eos=2, unk=3.

    ``vocab_size`` larger than the corpus supports is an error naming the largest possible size;
    pass ``hard_vocab_limit=False`` to accept a smaller vocabulary instead. Training uses every
    sentence up to ``max_sentences`` (0: no limit), and above it a sample of that many drawn with
    ``seed`` (in corpus order), as the large pipelines do: a vocabulary needs a few million
    sentences, not all of them. The same input gives byte-identical models.
    ``extra_options`` are passed to ``SentencePieceTrainer.train`` as they are.
    """
    if vocab_size < 5:
        raise ValueError(f"vocab_size must be at least 5 (4 special ids + 1), got {vocab_size}")
    sentences = _sentences(texts_or_pairs)
    if not sentences:
        raise CorpusError("cannot train a tokenizer: no non-empty training sentences")
    total = len(sentences)
    if max_sentences and total > max_sentences:
        chosen = sorted(random.Random(seed).sample(range(total), max_sentences))
        sentences = [sentences[i] for i in chosen]
        log.info("tokenizer: a seeded sample of %d of the %d training sentences", max_sentences, total)
    settings: dict[str, Any] = {
        "vocab_size": vocab_size,
        "model_type": model_type,
        "character_coverage": character_coverage,
        "max_sentence_length": max_sentence_length,
        "hard_vocab_limit": hard_vocab_limit,
        "pad_id": PAD_ID,
        "bos_id": BOS_ID,
        "eos_id": EOS_ID,
        "unk_id": UNK_ID,
        "pad_piece": "<pad>",
        "bos_piece": "<s>",
        "eos_piece": "</s>",
        "unk_piece": "<unk>",
        # Sampling a subset of sentences would make the model depend on the sampler; use them all.
        "input_sentence_size": 0,
        "shuffle_input_sentence": False,
        **(extra_options or {}),
    }
    digest = _content_hash(sentences, settings, seed)
    cache = Path(cache_dir)
    cached = cache / f"{digest}.model"
    if verified_cache_file(cached, "cached tokenizer"):
        log.info("tokenizer: using cached model %s (same training text and settings)", cached)
        tok = Tokenizer.load(cached)
        tok.from_cache = True
        return tok

    cache.mkdir(parents=True, exist_ok=True)
    log.info(
        "tokenizer: training %s vocabulary of %d on %d sentences",
        model_type,
        vocab_size,
        len(sentences),
    )
    start = time.perf_counter()
    spm.set_random_generator_seed(seed)
    writer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(sentences),
            model_writer=writer,
            num_threads=max(1, min(num_threads, 2)),
            minloglevel=2,  # sentencepiece's per-step INFO lines go to stderr and would drown the run log
            **settings,
        )
    except RuntimeError as e:
        m = _TOO_HIGH.search(str(e))
        if m:
            raise CorpusError(
                f"tokenizer: vocab_size {m.group(1)} is too large for this training text "
                f"(at most {m.group(2)} possible); lower vocab_size"
            ) from None
        raise CorpusError(f"tokenizer: SentencePiece training failed: {e}") from None
    data = writer.getvalue()
    _atomic_write(cached, data)
    record_digest(cached)
    log.info(
        "tokenizer: trained in %.1f s, cached as %s",
        time.perf_counter() - start,
        cached,
    )
    return Tokenizer(data, path=cached, from_cache=False)


def _content_hash(sentences: list[str], settings: dict[str, Any], seed: int) -> str:
    h = hashlib.sha256()
    header = {"settings": settings, "seed": seed, "sentencepiece": spm.__version__}
    h.update(json.dumps(header, sort_keys=True, default=str).encode("utf-8"))
    h.update(b"\0")
    for s in sentences:
        h.update(s.encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()
