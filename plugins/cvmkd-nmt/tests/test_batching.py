"""Tests for cvmkd_nmt.data.batching: tensors, bucketing, token budgets and exact resumption."""

from __future__ import annotations

import random
from itertools import islice
from pathlib import Path

import pytest
import torch

from cvmkd_nmt.data.batching import (
    Batch,
    BatchStream,
    BucketBatchSampler,
    batches_once,
    make_batch,
)

PAD, BOS, EOS = 0, 1, 2


def fake_corpus(n: int = 500, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    rng = random.Random(seed)
    src = [[rng.randrange(4, 100) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    tgt = [[rng.randrange(4, 100) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    return src, tgt


def test_make_batch_layout() -> None:
    b = make_batch([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], PAD, BOS, EOS, indices=[4, 2])
    assert b.src.tolist() == [[5, 6, 7, EOS], [8, EOS, PAD, PAD]]
    assert b.tgt_in.tolist() == [[BOS, 9, 10, PAD], [BOS, 11, 12, 13]]
    assert b.tgt_out.tolist() == [[9, 10, EOS, PAD], [11, 12, 13, EOS]]
    assert b.n_tokens == 7 == int((b.tgt_out != PAD).sum())
    assert b.src.dtype == torch.long and b.size == 2
    assert b.indices is not None and b.indices.tolist() == [4, 2]
    assert make_batch([[5]], [[6]], PAD, BOS, EOS).indices is None


def test_pad_multiple_rounds_widths_up_within_max_len() -> None:
    b = make_batch([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], PAD, BOS, EOS, pad_multiple=8)
    assert b.src.shape == b.tgt_in.shape == b.tgt_out.shape == (2, 8)
    assert b.src[:, :4].tolist() == [[5, 6, 7, EOS], [8, EOS, PAD, PAD]] and not b.src[:, 4:].any()
    assert b.n_tokens == 7
    # never beyond max_len, never below the longest row
    capped = make_batch([list(range(4, 14))], [[9]], PAD, BOS, EOS, max_len=12, pad_multiple=8)
    assert capped.src.shape == (1, 12) and capped.tgt_out.shape == (1, 8)  # 11 rounds to max_len
    stream = BatchStream(*fake_corpus(), PAD, BOS, EOS, batch_size=16, max_len=30, seed=1, pad_multiple=8)
    for batch in islice(stream, 20):
        for t in (batch.src, batch.tgt_in, batch.tgt_out):
            assert t.shape[1] % 8 == 0 or t.shape[1] == 30


def test_make_batch_truncates_and_keeps_eos() -> None:
    b = make_batch([list(range(4, 20))], [list(range(30, 50))], PAD, BOS, EOS, max_len=5)
    assert b.src.tolist() == [[4, 5, 6, 7, EOS]]
    assert b.tgt_in.tolist() == [[BOS, 30, 31, 32, 33]]
    assert b.tgt_out.tolist() == [[30, 31, 32, 33, EOS]]
    assert b.n_tokens == 5


def test_batch_to_device_keeps_indices() -> None:
    b = make_batch([[5]], [[6]], PAD, BOS, EOS, indices=[0]).to("cpu")
    assert isinstance(b, Batch) and b.indices is not None


def test_fixed_size_batches_cover_epoch_and_bucket_by_length() -> None:
    src, tgt = fake_corpus(1000)
    lengths = [max(len(s), len(t)) for s, t in zip(src, tgt)]
    sampler = BucketBatchSampler(
        [len(s) for s in src],
        [len(t) for t in tgt],
        batch_size=32,
        seed=1,
        chunk_size=320,
        drop_last=False,
    )
    n = len(sampler)
    epoch0 = list(islice(sampler, n))
    assert sorted(i for b in epoch0 for i in b) == list(range(1000))
    assert sum(len(b) == 32 for b in epoch0) == n - 1  # one short batch at the end of the epoch
    assert sampler.state_dict() == {"epoch": 0, "index": n, "seed": 1}
    # bucketing: the spread of lengths inside a batch is far below that of a random batch
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch0) / n
    assert spread < 10
    epoch1 = list(islice(sampler, n))
    assert sampler.epoch == 1 and epoch1 != epoch0


def test_drop_last_gives_exactly_batch_size() -> None:
    sampler = BucketBatchSampler([3] * 100, batch_size=32, seed=0)
    batches = list(islice(sampler, 12))
    assert all(len(b) == 32 for b in batches)
    assert len(sampler) == 3
    with pytest.raises(ValueError, match="fewer than one batch"):
        BucketBatchSampler([3] * 10, batch_size=32)


def test_max_tokens_mode() -> None:
    src, tgt = fake_corpus(600)
    widths = [max(len(s), len(t)) + 1 for s, t in zip(src, tgt)]
    sampler = BucketBatchSampler(
        [len(s) for s in src],
        [len(t) for t in tgt],
        batch_size=None,
        max_tokens=400,
        seed=3,
    )
    batches = list(islice(sampler, len(sampler)))
    assert sorted(i for b in batches for i in b) == list(range(600))
    for b in batches:
        assert len(b) * max(widths[i] for i in b) <= 400 or len(b) == 1
    capped = BucketBatchSampler([len(s) for s in src], [len(t) for t in tgt], batch_size=8, max_tokens=400)
    assert max(len(b) for b in islice(capped, 50)) <= 8


def test_same_seed_same_stream_other_seed_other_stream() -> None:
    lens = [random.Random(i).randint(1, 50) for i in range(300)]
    a = list(islice(BucketBatchSampler(lens, seed=5), 30))
    b = list(islice(BucketBatchSampler(lens, seed=5), 30))
    c = list(islice(BucketBatchSampler(lens, seed=6), 30))
    assert a == b and a != c


def test_resume_gives_identical_batches() -> None:
    src, tgt = fake_corpus(300)
    # 300 pairs, batch 32, drop_last: 9 batches per epoch, so 15 batches cross an epoch boundary.
    stream = BatchStream(src, tgt, PAD, BOS, EOS, batch_size=32, max_len=30, seed=11)
    for _ in range(10):
        next(stream)
    state = stream.state_dict()
    assert state == {"epoch": 1, "index": 1, "seed": 11}
    expected = [next(stream) for _ in range(5)]

    resumed = BatchStream(src, tgt, PAD, BOS, EOS, batch_size=32, max_len=30, seed=0)
    resumed.load_state_dict(dict(state))
    got = [next(resumed) for _ in range(5)]
    for e, g in zip(expected, got):
        assert torch.equal(e.src, g.src) and torch.equal(e.tgt_in, g.tgt_in) and torch.equal(e.tgt_out, g.tgt_out)
        assert e.indices is not None and g.indices is not None and torch.equal(e.indices, g.indices)
        assert e.n_tokens == g.n_tokens
    assert resumed.state_dict() == stream.state_dict()


def test_stream_batches_match_their_indices() -> None:
    src, tgt = fake_corpus(100)
    stream = BatchStream(src, tgt, PAD, BOS, EOS, batch_size=16, max_len=None, seed=2)
    b = next(stream)
    assert b.indices is not None
    for row, i in enumerate(b.indices.tolist()):
        assert b.src[row, : len(src[i]) + 1].tolist() == src[i] + [EOS]
        assert b.tgt_out[row, : len(tgt[i]) + 1].tolist() == tgt[i] + [EOS]


def test_bad_state_is_refused() -> None:
    sampler = BucketBatchSampler([3] * 64, batch_size=32)
    with pytest.raises(ValueError, match="lacks"):
        sampler.load_state_dict({"epoch": 0})
    with pytest.raises(ValueError, match="only 2 batches"):
        sampler.load_state_dict({"epoch": 0, "index": 7, "seed": 0})


def test_argument_checks() -> None:
    with pytest.raises(ValueError):
        BucketBatchSampler([1, 2], batch_size=None, max_tokens=None)
    with pytest.raises(ValueError):
        BucketBatchSampler([], batch_size=1)
    with pytest.raises(ValueError):
        BucketBatchSampler([1, 2], [1], batch_size=1)


def test_batches_once_covers_every_pair_once() -> None:
    src, tgt = fake_corpus(250)
    batches = list(batches_once(src, tgt, PAD, BOS, EOS, batch_size=32, max_len=20))
    seen = [i for b in batches for i in (b.indices.tolist() if b.indices is not None else [])]
    assert sorted(seen) == list(range(250))
    assert [b.size for b in batches] == [32] * 7 + [26]
    assert all(b.src.shape[1] <= 20 and b.tgt_out.shape[1] <= 20 for b in batches)
    by_tokens = list(batches_once(src, tgt, PAD, BOS, EOS, batch_size=None, max_tokens=300))
    assert sum(b.size for b in by_tokens) == 250


def test_end_to_end_with_tokenizer(tmp_path: Path) -> None:
    from cvmkd_nmt.data.readers import Pair
    from cvmkd_nmt.data.tokenizer import train_tokenizer

    pairs = [Pair(f"le chat {i} dort", f"the cat {i} sleeps") for i in range(64)]
    tok = train_tokenizer(pairs, vocab_size=30, cache_dir=tmp_path)
    src, tgt = tok.encode_pairs(pairs)
    stream = BatchStream(src, tgt, tok.pad_id, tok.bos_id, tok.eos_id, batch_size=32, seed=0)
    b = next(stream)
    assert b.indices is not None
    assert tok.decode(b.tgt_out) == [pairs[i].tgt for i in b.indices.tolist()]
    assert tok.decode(b.src) == [pairs[i].src for i in b.indices.tolist()]
