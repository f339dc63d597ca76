"""Sequence-level knowledge distillation (Kim & Rush, 2016): the teacher translates the training
sources once, and the student trains on those translations instead of the references, or on both.
With an n-best list the hypothesis closest to the reference (sentence chrF) is kept: Kim & Rush's
sequence-level interpolation.

The translations are cached on disk under a key of everything they depend on (the teacher's
weights, the tokenizer, the sources, the decoding settings), written in chunks, so an interrupted
pass resumes at the first missing chunk and a later run with the same teacher reuses them.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from cvmkd_core.config import gt, one_of
from cvmkd_core.errors import ModelError
from cvmkd_core.files import atomic_write_json, atomic_write_text, sha256_file
from cvmkd_nmt.cache import record_digest, verified_cache_file
from cvmkd_nmt.data.tokens import TokenRows

log = logging.getLogger("cvmkd")

#: bump when cached translations can no longer be trusted to match (decoding changed meaning)
CACHE_VERSION = "1"
#: the folder of a teacher package holding its translations of a training set, shipped with it
SHIPPED = "sequence-kd"
#: the folder of a teacher package holding its translations of evaluation sentences (the
#: validation and test splits its runs score it on), shipped with it
SHIPPED_TRANSLATIONS = "translations"
#: the decoding settings a shipped set is keyed by: made once, on whatever machine, and used as is
SHIPPED_SETTINGS = "shipped"


@attrs.frozen
class SequenceKDConfig:
    """``[distill.sequence]``: what the student trains on."""

    targets: str = attrs.field(default="reference", validator=one_of("reference", "teacher", "both"))
    """reference: the corpus (word-level KD only); teacher: the teacher's translations of the
    training sources (sequence-level KD); both: each source twice, with either target"""
    beam_size: int = attrs.field(default=1, validator=gt(0))
    """the teacher's beam; 1: greedy"""
    nbest: int = attrs.field(default=1, validator=gt(0))
    """> 1: keep, of the teacher's n best, the one closest to the reference (sentence chrF)"""
    batch_size: int = attrs.field(default=64, validator=gt(0))
    chunk_size: int = attrs.field(default=2000, validator=gt(0))
    """sentences per cache file: how much an interrupted pass can lose"""
    extra_sources: list[str] = attrs.field(factory=list)
    """files of source-language text the teacher translates too, beside the training sources:
    one sentence per line, or a ``.tsv`` (first column) or ``.jsonl`` (``src``) file, each
    possibly ``.gz``; with the corpus's own extra sources (``[corpus] extra_sources``), the
    student trains on the union (``targets`` "teacher" or "both")"""

    def __attrs_post_init__(self) -> None:
        from cvmkd_core.config import ConfigValueError

        if self.nbest > self.beam_size:
            raise ConfigValueError(f"nbest ({self.nbest}) must not exceed beam_size ({self.beam_size})")
        if self.extra_sources and self.targets == "reference":
            raise ConfigValueError(
                'extra_sources are translated by the teacher: they need targets = "teacher" or "both"'
            )


def cache_key(
    weights: str, tokenizer: str, sources: list[str], references: list[str], config: SequenceKDConfig, settings: str
) -> str:
    """What the teacher's translations depend on; references count only when they choose among the n best."""
    digest = hashlib.sha256()
    for part in (CACHE_VERSION, weights, tokenizer, settings, str(config.beam_size), str(config.nbest)):
        digest.update(part.encode() + b"\0")
    for text in sources:
        digest.update(text.encode() + b"\n")
    if config.nbest > 1:
        for text in references:
            digest.update(text.encode() + b"\n")
    return digest.hexdigest()


def closest(hypotheses: list[str], reference: str) -> str:
    """The hypothesis with the best sentence chrF against ``reference`` (the first of equals)."""
    from sacrebleu.metrics import CHRF

    if len(hypotheses) == 1:
        return hypotheses[0]
    chrf = CHRF()
    scores = [chrf.sentence_score(h, [reference]).score for h in hypotheses]
    return hypotheses[max(range(len(scores)), key=lambda i: (scores[i], -i))]


