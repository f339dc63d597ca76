"""``TokenRows``: encoded sentences held flat, read back as the lists they were built from, and
batched exactly as lists are."""

from __future__ import annotations

import pickle
import random
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from cvmkd_nmt.data import tokens
from cvmkd_nmt.data.batching import BatchStream, batches_once
from cvmkd_nmt.data.tokens import TokenRows

PAD, BOS, EOS = 0, 1, 2


def corpus(n: int, high: int = 100, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, high) for _ in range(rng.randint(0, 30))] for _ in range(n)]


def test_rows_read_back_as_the_lists_they_were_built_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "ENCODE_CHUNK", 7)  # several chunks, joined
    rows = corpus(50)
    flat = TokenRows.from_rows(iter(rows))
    assert len(flat) == 50 and list(flat) == rows and flat == rows
    assert [flat[i] for i in range(50)] == rows and flat[-1] == rows[-1]
    assert flat.lengths().tolist() == [len(r) for r in rows]
    assert flat[10:20] == rows[10:20] and flat[::3] == rows[::3] and flat[5:2] == []
    with pytest.raises(IndexError):
        flat[50]
    assert flat != rows[:-1] and flat != [*rows[:-1], [99]]
    assert pickle.loads(pickle.dumps(flat)) == rows


def test_ids_take_the_smallest_type_that_holds_them() -> None:
    assert TokenRows.from_rows([[1, 65_535]]).ids.dtype == np.uint16
    big = TokenRows.from_rows([[1, 65_536]])
    assert big.ids.dtype == np.int32 and big == [[1, 65_536]]
    joined = TokenRows.from_rows([[5]]) + big  # the wider type wins
    assert joined.ids.dtype == np.int32 and joined == [[5], [1, 65_536]]
    assert TokenRows.from_rows([]) == [] and len(TokenRows.from_rows([[]])) == 1


def test_joining_with_lists_on_either_side() -> None:
    a, b = corpus(5, seed=1), corpus(4, seed=2)
    flat = TokenRows.from_rows(a)
    assert isinstance(flat + b, TokenRows) and flat + b == a + b
    assert isinstance(b + flat, TokenRows) and b + flat == b + a
    assert flat + flat + b == a + a + b


def test_encoding_in_chunks_gives_the_ids_of_one_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "ENCODE_CHUNK", 4)
    texts = [" ".join(str(i) for i in range(n)) for n in range(11)]
    calls: list[int] = []

    def encode(batch: list[str]) -> list[list[int]]:
        calls.append(len(batch))
        return [[int(w) + 3 for w in t.split()] for t in batch]

    assert TokenRows.encode(encode, texts) == encode(texts)
    assert calls[:-1] == [4, 4, 3]


def test_a_token_costs_two_bytes_not_a_python_int() -> None:
    rows = corpus(2_000, high=30_000)
    flat = TokenRows.from_rows(rows)
    tokens_count = sum(map(len, rows))
    assert flat.nbytes == 2 * tokens_count + 8 * (len(rows) + 1)


def test_batches_from_rows_equal_batches_from_lists() -> None:
    src, tgt = corpus(300, seed=3), corpus(300, seed=4)
    src = [s or [7] for s in src]
    lists = BatchStream(src, tgt, PAD, BOS, EOS, batch_size=16, max_len=20, seed=9)
    flat = BatchStream(
        TokenRows.from_rows(src), TokenRows.from_rows(tgt), PAD, BOS, EOS, batch_size=16, max_len=20, seed=9
    )
    for a, b in zip(islice(lists, 40), islice(flat, 40)):
        assert torch.equal(a.src, b.src) and torch.equal(a.tgt_in, b.tgt_in) and torch.equal(a.tgt_out, b.tgt_out)
        assert a.indices is not None and b.indices is not None and torch.equal(a.indices, b.indices)
    once_lists = list(batches_once(src, tgt, PAD, BOS, EOS, batch_size=None, max_tokens=200, max_len=12))
    once_flat = list(
        batches_once(
            TokenRows.from_rows(src),
            TokenRows.from_rows(tgt),
            PAD,
            BOS,
            EOS,
            batch_size=None,
            max_tokens=200,
            max_len=12,
        )
    )
    assert len(once_lists) == len(once_flat)
    assert all(torch.equal(a.src, b.src) and torch.equal(a.tgt_out, b.tgt_out) for a, b in zip(once_lists, once_flat))


def test_saved_rows_come_back_memory_mapped_and_checked(tmp_path: Path) -> None:
    from cvmkd_nmt.cache import CacheError

    rows = corpus(40, high=40_000, seed=5)
    prefix = tmp_path / "cache" / "src"
    assert TokenRows.load(prefix, "cached token ids") is None  # nothing saved yet
    TokenRows.from_rows(rows).save(prefix)
    loaded = TokenRows.load(prefix, "cached token ids")
    assert loaded is not None and loaded == rows and isinstance(loaded.ids, np.memmap)
    ids_file, offsets_file = TokenRows.files(prefix)
    data = bytearray(ids_file.read_bytes())
    data[-1] ^= 0x01
    ids_file.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"cached token ids .*src\.ids\.npy does not match the sha256"):
        TokenRows.load(prefix, "cached token ids")
    offsets_file.with_name(offsets_file.name + ".sha256").unlink()  # a write cut before its record
    ids_file.unlink()
    assert TokenRows.load(prefix, "cached token ids") is None


def test_a_checked_note_that_cannot_be_written_is_a_warning_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import errno

    import cvmkd_nmt.cache as cache
    from cvmkd_core.errors import WriteError

    def full(path: Path, text: str) -> None:
        raise WriteError(path, OSError(errno.ENOSPC, "No space left on device"))

    TokenRows.from_rows([[5, 6]]).save(tmp_path / "src")  # written and noted as checked
    monkeypatch.setattr(cache, "atomic_write_text", full)
    (tmp_path / "src.ids.npy.checked").unlink()
    with caplog.at_level("WARNING", logger="cvmkd"):
        assert TokenRows.load(tmp_path / "src", "cached token ids") == [[5, 6]]  # hashed, used
    assert any(
        "cannot write" in r.message and "src.ids.npy.checked: No space left on device" in r.message
        for r in caplog.records
    )
