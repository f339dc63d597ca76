"""Length-bucketed training batches: padded tensors from encoded pairs, and an endless, seeded,
resumable stream of batches over epochs.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .tokens import TokenRows

__all__ = ["Batch", "BatchStream", "BucketBatchSampler", "batches_once", "make_batch"]


@dataclass(frozen=True, slots=True)
class Batch:
    """One training batch, batch-first ``(B, T)`` int64 tensors padded with the pad id.

    ``src`` is source ids + eos, ``tgt_in`` is bos + target ids (decoder input), ``tgt_out`` is
    target ids + eos (what the decoder must predict). ``n_tokens`` counts non-pad ``tgt_out``
    tokens (the loss normaliser). ``indices`` are the pairs' positions in the training list, when
    known, so per-pair data such as cached teacher outputs can be looked up.
    """

    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    n_tokens: int
    indices: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """Number of sentence pairs."""
        return int(self.src.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with the tensors on ``device``; ``indices`` stay on the CPU for lookups."""
        return replace(
            self,
            src=self.src.to(device, non_blocking=non_blocking),
            tgt_in=self.tgt_in.to(device, non_blocking=non_blocking),
            tgt_out=self.tgt_out.to(device, non_blocking=non_blocking),
        )


def padded_width(longest: int, multiple: int = 1, limit: int | None = None) -> int:
    """``longest`` rounded up to a multiple of ``multiple``, but not beyond ``limit`` (when it is
    at least ``longest``)."""
    width = -(-longest // multiple) * multiple
    return max(longest, min(width, limit)) if limit is not None else width


def pad_rows(rows: list[list[int]], pad_id: int, multiple: int = 1, limit: int | None = None) -> torch.Tensor:
    """Rows of ids as one (rows, width) tensor, right-padded with ``pad_id``; the width is the
    longest row's, rounded up to a multiple of ``multiple`` (at most ``limit``)."""
    width = padded_width(max(len(r) for r in rows), multiple, limit)
    out = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def make_batch(
    src_ids: Sequence[Sequence[int]],
    tgt_ids: Sequence[Sequence[int]],
    pad_id: int,
    bos_id: int,
    eos_id: int,
    max_len: int | None = None,
    indices: Sequence[int] | None = None,
    pad_multiple: int = 1,
) -> Batch:
    """Build a :class:`Batch` from encoded pairs (ids without bos/eos).

    With ``max_len``, ids are cut so that every row, bos or eos included, has at most ``max_len``
    positions; the eos is kept after a cut so the model still learns where sentences end.
    ``pad_multiple`` rounds the source and target widths up to a multiple of it (at most
    ``max_len``): fewer distinct shapes, so that CPU kernels built for one shape are reused.
    """
    if len(src_ids) != len(tgt_ids) or not src_ids:
        raise ValueError(
            f"make_batch: need as many sources as targets, at least one (got {len(src_ids)}, {len(tgt_ids)})"
        )
    if max_len is not None and max_len < 2:
        raise ValueError(f"make_batch: max_len must be at least 2, got {max_len}")
    keep = None if max_len is None else max_len - 1
    src_rows = [list(s[:keep]) + [eos_id] for s in src_ids]
    tgt_cut = [list(t[:keep]) for t in tgt_ids]
    tgt_in = pad_rows([[bos_id] + t for t in tgt_cut], pad_id, pad_multiple, max_len)
    tgt_out = pad_rows([t + [eos_id] for t in tgt_cut], pad_id, pad_multiple, max_len)
    return Batch(
        src=pad_rows(src_rows, pad_id, pad_multiple, max_len),
        tgt_in=tgt_in,
        tgt_out=tgt_out,
        n_tokens=sum(len(t) + 1 for t in tgt_cut),
        indices=None if indices is None else torch.tensor(list(indices), dtype=torch.long),
    )


def _cut(
    order: list[int],
    width: Sequence[int],
    batch_size: int | None,
    max_tokens: int | None,
) -> list[list[int]]:
    """Cut length-sorted indices into consecutive batches under the sentence and token limits."""
    if max_tokens is None:
        bs = batch_size or 1
        return [order[i : i + bs] for i in range(0, len(order), bs)]
    out: list[list[int]] = []
    cur: list[int] = []
    cur_w = 0
    for i in order:
        w = max(cur_w, width[i])
        full = (batch_size is not None and len(cur) >= batch_size) or w * (len(cur) + 1) > max_tokens
        if cur and full:
            out.append(cur)
            cur, w = [], width[i]
        # A pair longer than max_tokens on its own still gets a batch of one rather than vanishing.
        cur.append(i)
        cur_w = w
    if cur:
        out.append(cur)
    return out


def _truncated_lengths(ids: Sequence[Sequence[int]], max_len: int | None) -> list[int]:
    cap = (max_len - 1) if max_len is not None else None  # room for the eos or bos
    if isinstance(ids, TokenRows):
        lengths = ids.lengths()
        return (lengths if cap is None else np.minimum(lengths, cap)).tolist()  # type: ignore[no-any-return]
    return [len(x) if cap is None else min(len(x), cap) for x in ids]


class BucketBatchSampler:
    """An endless, deterministic stream of index batches over epochs, grouped by length.

    Each epoch shuffles all indices with a generator seeded by ``(seed, epoch)``, cuts the
    shuffled order into chunks of ``chunk_size``, sorts each chunk by length and cuts it into
    batches, then shuffles the epoch's batches. Sentences of similar length share a batch, so
    little padding is wasted, while the data order still changes every epoch.

    Batches hold ``batch_size`` pairs; with ``max_tokens`` they are also limited to
    ``max_tokens`` padded positions (rows x longest side, eos/bos included), and ``batch_size``
    may be ``None`` to use the token limit alone. ``drop_last`` (sentence mode only) leaves out
    the epoch's one short batch so that every batch has exactly ``batch_size`` pairs; which pairs
    are left out changes each epoch.

    The position is ``state_dict() == {"epoch", "index", "seed"}``: ``index`` batches of
    ``epoch`` have been produced. Restoring it into a sampler built on the same lengths and
    settings continues with exactly the batches an uninterrupted run would have seen.
    """

    def __init__(
        self,
        src_lengths: Sequence[int],
        tgt_lengths: Sequence[int] | None = None,
        batch_size: int | None = 32,
        max_tokens: int | None = None,
        seed: int = 0,
        chunk_size: int = 4096,
        drop_last: bool = True,
    ) -> None:
        if tgt_lengths is not None and len(tgt_lengths) != len(src_lengths):
            raise ValueError(f"{len(src_lengths)} source lengths but {len(tgt_lengths)} target lengths")
        if batch_size is None and max_tokens is None:
            raise ValueError("give batch_size, max_tokens or both")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if max_tokens is not None and max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        n = len(src_lengths)
        if n == 0:
            raise ValueError("cannot batch an empty training set")
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        if max_tokens is None and batch_size is not None:
            # A whole number of batches per chunk, so only the epoch's last chunk leaves a short batch.
            chunk_size = max(1, -(-chunk_size // batch_size)) * batch_size
        self.chunk_size = max(chunk_size, 1)
        self.drop_last = drop_last and max_tokens is None
        if self.drop_last and batch_size is not None and n < batch_size:
            raise ValueError(f"training set has {n} pairs, fewer than one batch of {batch_size}")
        # Padded width of a pair: the longer side plus its eos (source) or bos (target input).
        tgt = tgt_lengths if tgt_lengths is not None else src_lengths
        self._width = [max(s, t) + 1 for s, t in zip(src_lengths, tgt)]
        self._n = n
        self.seed = seed
        self.epoch = 0
        self.index = 0
        self._cache: tuple[int, int, list[list[int]]] | None = None  # (seed, epoch, batches)

    def __len__(self) -> int:
        """Number of batches in the current epoch (it can vary by a few between epochs in token mode)."""
        return len(self._epoch_batches(self.epoch))

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cache is not None and self._cache[:2] == (self.seed, epoch):
            return self._cache[2]
        # A string seed is hashed (SHA-512) by `random`: stable across processes and Python versions,
        # unlike hash() of a tuple, which PYTHONHASHSEED changes.
        rng = random.Random(f"cvmkd-batches:{self.seed}:{epoch}")
        order = list(range(self._n))
        rng.shuffle(order)
        width = self._width
        batches: list[list[int]] = []
        for start in range(0, self._n, self.chunk_size):
            chunk = sorted(order[start : start + self.chunk_size], key=width.__getitem__)  # stable sort
            batches.extend(_cut(chunk, width, self.batch_size, self.max_tokens))
        if self.drop_last:
            batches = [b for b in batches if len(b) == self.batch_size]
        rng.shuffle(batches)
        self._cache = (self.seed, epoch, batches)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        return self

    def __next__(self) -> list[int]:
        batches = self._epoch_batches(self.epoch)
        while self.index >= len(batches):
            # Partial-batch leftovers across chunks make every epoch non-empty unless drop_last
            # removed them all, which __init__ rules out.
            self.epoch += 1
            self.index = 0
            batches = self._epoch_batches(self.epoch)
        batch = batches[self.index]
        self.index += 1
        return list(batch)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"epoch", "index", "seed"} - set(state)
        if missing:
            raise ValueError(f"batch sampler state lacks {sorted(missing)}")
        epoch, index, seed = (
            int(state["epoch"]),
            int(state["index"]),
            int(state["seed"]),
        )
        if epoch < 0 or index < 0:
            raise ValueError(f"batch sampler state has negative epoch or index: {state}")
        self.seed, self.epoch, self.index = seed, epoch, index
        n = len(self._epoch_batches(epoch))
        if index > n:
            raise ValueError(
                f"batch sampler state points at batch {index} of epoch {epoch}, which has only {n} batches "
                "(was it saved for a different training set or batch settings?)"
            )


class BatchStream:
    """Endless padded :class:`Batch` es over encoded training pairs, via :class:`BucketBatchSampler`.

    Lengths used for bucketing are those after truncation to ``max_len``. ``indices`` of each
    batch are positions in ``src_ids``/``tgt_ids``. Iterate in the training process itself (not
    in DataLoader workers, which read ahead) so that ``state_dict()`` matches what training consumed.
    """

    def __init__(
        self,
        src_ids: Sequence[Sequence[int]],
        tgt_ids: Sequence[Sequence[int]],
        pad_id: int,
        bos_id: int,
        eos_id: int,
        batch_size: int | None = 32,
        max_tokens: int | None = None,
        max_len: int | None = 256,
        seed: int = 0,
        chunk_size: int = 4096,
        drop_last: bool = True,
        pad_multiple: int = 1,
    ) -> None:
        if len(src_ids) != len(tgt_ids):
            raise ValueError(f"{len(src_ids)} sources but {len(tgt_ids)} targets")
        self.src_ids, self.tgt_ids = src_ids, tgt_ids
        self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
        self.max_len = max_len
        self.pad_multiple = pad_multiple
        self.sampler = BucketBatchSampler(
            _truncated_lengths(src_ids, max_len),
            _truncated_lengths(tgt_ids, max_len),
            batch_size=batch_size,
            max_tokens=max_tokens,
            seed=seed,
            chunk_size=chunk_size,
            drop_last=drop_last,
        )

    def __iter__(self) -> Iterator[Batch]:
        return self

    def __next__(self) -> Batch:
        idx = next(self.sampler)
        return make_batch(
            [self.src_ids[i] for i in idx],
            [self.tgt_ids[i] for i in idx],
            self.pad_id,
            self.bos_id,
            self.eos_id,
            max_len=self.max_len,
            indices=idx,
            pad_multiple=self.pad_multiple,
        )

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def state_dict(self) -> dict[str, int]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


def batches_once(
    src_ids: Sequence[Sequence[int]],
    tgt_ids: Sequence[Sequence[int]],
    pad_id: int,
    bos_id: int,
    eos_id: int,
    batch_size: int | None = 32,
    max_tokens: int | None = None,
    max_len: int | None = 256,
) -> Iterator[Batch]:
    """One pass over every pair exactly once, shortest first, each batch with its ``indices``.

    For work that must see each pair once (building a teacher-output cache, validation,
    decoding a test set: ``indices`` restore the original order). Not shuffled, not endless.
    """
    if len(src_ids) != len(tgt_ids):
        raise ValueError(f"{len(src_ids)} sources but {len(tgt_ids)} targets")
    if batch_size is None and max_tokens is None:
        raise ValueError("give batch_size, max_tokens or both")
    src_len, tgt_len = (
        _truncated_lengths(src_ids, max_len),
        _truncated_lengths(tgt_ids, max_len),
    )
    width = [max(s, t) + 1 for s, t in zip(src_len, tgt_len)]
    order = sorted(range(len(src_ids)), key=width.__getitem__)
    for idx in _cut(order, width, batch_size, max_tokens):
        yield make_batch(
            [src_ids[i] for i in idx],
            [tgt_ids[i] for i in idx],
            pad_id,
            bos_id,
            eos_id,
            max_len=max_len,
            indices=idx,
        )