def chunk_files(directory: Path, sources: list[str], chunk_size: int) -> list[tuple[tuple[int, int], Path]]:
    """The cache files of the teacher's translations of ``sources``: ``((start, end), path)`` per
    chunk. A file is named by the very sources it translates: another chunk size, or other
    sources at a position, is another file, never a wrong pairing."""
    out = []
    for index, start in enumerate(range(0, len(sources), chunk_size)):
        end = min(start + chunk_size, len(sources))
        digest = hashlib.sha256("\n".join(sources[start:end]).encode()).hexdigest()[:16]
        out.append(((start, end), directory / f"chunk_{index:05d}_{digest}.txt"))
    return out


def distillation_sources(splits: Any, config: SequenceKDConfig) -> tuple[list[str], list[str], list[str], int]:
    """What the teacher translates for a run: ``(sources, references, extra, left_out)``, the
    training sources then the extra text (references "" for it), the extra text alone, and how
    many extra sentences were left out as validation or test sources."""
    held_out = {p[0] for p in splits.valid} | {p[0] for p in splits.test}
    extra, left_out = extra_sources(config, splits.extra_sources, held_out)
    sources = [p[0] for p in splits.train] + extra
    references = [p[1] for p in splits.train] + [""] * len(extra)
    return sources, references, extra, left_out


def teacher_targets(
    translate: Callable[[list[str]], list[list[str]]],
    sources: list[str],
    references: list[str],
    config: SequenceKDConfig,
    directory: Path,
) -> tuple[list[str], dict[str, Any]]:
    """The teacher's translation of every source, from the cache in ``directory`` where it has
    them, translating (``translate(batch) -> n-best lists``) and caching the missing chunks. A
    chunk is reused only for the same sources (its file is named by their digest)."""
    started = time.perf_counter()
    out: list[str] = []
    reused = translated = 0
    for (start, end), path in chunk_files(directory, sources, config.chunk_size):
        usable = verified_cache_file(path, "cached teacher translations")
        lines = path.read_text(encoding="utf-8").split("\n")[:-1] if usable else []
        if len(lines) == end - start:
            out.extend(lines)
            reused += len(lines)
            continue
        nbest = translate(sources[start:end])
        chosen = [closest(hyps, ref) for hyps, ref in zip(nbest, references[start:end])]
        atomic_write_text(path, "".join(h.replace("\n", " ") + "\n" for h in chosen))
        record_digest(path)
        out.extend(chosen)
        translated += len(chosen)
        seconds = time.perf_counter() - started
        done = end
        log.info(
            "teacher translations for sequence-level KD: %d/%d sentences (%.0f%%), %.0fs, about %.0fs left",
            done,
            len(sources),
            100 * done / len(sources),
            seconds,
            seconds / max(translated, 1) * (len(sources) - done),
        )
    seconds = round(time.perf_counter() - started, 1)
    info = {
        "path": str(directory),
        "sentences": len(out),
        "reused": reused,
        "translated": translated,
        "seconds": seconds,
        "beam_size": config.beam_size,
        "nbest": config.nbest,
        "targets": config.targets,
        "empty": sum(1 for h in out if not h.strip()),
    }
    atomic_write_json(directory / "info.json", info)
    return out, info


def with_targets(data: Any, hypotheses: list[str], config: SequenceKDConfig, extra: Sequence[str] = ()) -> Any:
    """``data`` training on the teacher's translations (``teacher``; the reference where the
    teacher gave nothing) or on both (``both``). ``hypotheses`` holds the translations of the
    training sources, then of the ``extra`` sources, whose pairs (source, translation) join the
    training data in either case; an extra source the teacher gave nothing for is left out."""
    tokenizer = data.tokenizer
    encode_targets = getattr(tokenizer, "encode_targets", tokenizer.encode)
    pairs = len(data.train_tgt)
    encoded = TokenRows.encode(encode_targets, hypotheses[:pairs])
    teacher_ids = encoded
    if (encoded.lengths() == 0).any():  # the reference where the teacher gave nothing
        teacher_ids = TokenRows.from_rows(ids if ids else ref for ids, ref in zip(encoded, data.train_tgt))
    kept = []
    if extra:  # some tokenizers (Hugging Face's) refuse an empty batch
        kept = [(s, ids) for s, ids in zip(tokenizer.encode(list(extra)), encode_targets(hypotheses[pairs:])) if ids]
    extra_src, extra_tgt = [s for s, _ in kept], [ids for _, ids in kept]
    digest = hashlib.sha256("\n".join(hypotheses).encode()).hexdigest()[:16]
    label = f"{digest}+{len(kept)}" if extra else digest
    if config.targets == "teacher":
        return attrs.evolve(
            data, train_src=data.train_src + extra_src, train_tgt=teacher_ids + extra_tgt, targets=f"teacher:{label}"
        )
    return attrs.evolve(
        data,
        train_src=data.train_src + data.train_src + extra_src,
        train_tgt=data.train_tgt + teacher_ids + extra_tgt,
        targets=f"both:{label}",
    )


