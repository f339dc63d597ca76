"""Tests for cvmkd_nmt.data.tokenizer: joint SentencePiece training, caching, determinism, encode/decode."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest

from cvmkd_core.errors import ModelError
from cvmkd_nmt.data.readers import Pair
from cvmkd_nmt.data.tokenizer import MODEL_FILENAME, Tokenizer, train_tokenizer
from cvmkd_nmt.errors import CorpusError

FR = [
    "le chat mange la souris",
    "le chien dort dans la maison",
    "la maison est grande",
    "un oiseau chante",
]
EN = [
    "the cat eats the mouse",
    "the dog sleeps in the house",
    "the house is big",
    "a bird sings",
]


def corpus(n: int = 40) -> list[Pair]:
    # Repeated with numbers so the text holds enough distinct pieces for a vocabulary of 50.
    return [Pair(f"{FR[i % 4]} {i}", f"{EN[i % 4]} {i}") for i in range(n)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_tokenizer(corpus(), vocab_size=50, cache_dir=tmp_path_factory.mktemp("cache"))


def test_special_ids_and_vocab(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == 50
    assert tok.id_to_piece(0) == "<pad>" and tok.id_to_piece(2) == "</s>"
    assert len(tok.sha256) == 64 and tok.from_cache is False


def test_vocabulary_is_joint(tok: Tokenizer) -> None:
    # Words of both languages are covered without unknowns.
    ids = tok.encode(["le chat", "the cat"])
    assert all(tok.unk_id not in row for row in ids)


def test_encode_is_batched_without_bos_eos_and_decode_round_trips(
    tok: Tokenizer,
) -> None:
    texts = ["le chat mange la souris 3", "the house is big"]
    ids = tok.encode(texts)
    assert len(ids) == 2 and all(isinstance(i, int) for row in ids for i in row)
    assert all(tok.bos_id not in row and tok.eos_id not in row for row in ids)
    assert tok.decode(ids) == texts
    padded = [
        [tok.bos_id, *ids[0], tok.eos_id, tok.pad_id, tok.pad_id],
        [*ids[1], tok.eos_id],
    ]
    assert tok.decode(padded) == texts
    with pytest.raises(TypeError):
        tok.encode("not a list")  # type: ignore[arg-type]


def test_decode_accepts_tensor_rows(tok: Tokenizer) -> None:
    torch = pytest.importorskip("torch")
    ids = tok.encode(["a bird sings"])
    t = torch.tensor([[tok.bos_id, *ids[0], tok.eos_id, tok.pad_id]])
    assert tok.decode(t) == ["a bird sings"]


def test_unknown_characters_map_to_unk(tok: Tokenizer) -> None:
    assert tok.unk_id in tok.encode(["日本"])[0]


def test_cache_hit_loads_instead_of_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = train_tokenizer(corpus(), vocab_size=50, cache_dir=tmp_path)
    with caplog.at_level(logging.INFO, logger="cvmkd"):
        second = train_tokenizer(corpus(), vocab_size=50, cache_dir=tmp_path)
    assert second.from_cache and not first.from_cache
    assert "using cached model" in caplog.text
    assert second.sha256 == first.sha256
    assert len(list(tmp_path.glob("*.model"))) == 1
    # a different setting or text is a different cache entry
    third = train_tokenizer(corpus(), vocab_size=45, cache_dir=tmp_path)
    fourth = train_tokenizer(corpus(41), vocab_size=50, cache_dir=tmp_path)
    assert not third.from_cache and not fourth.from_cache
    assert len(list(tmp_path.glob("*.model"))) == 3


def test_training_is_deterministic(tmp_path: Path) -> None:
    a = train_tokenizer(corpus(), vocab_size=50, cache_dir=tmp_path / "a")
    b = train_tokenizer(corpus(), vocab_size=50, cache_dir=tmp_path / "b")
    assert not b.from_cache
    assert a.model_bytes == b.model_bytes


def test_accepts_plain_texts_and_bpe(tmp_path: Path) -> None:
    texts = FR * 10 + EN * 10
    t = train_tokenizer(texts, vocab_size=60, cache_dir=tmp_path, model_type="bpe")
    assert t.vocab_size == 60 and t.decode(t.encode(["the cat"])) == ["the cat"]


def test_vocab_too_large_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        CorpusError,
        match=r"vocab_size 5000 is too large for this training text \(at most \d+ possible\)",
    ):
        train_tokenizer(corpus(8), vocab_size=5000, cache_dir=tmp_path)
    soft = train_tokenizer(corpus(8), vocab_size=5000, cache_dir=tmp_path, hard_vocab_limit=False)
    assert soft.vocab_size < 5000


def test_no_text_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="no non-empty training sentences"):
        train_tokenizer(["", "  "], vocab_size=50, cache_dir=tmp_path)


def test_save_load_keeps_bytes_and_hash(tok: Tokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path / "package")
    assert path == tmp_path / "package" / MODEL_FILENAME
    assert path.read_bytes() == tok.model_bytes
    for source in (path, tmp_path / "package"):
        loaded = Tokenizer.load(source)
        assert loaded.sha256 == tok.sha256
        assert loaded.encode(["le chat"]) == tok.encode(["le chat"])


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such tokenizer model"):
        Tokenizer.load(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a valid SentencePiece model"):
        Tokenizer.load(bad)


def test_pickle_round_trip(tok: Tokenizer) -> None:
    copy = pickle.loads(pickle.dumps(tok))
    assert copy.sha256 == tok.sha256 and copy.encode(["a bird"]) == tok.encode(["a bird"])


def test_above_max_sentences_a_seeded_sample_trains_the_vocabulary(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As large pipelines do: a few million sentences make a vocabulary, not all of them. Below
    the limit every sentence trains it (the key, and so a cached tokenizer, is unchanged); above
    it the same seed draws the same sample, and another seed another."""
    pairs = corpus(40)
    full = train_tokenizer(pairs, vocab_size=40, cache_dir=tmp_path / "a", max_sentences=0)
    below = train_tokenizer(pairs, vocab_size=40, cache_dir=tmp_path / "a", max_sentences=80)
    assert below.from_cache and below.sha256 == full.sha256  # 80 sentences: every one, the same key
    with caplog.at_level(logging.INFO, logger="cvmkd"):
        sampled = train_tokenizer(pairs, vocab_size=40, cache_dir=tmp_path / "b", max_sentences=50)
    assert "a seeded sample of 50 of the 80 training sentences" in caplog.text
    assert not sampled.from_cache and sampled.path is not None and sampled.path.parent == tmp_path / "b"
    again = train_tokenizer(pairs, vocab_size=40, cache_dir=tmp_path / "b", max_sentences=50)
    assert again.from_cache and again.sha256 == sampled.sha256
    other = train_tokenizer(pairs, vocab_size=40, cache_dir=tmp_path / "b", max_sentences=50, seed=7)
    assert not other.from_cache and other.path != sampled.path
