"""Tests of the teacher cache: exact top-k per position, batch order, fingerprints, kd_loss use."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from cvmkd_core.errors import ModelError
from cvmkd_kd.loss import KDConfig, kd_loss
from cvmkd_kd.teacher_cache import TeacherCache, build_teacher_cache
from cvmkd_nmt.cache import CacheError, record_digest

PAD, BOS = 0, 1
FP = "sha256:teacher+corpus+tokenizer"


class TinyTeacher(torch.nn.Module):
    """Position-wise toy model: each target position's logits ignore padding elsewhere."""

    def __init__(self, vocab: int, dim: int = 8) -> None:
        super().__init__()
        with torch.random.fork_rng():  # fixed weights without touching the tests' global RNG
            torch.manual_seed(0)
            self.src_emb = torch.nn.Embedding(vocab, dim)
            self.tgt_emb = torch.nn.Embedding(vocab, dim)
            self.out = torch.nn.Linear(dim, vocab)

    def forward(self, src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        src_mask = (src != PAD).unsqueeze(-1).float()
        ctx = (self.src_emb(src) * src_mask).sum(1) / src_mask.sum(1)
        return self.out(torch.tanh(self.tgt_emb(tgt_in) + ctx[:, None])) * 3


@dataclass
class Batch:
    src: torch.Tensor
    tgt_in: torch.Tensor
    tgt_out: torch.Tensor
    indices: torch.Tensor


def _corpus(n: int, vocab: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        src = torch.randint(2, vocab, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
        tgt = torch.randint(2, vocab, (1 if i == 0 else int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
        pairs.append((src, tgt))
    return pairs


def _pad(seqs: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=PAD)


def _batches(pairs, order: list[int], size: int) -> list[Batch]:
    out = []
    for s in range(0, len(order), size):
        idx = order[s : s + size]
        tgt = [pairs[i][1] for i in idx]
        out.append(
            Batch(
                src=_pad([pairs[i][0] for i in idx]),
                tgt_in=_pad([torch.cat([torch.tensor([BOS]), t[:-1]]) for t in tgt]),
                tgt_out=_pad(tgt),
                indices=torch.tensor(idx),
            )
        )
    return out


def _reference_logits(teacher: TinyTeacher, batch: Batch) -> torch.Tensor:
    with torch.no_grad():
        return teacher(batch.src, batch.tgt_in)


N, V = 9, 11


@pytest.fixture
def setup(tmp_path: Path):
    teacher = TinyTeacher(V).eval()
    pairs = _corpus(N, V)
    build_order = torch.randperm(N, generator=torch.Generator().manual_seed(1)).tolist()
    return (
        teacher,
        pairs,
        _batches(pairs, build_order, size=4),
        tmp_path / "cache" / "teacher",
    )


@pytest.mark.parametrize("k", [1, 4, V])
def test_lookup_returns_teacher_topk_in_any_batch_order(setup, k: int) -> None:
    teacher, pairs, build_batches, path = setup
    built = build_teacher_cache(teacher, build_batches, N, k, path, fingerprint=FP)
    loaded = TeacherCache.load(path, FP)
    # no temp file left behind: the shard, the index, their sha256 and when each was checked
    assert sorted(p.name for p in path.iterdir()) == [
        "index.json",
        "index.json.checked",
        "index.json.sha256",
        "shard-00000.safetensors",
        "shard-00000.safetensors.checked",
        "shard-00000.safetensors.sha256",
    ]
    assert (loaded.k, loaded.vocab_size, loaded.n_pairs) == (k, V, N)
    assert loaded.n_positions == sum(len(t) for _, t in pairs)

    lookup_order = torch.randperm(N, generator=torch.Generator().manual_seed(2)).tolist()
    assert lookup_order != sorted(lookup_order)
    for batch in _batches(pairs, lookup_order, size=3):
        ref_lp, ref_ids = F.log_softmax(_reference_logits(teacher, batch), -1).topk(k, dim=-1)
        mask = batch.tgt_out != PAD
        for cache in (built, loaded):
            lp, ids = cache.lookup(batch.indices, batch.tgt_out, PAD)
            assert lp.shape == ids.shape == (*batch.tgt_out.shape, k)
            assert lp.dtype == torch.float32 and ids.dtype == torch.int64
            assert torch.equal(ids[mask], ref_ids[mask])
            assert torch.equal(lp[mask], ref_lp[mask].half().float())
            assert torch.all(lp[~mask] == 0) and torch.all(ids[~mask] == 0)


def test_stored_layout_and_stats(setup) -> None:
    teacher, pairs, build_batches, path = setup
    k = 3
    cache = build_teacher_cache(teacher, build_batches, N, k, path, fingerprint=FP)
    with safe_open(str(path / "shard-00000.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert f.get_tensor("logprobs").dtype == torch.float16
        assert f.get_tensor("ids").dtype == torch.int16
        offsets = f.get_tensor("offsets")
    assert offsets.tolist() == [
        0,
        *torch.cumsum(torch.tensor([len(t) for _, t in pairs]), 0).tolist(),
    ]
    assert meta["fingerprint"] == FP and meta["k"] == "3" and meta["vocab_size"] == str(V)

    masses, hits = [], []
    for batch in _batches(pairs, list(range(N)), size=N):
        logp = F.log_softmax(_reference_logits(teacher, batch), -1)
        mask = batch.tgt_out != PAD
        top_lp, top_ids = logp[mask].topk(k, dim=-1)
        masses.append(top_lp.exp().sum(-1))
        hits.append((top_ids == batch.tgt_out[mask, None]).any(-1).float())
    assert cache.mean_topk_mass == pytest.approx(float(torch.cat(masses).mean()), rel=1e-5)
    assert cache.reference_in_topk == pytest.approx(float(torch.cat(hits).mean()))
    assert TeacherCache.load(path, FP).stats() == cache.stats()
    assert 0 < cache.mean_topk_mass < 1


def test_large_vocab_uses_int32_ids(tmp_path: Path) -> None:
    vocab = 40_000
    g = torch.Generator().manual_seed(0)
    fixed = torch.randn(2, 3, vocab, generator=g)
    batch = Batch(
        src=torch.ones(2, 2, dtype=torch.long),
        tgt_in=torch.ones(2, 3, dtype=torch.long),
        tgt_out=torch.tensor([[35_000, 39_999, PAD], [5, 6, 7]]),
        indices=torch.tensor([1, 0]),
    )
    path = tmp_path / "big"
    build_teacher_cache(lambda src, tgt_in: fixed, [batch], 2, 2, path, fingerprint=FP)
    cache = TeacherCache.load(path, FP)
    assert cache.id_dtype == torch.int32
    _, ids = cache.lookup(batch.indices, batch.tgt_out, PAD)
    mask = batch.tgt_out != PAD
    assert torch.equal(ids[mask], fixed.topk(2, dim=-1).indices[mask])


def test_fingerprint_mismatch_and_bad_files_are_refused(setup, tmp_path: Path) -> None:
    teacher, _, build_batches, path = setup
    build_teacher_cache(teacher, build_batches, N, 2, path, fingerprint=FP)
    with pytest.raises(ModelError, match=r"was built for fingerprint 'sha256:teacher.*expected 'other'.*rebuild"):
        TeacherCache.load(path, "other")
    with pytest.raises(ModelError, match="does not exist or is unfinished"):
        TeacherCache.load(tmp_path / "missing", FP)
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "shard-00000.safetensors").write_bytes(b"not a safetensors file")
    for name in ("shard-00000.safetensors.sha256", "shard-00000.safetensors.checked"):
        (bad / name).unlink()
    with pytest.raises(ModelError, match="no recorded sha256"):
        TeacherCache.load(bad, FP)
    record_digest(bad / "shard-00000.safetensors")
    with pytest.raises(ModelError, match="unreadable"):
        TeacherCache.load(bad, FP)
    with pytest.raises(ModelError, match=r"teacher vocabulary \(11\) differs from the student's \(12\)"):
        TeacherCache.load(path, FP, student_vocab=12)


def test_rebuild_replaces_the_file(setup) -> None:
    teacher, _, build_batches, path = setup
    build_teacher_cache(teacher, build_batches, N, 2, path, fingerprint="old")
    build_teacher_cache(teacher, build_batches, N, 5, path, fingerprint=FP)
    assert TeacherCache.load(path, FP).k == 5
    assert len(list(path.glob("shard-*.safetensors"))) == 1


def test_an_edited_cache_of_the_same_size_is_refused(setup) -> None:
    teacher, _, build_batches, path = setup
    build_teacher_cache(teacher, build_batches, N, 2, path, fingerprint=FP)
    shard = path / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # one bit of a stored log-probability
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"does not match the sha256 recorded .*; delete it and it is rebuilt"):
        TeacherCache.load(path, FP)


def test_lookup_refuses_mismatched_lengths(setup) -> None:
    teacher, pairs, build_batches, path = setup
    cache = build_teacher_cache(teacher, build_batches, N, 2, path, fingerprint=FP)
    batch = _batches(pairs, [3, 4], size=2)[0]
    longer = F.pad(batch.tgt_out, (0, 1), value=7)  # one extra token in every row
    with pytest.raises(ModelError, match=r"holds \d+ positions for pair 3 but the batch has \d+ non-pad"):
        cache.lookup(batch.indices, longer, PAD)
    with pytest.raises(ValueError, match=r"must lie in \[0, 9\)"):
        cache.lookup(torch.tensor([3, 9]), batch.tgt_out, PAD)


def test_build_refuses_missing_duplicate_pairs_and_training_mode(setup) -> None:
    teacher, pairs, _, path = setup
    with pytest.raises(ValueError, match=r"never seen .*\[8\]"):
        build_teacher_cache(teacher, _batches(pairs, list(range(8)), 3), N, 2, path, fingerprint=FP)
    with pytest.raises(ValueError, match=r"seen twice .*\[2\]"):
        build_teacher_cache(teacher, _batches(pairs, [0, 1, 2, 2, 3], 2), N, 2, path, fingerprint=FP)
    with pytest.raises(ValueError, match=r"seen twice .*\[2\]"):  # across batches
        build_teacher_cache(teacher, _batches(pairs, [0, 2, 1, 3, 2], 2), N, 2, path, fingerprint=FP)
    with pytest.raises(ValueError, match=r"k \(12\) exceeds the teacher vocabulary \(11\)"):
        build_teacher_cache(teacher, _batches(pairs, list(range(N)), 3), N, 12, path, fingerprint=FP)
    with pytest.raises(ValueError, match="training mode"):
        build_teacher_cache(teacher.train(), _batches(pairs, list(range(N)), 3), N, 2, path, fingerprint=FP)
    assert not path.exists() or not any(path.iterdir())


def test_kd_loss_from_cache_equals_full_teacher_when_k_is_vocab(setup) -> None:
    teacher, pairs, build_batches, path = setup
    build_teacher_cache(teacher, build_batches, N, V, path, fingerprint=FP)
    cache = TeacherCache.load(path, FP, student_vocab=V)
    cfg = KDConfig(temperature=2.0, alpha=0.8, beta=0.2)
    g = torch.Generator().manual_seed(3)
    for batch in _batches(pairs, [5, 2, 8, 0, 7, 1, 6, 4, 3], size=5):
        student = torch.randn(*batch.tgt_out.shape, V, generator=g)
        full = kd_loss(student, batch.tgt_out, PAD, _reference_logits(teacher, batch), config=cfg)
        topk = kd_loss(
            student,
            batch.tgt_out,
            PAD,
            teacher_topk=cache.lookup(batch.indices, batch.tgt_out, PAD),
            config=cfg,
        )
        # Only the fp16 storage of the log-probs separates the two.
        torch.testing.assert_close(topk.loss, full.loss, rtol=2e-3, atol=1e-4)
        torch.testing.assert_close(topk.teacher_agreement, full.teacher_agreement)
        assert topk.n_tokens == full.n_tokens


def test_a_forward_returning_the_target_rows_alone_builds_the_same_cache(setup, tmp_path: Path) -> None:
    teacher, pairs, build_batches, path = setup

    def rows_forward(src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        # the target positions are the non-pad decoder inputs (bos + target vs target + eos)
        return teacher(src, tgt_in)[tgt_in != PAD]

    full = build_teacher_cache(teacher, build_batches, N, 4, path, fingerprint=FP)
    rows = build_teacher_cache(rows_forward, build_batches, N, 4, tmp_path / "rows", fingerprint=FP)
    for batch in build_batches:
        a, b = full.lookup(batch.indices, batch.tgt_out, PAD), rows.lookup(batch.indices, batch.tgt_out, PAD)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ModelError, match=r"\(N, V\) for its N non-pad positions"):
        build_teacher_cache(
            lambda s, t: teacher(s, t)[t != PAD][1:], build_batches, N, 4, tmp_path / "x", fingerprint=FP
        )


def _by_range(pairs):  # type: ignore[no-untyped-def]
    """``batches(start, stop)`` for build_teacher_cache: the pairs of a shard, in twos, reversed."""

    def batches(start: int, stop: int) -> list[Batch]:
        return _batches(pairs, list(range(stop - 1, start - 1, -1)), size=2)

    return batches


def test_shards_hold_what_one_file_holds(setup, tmp_path: Path) -> None:
    teacher, pairs, build_batches, path = setup
    whole = build_teacher_cache(teacher, build_batches, N, 3, path, fingerprint=FP)
    calls: list[tuple[int, int]] = []
    sharded = build_teacher_cache(
        teacher, _by_range(pairs), N, 3, tmp_path / "sharded", fingerprint=FP, shard_pairs=4,
        progress=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    assert len(sharded.shards) == 3 and calls == [(4, N), (8, N), (9, N)]
    assert torch.equal(sharded.offsets, whole.offsets) and sharded.stats() == {**whole.stats(), "shards": 3}
    for batch in _batches(pairs, [8, 0, 4, 3, 7, 1, 5, 2, 6], size=9):  # one batch across all shards
        a, b = whole.lookup(batch.indices, batch.tgt_out, PAD), sharded.lookup(batch.indices, batch.tgt_out, PAD)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


class Stopped(Exception):
    """The build stopped in the middle (a kill, a full disk)."""


def test_an_interrupted_build_keeps_its_finished_shards(setup, tmp_path: Path) -> None:
    teacher, pairs, _, _ = setup
    seen: list[int] = []
    stop_at = [3]  # the second shard's first batch, the first time

    def forward(src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        seen.append(src.shape[0])
        if len(seen) == stop_at[0]:
            stop_at[0] = -1
            raise Stopped
        return teacher(src, tgt_in)

    path = tmp_path / "cache"
    with pytest.raises(Stopped):
        build_teacher_cache(forward, _by_range(pairs), N, 2, path, fingerprint=FP, shard_pairs=4)
    assert [p.name for p in path.glob("shard-*.safetensors")] == ["shard-00000.safetensors"]
    assert not (path / "index.json").exists() and not TeacherCache.finished(path)
    seen.clear()
    cache = build_teacher_cache(forward, _by_range(pairs), N, 2, path, fingerprint=FP, shard_pairs=4)
    assert sum(seen) == N - 4  # the first shard's four pairs were not translated again
    whole = build_teacher_cache(teacher, _by_range(pairs), N, 2, tmp_path / "whole", fingerprint=FP, shard_pairs=N)
    batch = _batches(pairs, list(range(N)), size=N)[0]
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            cache.lookup(batch.indices, batch.tgt_out, PAD), whole.lookup(batch.indices, batch.tgt_out, PAD)
        )
    )


def test_a_shard_is_hashed_when_written_and_first_read_not_at_every_load(
    setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cvmkd_nmt.cache as cache_module

    teacher, _, build_batches, path = setup
    build_teacher_cache(teacher, build_batches, N, 2, path, fingerprint=FP)
    hashed: list[str] = []
    real = cache_module.sha256_file
    monkeypatch.setattr(cache_module, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    TeacherCache.load(path, FP)
    assert hashed == []  # checked when written
    (path / "shard-00000.safetensors.checked").unlink()  # as a cache copied from elsewhere
    TeacherCache.load(path, FP)
    TeacherCache.load(path, FP)
    assert hashed == ["shard-00000.safetensors"]  # the first read only


def test_the_cache_is_memory_mapped_not_read(setup) -> None:
    teacher, _, build_batches, path = setup
    cache = build_teacher_cache(teacher, build_batches, N, 2, path, fingerprint=FP)
    shard = (path / "shard-00000.safetensors").resolve()
    where = cache.shards[0].logprobs.data_ptr()
    maps = Path("/proc/self/maps").read_text().splitlines()
    mapped = [line for line in maps if line.endswith(str(shard))]
    assert any(int(a, 16) <= where < int(b, 16) for a, b in (line.split()[0].split("-") for line in mapped))