def extra_sources(config: SequenceKDConfig, corpus_extra: list[str], held_out: set[str]) -> tuple[list[str], int]:
    """The extra source text the teacher translates: the corpus's, then each file's, in order,
    without the sentences validation or test score (``held_out``); and how many were left out."""
    from cvmkd_nmt.data.readers import read_sources

    text = list(corpus_extra)
    for path in config.extra_sources:
        text.extend(read_sources(path))
    kept = [s for s in text if s not in held_out]
    return kept, len(text) - len(kept)


def ship_targets(
    package: Path, key: str, hypotheses: list[str], made_with: dict[str, Any], folder_name: str = SHIPPED
) -> Path:
    """Store the teacher's translations of a training set in its package (``sequence-kd/``), so
    that runs with that teacher, those sources and those settings use them instead of translating
    (``key``: :func:`cache_key` with :data:`SHIPPED_SETTINGS`); with ``folder_name``
    :data:`SHIPPED_TRANSLATIONS`, of evaluation sentences (``key``: :func:`translations_key`).
    Returns the text file."""
    folder = package / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key[:24]}.txt.gz"
    text = "".join(h.replace("\n", " ") + "\n" for h in hypotheses).encode("utf-8")
    path.write_bytes(gzip.compress(text, mtime=0))
    atomic_write_json(
        folder / f"{key[:24]}.json",
        {"key": key, "sentences": len(hypotheses), "sha256": sha256_file(path), "made_with": made_with},
    )
    return path


def translations_key(weights: str, tokenizer_sha256: str, beam_size: int, settings: str, sources: list[str]) -> str:
    """The key of the teacher's translations of evaluation ``sources`` (validation, test): its
    weights and tokenizer, the beam, ``settings`` (device and precision of the run's cache, or
    :data:`SHIPPED_SETTINGS`) and the sentences."""
    return hashlib.sha256(
        "\n".join([weights, tokenizer_sha256, str(beam_size), settings, *sources]).encode()
    ).hexdigest()


def shipped_targets(
    package: Path, key: str, count: int, folder_name: str = SHIPPED
) -> tuple[list[str], dict[str, Any]] | None:
    """The teacher's translations shipped in its package (in ``folder_name``) for exactly this
    key, or None; a shipped set that does not match its record is an error naming the file, not
    a silent fallback."""
    path = package / folder_name / f"{key[:24]}.txt.gz"
    record_path = path.with_name(f"{key[:24]}.json")
    if not path.is_file() or not record_path.is_file():
        return None
    try:
        record = json.loads(record_path.read_text("utf-8"))
        if record.get("key") != key:
            return None
        if sha256_file(path) != record.get("sha256"):
            raise ValueError("sha256 mismatch")
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")[:-1]
    except (OSError, ValueError, EOFError) as exc:
        raise ModelError(
            f"teacher package {package}: {path.name} is damaged ({exc}); delete it to translate instead"
        ) from None
    if len(lines) != count or record.get("sentences") != count:
        raise ModelError(f"teacher package {package}: {path.name} holds {len(lines)} translations, not {count}")
    return lines, {
        "source": "package",
        "path": str(path),
        "sentences": count,
        "made_with": record.get("made_with", {}),
    }
