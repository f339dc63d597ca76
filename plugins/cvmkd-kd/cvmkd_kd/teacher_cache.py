"""Run the teacher once over the training set; store its top-k log-probabilities per target token.

Serving KD from the cache spares a teacher forward pass per student step, for any temperature.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

import attrs
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cvmkd_core.errors import ModelError
from cvmkd_kd.loss import check_vocab
from cvmkd_nmt.cache import digest_path, record_digest, verified_cache_file

__all__ = ["CacheBatch", "TeacherCache", "build_teacher_cache"]

FORMAT_VERSION = "1"
_INT16_MAX_VOCAB = 32767  # ids 0..32766 fit a signed int16


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


def build_teacher_cache(
    teacher_forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    batches: Iterable[CacheBatch],
    n_pairs: int,
    k: int,
    path: str | os.PathLike[str],
    *,
    fingerprint: str,
    pad_id: int = 0,
) -> TeacherCache:
    """Run ``teacher_forward(src, tgt_in) -> logits (B, T, V)`` over ``batches``; cache its top-k.
    (The forward may instead return the (N, V) logits of the N non-pad target positions alone.)

    For every non-pad position of ``tgt_out`` stores the ``k`` largest log-probabilities at
    temperature 1 (fp16) and their ids (int16 if the vocabulary has at most 32767 ids, else
    int32), flattened in pair order with an ``offsets`` table: pair ``i`` owns rows
    ``offsets[i]:offsets[i+1]``. ``batches`` may come in any order and any grouping but must hold
    every pair in ``range(n_pairs)`` exactly once. ``fingerprint`` identifies teacher, corpus and
    tokenizer; :meth:`TeacherCache.load` refuses a cache built for another one.

    The file (safetensors) is written atomically: a crash leaves either the old file or none.
    Peak memory is about twice the cache size (``positions * k * 4`` bytes), while reordering.
    Put the teacher in eval mode first; an ``nn.Module`` still in training mode is refused.
    Returns the cache, ready to :meth:`~TeacherCache.lookup`.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    if n_pairs < 0:
        raise ValueError(f"n_pairs must be >= 0, got {n_pairs!r}")
    if isinstance(teacher_forward, torch.nn.Module) and teacher_forward.training:
        raise ValueError("the teacher is in training mode (dropout on): call .eval() on it first")

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
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_pairs):
                raise ValueError(f"batch.indices must lie in [0, {n_pairs}), got {indices.tolist()}")
            uniq, n_seen = indices.unique(return_counts=True)
            dup = torch.cat([uniq[n_seen > 1], uniq[starts[uniq] >= 0]]).unique()
            if dup.numel():
                raise ValueError(f"pairs seen twice while building the teacher cache: {dup.tolist()}")

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

    missing = (starts < 0).nonzero().flatten()
    if missing.numel():
        shown = missing[:10].tolist()
        more = f" and {missing.numel() - 10} more" if missing.numel() > 10 else ""
        raise ValueError(f"pairs never seen while building the teacher cache: {shown}{more}")
    if vocab is None:
        vocab = 0  # no pairs at all: an empty but loadable cache

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

    n_positions = visited
    metadata = {
        "format": FORMAT_VERSION,
        "k": str(k),
        "vocab_size": str(vocab),
        "fingerprint": fingerprint,
        "n_pairs": str(n_pairs),
        "n_positions": str(n_positions),
        "mean_topk_mass": repr(mass_sum / n_positions if n_positions else 0.0),
        "reference_in_topk": repr(ref_hits / n_positions if n_positions else 0.0),
    }
    path = Path(path)
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
    record_digest(path)
    try:  # make the rename itself durable; not every OS can open a directory
        _fsync_path(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        pass
    return TeacherCache(
        path=path,
        fingerprint=fingerprint,
        k=k,
        vocab_size=vocab,
        logprobs=flat_lp,
        ids=flat_ids,
        offsets=offsets,
        mean_topk_mass=float(metadata["mean_topk_mass"]),
        reference_in_topk=float(metadata["reference_in_topk"]),
    )


@attrs.frozen(eq=False)
class TeacherCache:
    """The teacher's top-k log-probabilities for every non-pad target position of a training set."""

    path: Path
    fingerprint: str
    k: int
    vocab_size: int
    logprobs: torch.Tensor = attrs.field(repr=False)  # (n_positions, k) float16, pair order
    ids: torch.Tensor = attrs.field(repr=False)  # (n_positions, k) int16 or int32
    offsets: torch.Tensor = attrs.field(repr=False)  # (n_pairs + 1,) int64
    mean_topk_mass: float
    """Probability mass the top-k covers, averaged over positions (1.0 = lossless)."""
    reference_in_topk: float
    """Share of positions whose reference token is among the teacher's top-k."""

    @property
    def n_pairs(self) -> int:
        return self.offsets.numel() - 1

    @property
    def n_positions(self) -> int:
        return self.logprobs.shape[0]

    def stats(self) -> dict[str, Any]:
        """Numbers worth logging when the cache is built or loaded."""
        return {
            "k": self.k,
            "vocab_size": self.vocab_size,
            "n_pairs": self.n_pairs,
            "n_positions": self.n_positions,
            "mean_topk_mass": self.mean_topk_mass,
            "reference_in_topk": self.reference_in_topk,
        }

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        expected_fingerprint: str,
        *,
        student_vocab: int | None = None,
        verified: bool = False,
    ) -> TeacherCache:
        """Load a cache written by :func:`build_teacher_cache`.

        Raises :class:`ModelError` if the file is missing or unreadable, if it was built for a
        different fingerprint (teacher, corpus or tokenizer changed), or -- when
        ``student_vocab`` is given -- if the teacher's vocabulary size differs from it.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelError(f"teacher cache {path} does not exist: build it first")
        if not verified and not verified_cache_file(path, "teacher cache"):  # ``verified``: the caller did
            raise ModelError(f"teacher cache {path} has no recorded sha256 ({digest_path(path).name}): rebuild it")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                # Check the header before reading what may be gigabytes of tensors.
                if meta.get("format") != FORMAT_VERSION:
                    raise ModelError(
                        f"teacher cache {path} has format {meta.get('format')!r}, expected "
                        f"{FORMAT_VERSION!r}: rebuild it"
                    )
                found = meta.get("fingerprint")
                if found != expected_fingerprint:
                    raise ModelError(
                        f"teacher cache {path} was built for fingerprint {found!r}, expected "
                        f"{expected_fingerprint!r}: the teacher, corpus or tokenizer changed; "
                        "rebuild it"
                    )
                tensors = {name: f.get_tensor(name) for name in ("logprobs", "ids", "offsets")}
        except (SafetensorError, OSError, KeyError, RuntimeError, ValueError) as exc:
            raise ModelError(f"teacher cache {path} is unreadable ({exc}): rebuild it") from exc
        cache = cls(
            path=path,
            fingerprint=found,
            k=int(meta["k"]),
            vocab_size=int(meta["vocab_size"]),
            logprobs=tensors["logprobs"],
            ids=tensors["ids"],
            offsets=tensors["offsets"],
            mean_topk_mass=float(meta["mean_topk_mass"]),
            reference_in_topk=float(meta["reference_in_topk"]),
        )
        if cache.offsets.numel() < 1 or int(cache.offsets[-1]) != cache.n_positions:
            raise ModelError(f"teacher cache {path} is inconsistent (offsets vs. rows): rebuild it")
        if student_vocab is not None:
            check_vocab(cache.vocab_size, student_vocab)
        return cache

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
        out_lp[mask] = self.logprobs[rows].to(device=tgt_out.device, dtype=torch.float32)
        out_ids[mask] = self.ids[rows].to(device=tgt_out.device, dtype=torch.long)
        return out_lp, out_ids
