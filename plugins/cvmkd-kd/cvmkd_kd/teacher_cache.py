"""Run the teacher once over the training set; store its top-k log-probabilities per target token.

Serving KD from the cache spares a teacher forward pass per student step, for any temperature.

The cache is a folder: ``shard-NNNNN.safetensors`` files of ``SHARD_PAIRS`` training pairs each,
built one after another (an interrupted build keeps its finished shards and goes on from the
first missing one), and ``index.json``, written last, that lists them. Each shard's sha256 is
recorded when it is written and checked the first time it is read; then it is memory-mapped, so
a run holds in memory only the pages its batches touch, and later starts hash nothing
(:func:`cvmkd_nmt.cache.verified_once`). A position costs ``k`` fp16 log-probabilities and ``k``
int16 ids (int32 above 32,767 pieces): 64 bytes at top-16, 64 MB a million target tokens.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import attrs
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cvmkd_core.errors import ModelError
from cvmkd_core.files import atomic_write_json
from cvmkd_kd.loss import check_vocab
from cvmkd_nmt.cache import CacheError, digest_path, mark_checked, record_digest, verified_once

__all__ = ["INDEX", "SHARD_PAIRS", "CacheBatch", "TeacherCache", "build_teacher_cache"]

FORMAT_VERSION = "2"
_INT16_MAX_VOCAB = 32767  # ids 0..32766 fit a signed int16
#: the file that lists a finished cache's shards, written after the last of them
INDEX = "index.json"
#: training pairs a shard holds: about 135 MB at top-16 and 34 target tokens a pair, and building
#: one needs about twice that in memory while it puts the positions in pair order
SHARD_PAIRS = 65_536
_DTYPES = {"F16": np.float16, "I16": np.int16, "I32": np.int32, "I64": np.int64}


class CacheBatch(Protocol):
    """What :func:`build_teacher_cache` reads from a batch."""

    # read-only members, so frozen batch classes match
    @property
    def src(self) -> torch.Tensor: ...
    @property
    def tgt_in(self) -> torch.Tensor: ...
    @property
    def tgt_out(self) -> torch.Tensor: ...
    @property
    def indices(self) -> torch.Tensor | None:  # (B,) positions of the batch's pairs in the training set
        ...


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def shard_file(directory: Path, number: int) -> Path:
    return directory / f"shard-{number:05d}.safetensors"


def build_teacher_cache(
    teacher_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[CacheBatch] | Callable[[int, int], Iterable[CacheBatch]],
    n_pairs: int,
    k: int,
    path: str | os.PathLike[str],
    *,
    fingerprint: str,
    pad_id: int = 0,
    shard_pairs: int = SHARD_PAIRS,
    progress: Callable[[int, int], None] | None = None,
) -> TeacherCache:
    """Run ``teacher_forward(src, tgt_in) -> logits (B, T, V)`` over the training pairs; cache
    their top-k in the folder ``path``. (The forward may instead return the (N, V) logits of the
    N non-pad target positions alone.)

    ``batches(start, stop)`` gives the batches of pairs ``start..stop-1`` (their ``indices`` are
    positions in the whole training set); the cache is built ``shard_pairs`` pairs at a time, and
    a shard already written for this ``fingerprint`` is kept. ``batches`` may instead be the
    batches of every pair, built as one shard. Within a shard, batches may come in any order and
    any grouping but must hold each of its pairs exactly once. ``progress(pairs_done, n_pairs)``
    is called after each shard.

    For every non-pad position of ``tgt_out`` stores the ``k`` largest log-probabilities at
    temperature 1 (fp16) and their ids, in pair order with an ``offsets`` table. ``fingerprint``
    identifies teacher, corpus and tokenizer; :meth:`TeacherCache.load` refuses a cache built for
    another one. Every file is written atomically. Put the teacher in eval mode first; an
    ``nn.Module`` still in training mode is refused. Returns the cache, memory-mapped.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    if n_pairs < 0:
        raise ValueError(f"n_pairs must be >= 0, got {n_pairs!r}")
    if shard_pairs < 1:
        raise ValueError(f"shard_pairs must be >= 1, got {shard_pairs!r}")
    if isinstance(teacher_forward, torch.nn.Module) and teacher_forward.training:
        raise ValueError("the teacher is in training mode (dropout on): call .eval() on it first")
    directory = Path(path)
    if callable(batches):
        bounds = [(start, min(start + shard_pairs, n_pairs)) for start in range(0, n_pairs, shard_pairs)] or [(0, 0)]
    else:
        bounds = [(0, n_pairs)]
    shards = []
    for number, (start, stop) in enumerate(bounds):
        file = shard_file(directory, number)
        meta = _finished_shard(file, fingerprint, k, start, stop)
        if meta is None:
            part = batches(start, stop) if callable(batches) else batches
            meta = _build_shard(teacher_forward, part, start, stop, k, file, fingerprint, pad_id)
        shards.append({"file": file.name, **meta})
        if progress is not None:
            progress(stop, n_pairs)
    vocabs = {int(s["vocab_size"]) for s in shards if int(s["n_pairs"])}
    if len(vocabs) > 1:
        raise ModelError(f"teacher vocabulary changed between shards ({sorted(vocabs)})")
    positions = sum(int(s["n_positions"]) for s in shards)
    mass = sum(float(s["mass_sum"]) for s in shards)
    hits = sum(int(s["ref_hits"]) for s in shards)
    index = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "k": k,
        "vocab_size": vocabs.pop() if vocabs else 0,
        "n_pairs": n_pairs,
        "n_positions": positions,
        "mean_topk_mass": mass / positions if positions else 0.0,
        "reference_in_topk": hits / positions if positions else 0.0,
        "shards": [
            {"file": s["file"], "first_pair": start, "n_pairs": stop - start}
            for s, (start, stop) in zip(shards, bounds)
        ],
    }
    atomic_write_json(directory / INDEX, index)
    mark_checked(directory / INDEX, record_digest(directory / INDEX))
    kept = {s["file"] for s in shards}
    for stale in directory.glob("shard-*.safetensors"):  # a larger earlier build's last shards
        if stale.name not in kept:
            for extra in (stale, digest_path(stale), stale.with_name(stale.name + ".checked")):
                extra.unlink(missing_ok=True)
    return TeacherCache.load(directory, fingerprint)


def _finished_shard(file: Path, fingerprint: str, k: int, start: int, stop: int) -> dict[str, str] | None:
    """The metadata of ``file`` when it is a finished shard of this cache (its sha256 recorded and
    matching): an interrupted build goes on from the first shard that is not."""
    if not verified_once(file, "cached teacher outputs"):
        return None
    meta, _ = _mapped(file)
    wanted = {"format": FORMAT_VERSION, "fingerprint": fingerprint, "k": str(k)}
    if any(meta.get(key) != value for key, value in wanted.items()):
        return None
    if (meta.get("first_pair"), meta.get("n_pairs")) != (str(start), str(stop - start)):
        return None
    return meta


def _build_shard(
    teacher_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[CacheBatch],
    first: int,
    stop: int,
    k: int,
    path: Path,
    fingerprint: str,
    pad_id: int,
) -> dict[str, str]:
    n_pairs = stop - first
    chunks_lp: list[torch.Tensor] = []
    chunks_ids: list[torch.Tensor] = []
    # Where each pair's rows start in the visit-order concatenation of the chunks, and how many.
    starts = torch.full((n_pairs,), -1, dtype=torch.long)
    lengths = torch.zeros(n_pairs, dtype=torch.long)
    visited = 0
    vocab: int | None = None
    id_dtype = torch.int16
    mass_sum = 0.0
    ref_hits = 0

    with torch.inference_mode():
        for batch in batches:
            tgt_out = batch.tgt_out
            if batch.indices is None:
                raise ValueError("teacher outputs are cached per training pair: batches need their indices")
            indices = batch.indices.long().cpu()
            logits = teacher_forward(batch.src, batch.tgt_in)
            mask = tgt_out.to(logits.device) != pad_id
            # (B, T, V), or the rows of the target positions alone, (N, V)
            rows = logits.dim() == 2 and logits.shape[0] == int(mask.sum())
            if not rows and (logits.dim() != 3 or logits.shape[:2] != tgt_out.shape):
                raise ModelError(
                    f"teacher returned logits {tuple(logits.shape)} for targets "
                    f"{tuple(tgt_out.shape)}: expected (B, T, V), or (N, V) for its N non-pad positions"
                )
            if vocab is None:
                vocab = logits.shape[-1]
                if k > vocab:
                    raise ValueError(f"k ({k}) exceeds the teacher vocabulary ({vocab})")
                id_dtype = torch.int16 if vocab <= _INT16_MAX_VOCAB else torch.int32
            elif logits.shape[-1] != vocab:
                raise ModelError(f"teacher vocabulary changed between batches ({vocab} then {logits.shape[-1]})")
            if indices.shape != (tgt_out.shape[0],):
                raise ValueError(
                    f"batch.indices {tuple(indices.shape)} must hold one index per row of "
                    f"tgt_out {tuple(tgt_out.shape)}"
                )
            if indices.numel() and (int(indices.min()) < first or int(indices.max()) >= stop):
                raise ValueError(f"batch.indices must lie in [{first}, {stop}), got {indices.tolist()}")
            indices = indices - first
            uniq, n_seen = indices.unique(return_counts=True)
            dup = torch.cat([uniq[n_seen > 1], uniq[starts[uniq] >= 0]]).unique()
            if dup.numel():
                raise ValueError(f"pairs seen twice while building the teacher cache: {(dup + first).tolist()}")

            tgt = tgt_out.to(logits.device)
            # fp32 log-softmax: the teacher may run under bf16 autocast.
            logp = F.log_softmax((logits if rows else logits[mask]).float(), dim=-1)
            top_lp, top_ids = logp.topk(k, dim=-1)
            mass_sum += float(top_lp.exp().sum(-1).double().sum())
            ref_hits += int((top_ids == tgt[mask].unsqueeze(-1)).any(-1).sum())

            row_len = mask.sum(1).cpu()
            lengths[indices] = row_len
            starts[indices] = visited + torch.cumsum(row_len, 0) - row_len
            visited += int(row_len.sum())
            chunks_lp.append(top_lp.half().cpu())
            chunks_ids.append(top_ids.to(device="cpu", dtype=id_dtype))

    missing = (starts < 0).nonzero().flatten() + first
    if missing.numel():
        shown = missing[:10].tolist()
        more = f" and {missing.numel() - 10} more" if missing.numel() > 10 else ""
        raise ValueError(f"pairs never seen while building the teacher cache: {shown}{more}")

    flat_lp = torch.cat(chunks_lp) if chunks_lp else torch.zeros(0, k, dtype=torch.float16)
    flat_ids = torch.cat(chunks_ids) if chunks_ids else torch.zeros(0, k, dtype=id_dtype)
    del chunks_lp, chunks_ids
    offsets = torch.zeros(n_pairs + 1, dtype=torch.long)
    torch.cumsum(lengths, 0, out=offsets[1:])
    # Row j of the pair-ordered array is row starts[i] + (j - offsets[i]) of the visit order.
    perm = torch.repeat_interleave(starts - offsets[:-1], lengths) + torch.arange(visited, dtype=torch.long)
    flat_lp = flat_lp[perm].contiguous()
    flat_ids = flat_ids[perm].contiguous()
    del perm

    metadata = {
        "format": FORMAT_VERSION,
        "k": str(k),
        "vocab_size": str(vocab or 0),
        "fingerprint": fingerprint,
        "first_pair": str(first),
        "n_pairs": str(n_pairs),
        "n_positions": str(visited),
        "mass_sum": repr(mass_sum),
        "ref_hits": str(ref_hits),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file({"logprobs": flat_lp, "ids": flat_ids, "offsets": offsets}, str(tmp), metadata)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    mark_checked(path, record_digest(path))  # checked as it was written: not hashed again when read
    try:  # make the rename itself durable; not every OS can open a directory
        _fsync_path(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        pass
    return metadata


def _mapped(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata, and its tensors memory-mapped (copy-on-write: the pages are
    the file's until written, and nothing here writes them)."""
    try:
        with open(path, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            if size > os.fstat(handle.fileno()).st_size - 8:
                raise ValueError(f"a header of {size} bytes in a file of {os.fstat(handle.fileno()).st_size}")
            header = json.loads(handle.read(size))
        meta = header.pop("__metadata__", None) or {}
        tensors = {}
        for name, spec in header.items():
            dtype = np.dtype(_DTYPES[spec["dtype"]])
            begin, end = spec["data_offsets"]
            shape = tuple(int(n) for n in spec["shape"])
            if int(np.prod(shape)) * dtype.itemsize != end - begin:
                raise ValueError(f"tensor {name!r} has {end - begin} bytes for shape {shape}")
            if end == begin:
                array = np.zeros(shape, dtype=dtype)
            else:
                array = np.memmap(path, dtype=dtype, mode="c", offset=8 + size + begin, shape=shape)
            tensors[name] = torch.from_numpy(array)
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ModelError(f"teacher cache {path} is unreadable ({exc}): rebuild it") from None
    return meta, tensors


@attrs.frozen(eq=False)
class Shard:
    """One shard's positions, memory-mapped: rows ``first_row..`` of the cache."""

    file: Path
    first_row: int
    logprobs: torch.Tensor = attrs.field(repr=False)  # (positions, k) float16, pair order
    ids: torch.Tensor = attrs.field(repr=False)  # (positions, k) int16 or int32


@attrs.frozen(eq=False)
class TeacherCache:
    """The teacher's top-k log-probabilities for every non-pad target position of a training set."""

    path: Path
    fingerprint: str
    k: int
    vocab_size: int
    shards: list[Shard] = attrs.field(repr=False)
    offsets: torch.Tensor = attrs.field(repr=False)  # (n_pairs + 1,) int64: pair i owns rows offsets[i]:offsets[i+1]
    mean_topk_mass: float
    """Probability mass the top-k covers, averaged over positions (1.0 = lossless)."""
    reference_in_topk: float
    """Share of positions whose reference token is among the teacher's top-k."""

    @property
    def n_pairs(self) -> int:
        return self.offsets.numel() - 1

    @property
    def n_positions(self) -> int:
        return int(self.offsets[-1])

    @property
    def id_dtype(self) -> torch.dtype:
        return self.shards[0].ids.dtype

    def stats(self) -> dict[str, Any]:
        """Numbers worth logging when the cache is built or loaded."""
        return {
            "k": self.k,
            "vocab_size": self.vocab_size,
            "n_pairs": self.n_pairs,
            "n_positions": self.n_positions,
            "shards": len(self.shards),
            "mean_topk_mass": self.mean_topk_mass,
            "reference_in_topk": self.reference_in_topk,
        }

    @staticmethod
    def finished(path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` holds a finished cache (its index written, and matching its sha256:
        a damaged index raises :class:`~cvmkd_nmt.cache.CacheError`, naming it)."""
        return verified_once(Path(path) / INDEX, "cached teacher outputs")

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        expected_fingerprint: str,
        *,
        student_vocab: int | None = None,
    ) -> TeacherCache:
        """Map a cache written by :func:`build_teacher_cache`.

        Raises :class:`ModelError` if it is missing, unfinished or unreadable, if it was built for
        a different fingerprint (teacher, corpus or tokenizer changed), or -- when
        ``student_vocab`` is given -- if the teacher's vocabulary size differs from it; a file
        that does not match the sha256 recorded when it was written raises :class:`CacheError`.
        """
        directory = Path(path)
        if not (directory / INDEX).is_file():
            raise ModelError(f"teacher cache {directory} does not exist or is unfinished: build it first")
        if not cls.finished(directory):
            raise ModelError(f"teacher cache {directory / INDEX} has no recorded sha256: rebuild it")
        try:
            index = json.loads((directory / INDEX).read_text(encoding="utf-8"))
            if index.get("format") != FORMAT_VERSION:
                raise ModelError(
                    f"teacher cache {directory} has format {index.get('format')!r}, expected {FORMAT_VERSION!r}: rebuild it"
                )
            found = index["fingerprint"]
            if found != expected_fingerprint:
                raise ModelError(
                    f"teacher cache {directory} was built for fingerprint {found!r}, expected "
                    f"{expected_fingerprint!r}: the teacher, corpus or tokenizer changed; rebuild it"
                )
            shards, offsets, row = [], [torch.zeros(1, dtype=torch.long)], 0
            for entry in index["shards"]:
                file = directory / entry["file"]
                if not verified_once(file, "cached teacher outputs"):
                    raise ModelError(
                        f"teacher cache {file} is missing or has no recorded sha256; delete {directory} and it is rebuilt"
                    )
                meta, tensors = _mapped(file)
                if meta.get("fingerprint") != found or meta.get("n_pairs") != str(entry["n_pairs"]):
                    raise ModelError(f"teacher cache {file} belongs to another cache: rebuild it")
                local = tensors["offsets"]
                if local.numel() != entry["n_pairs"] + 1 or int(local[-1]) != tensors["logprobs"].shape[0]:
                    raise ModelError(f"teacher cache {file} is inconsistent (offsets vs. rows): rebuild it")
                shards.append(Shard(file=file, first_row=row, logprobs=tensors["logprobs"], ids=tensors["ids"]))
                offsets.append(local[1:].clone() + row)
                row += int(local[-1])
            cache = cls(
                path=directory,
                fingerprint=found,
                k=int(index["k"]),
                vocab_size=int(index["vocab_size"]),
                shards=shards,
                offsets=torch.cat(offsets),
                mean_topk_mass=float(index["mean_topk_mass"]),
                reference_in_topk=float(index["reference_in_topk"]),
            )
        except (CacheError, ModelError):
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"teacher cache {directory} is unreadable ({exc}): rebuild it") from None
        if cache.n_pairs != int(index["n_pairs"]) or not shards:
            raise ModelError(f"teacher cache {directory} is inconsistent (pairs vs. shards): rebuild it")
        if student_vocab is not None:
            check_vocab(cache.vocab_size, student_vocab)
        return cache

    def _rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The log-probabilities and ids of cache rows ``rows``, from whichever shards hold them."""
        if len(self.shards) == 1:
            return self.shards[0].logprobs[rows], self.shards[0].ids[rows]
        firsts = torch.tensor([s.first_row for s in self.shards], dtype=torch.long)
        which = torch.searchsorted(firsts, rows, right=True) - 1
        lp = torch.empty((rows.numel(), self.k), dtype=torch.float16)
        ids = torch.empty((rows.numel(), self.k), dtype=torch.long)
        for number in which.unique().tolist():
            chosen = which == number
            shard = self.shards[number]
            lp[chosen] = shard.logprobs[rows[chosen] - shard.first_row]
            ids[chosen] = shard.ids[rows[chosen] - shard.first_row].long()
        return lp, ids

    def lookup(self, indices: torch.Tensor, tgt_out: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached top-k for a batch: ``(logprobs float32, ids int64)``, each ``(B, T, k)``.

        Row ``b``'s non-pad positions of ``tgt_out`` receive, in order, the cached rows of pair
        ``indices[b]``; pad positions get log-prob 0 and id 0 (``kd_loss`` ignores them). Results
        are on ``tgt_out``'s device. Raises :class:`ModelError` if a pair's cached length differs
        from its number of non-pad targets: the cache does not belong to these batches.
        """
        indices = indices.long().cpu()
        if indices.shape != (tgt_out.shape[0],):
            raise ValueError(
                f"indices {tuple(indices.shape)} must hold one index per row of tgt_out {tuple(tgt_out.shape)}"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.n_pairs):
            raise ValueError(f"pair indices must lie in [0, {self.n_pairs}) for this cache, got {indices.tolist()}")
        mask = tgt_out != pad_id
        counts = mask.sum(1).cpu()
        starts = self.offsets[indices]
        cached = self.offsets[indices + 1] - starts
        bad = (cached != counts).nonzero().flatten()
        if bad.numel():
            b = int(bad[0])
            raise ModelError(
                f"teacher cache {self.path} holds {int(cached[b])} positions for pair "
                f"{int(indices[b])} but the batch has {int(counts[b])} non-pad target tokens "
                f"({bad.numel()} mismatched rows): the cache was not built from these batches "
                f"(pad id {pad_id}?); rebuild it"
            )
        total = int(counts.sum())
        # Row-major order of mask's True entries == each row's cached rows, rows in batch order.
        rows = torch.repeat_interleave(starts - (torch.cumsum(counts, 0) - counts), counts)
        rows += torch.arange(total, dtype=torch.long)
        shape = (*tgt_out.shape, self.k)
        out_lp = torch.zeros(shape, dtype=torch.float32, device=tgt_out.device)
        out_ids = torch.zeros(shape, dtype=torch.long, device=tgt_out.device)
        lp, ids = self._rows(rows)
        out_lp[mask] = lp.to(device=tgt_out.device, dtype=torch.float32)
        out_ids[mask] = ids.to(device=tgt_out.device, dtype=torch.long)
        return out_lp, out_ids
