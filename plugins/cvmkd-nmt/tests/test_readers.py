"""Tests for cvmkd_nmt.data.readers: corpus formats, error messages, filtering and splitting."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from cvmkd_core.errors import CvmkdError
from cvmkd_nmt.data.readers import (
    Pair,
    PairList,
    filter_pairs,
    read_jsonl,
    read_parallel,
    read_sources,
    read_tsv,
    split_pairs,
)
from cvmkd_nmt.errors import CorpusError


def write(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


# --- TSV -----------------------------------------------------------------------------------


def test_tsv_reads_pairs_strips_whitespace_and_crlf(tmp_path: Path) -> None:
    f = write(tmp_path / "train.tsv", "  le chat \t the cat\r\nbonjour\tHello  \r\n")
    pairs = read_tsv(f)
    assert pairs == [Pair("le chat", "the cat"), Pair("bonjour", "Hello")]
    assert isinstance(pairs, list) and isinstance(pairs, PairList) and pairs.skipped == 0
    assert pairs[0].src == "le chat" and pairs[0].tgt == "the cat"


def test_tsv_without_final_newline_and_with_bom(tmp_path: Path) -> None:
    f = write(tmp_path / "a.tsv", b"\xef\xbb\xbfa\tb\nc\td")
    assert read_tsv(f) == [Pair("a", "b"), Pair("c", "d")]


def test_tsv_columns_and_extra_fields(tmp_path: Path) -> None:
    f = write(tmp_path / "scored.tsv", "0.9\tsrc one\ttgt one\n0.8\tsrc two\ttgt two\n")
    assert read_tsv(f, src_col=1, tgt_col=2) == [
        Pair("src one", "tgt one"),
        Pair("src two", "tgt two"),
    ]
    # swapping columns reverses the direction
    assert read_tsv(f, src_col=2, tgt_col=1)[0] == Pair("tgt one", "src one")


def test_tsv_does_not_split_on_unicode_line_separators(tmp_path: Path) -> None:
    # U+2028 and U+0085 are line breaks for str.splitlines but must stay inside a sentence.
    f = write(tmp_path / "u.tsv", "a\u2028b\tc\u0085d\ne\tf\n")
    assert len(read_tsv(f)) == 2


def test_tsv_wrong_field_count(tmp_path: Path) -> None:
    f = write(tmp_path / "train.tsv", "a\tb\nc\td\ne\tf\ng\th\nonly one field\n")
    with pytest.raises(
        CorpusError,
        match=r"train\.tsv: line 5: expected 2 tab-separated fields, got 1$",
    ):
        read_tsv(f)


def test_tsv_empty_target_is_error_or_skipped(tmp_path: Path) -> None:
    f = write(tmp_path / "train.tsv", "a\tb\nc\t   \n\te\nf\tg\n")
    with pytest.raises(CorpusError, match=r"train\.tsv: line 2: empty target side$"):
        read_tsv(f)
    pairs = read_tsv(f, skip_empty=True)
    assert pairs == [Pair("a", "b"), Pair("f", "g")]
    assert pairs.skipped == 2


def test_tsv_empty_source_and_blank_line(tmp_path: Path) -> None:
    f = write(tmp_path / "x.tsv", "a\tb\n\tc\n")
    with pytest.raises(CorpusError, match=r"line 2: empty source side"):
        read_tsv(f)
    g = write(tmp_path / "y.tsv", "a\tb\n\nc\td\n")
    with pytest.raises(CorpusError, match=r"y\.tsv: line 2: empty line"):
        read_tsv(g)
    assert read_tsv(g, skip_empty=True).skipped == 1


def test_tsv_skip_logs_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = write(tmp_path / "x.tsv", "a\tb\nc\t\n")
    with caplog.at_level(logging.WARNING, logger="cvmkd"):
        read_tsv(f, skip_empty=True)
    assert "skipped 1 pairs" in caplog.text


def test_invalid_utf8_names_line_and_byte(tmp_path: Path) -> None:
    f = write(tmp_path / "corpus.tsv", b"ok\tfine\nabc\xe9\tx\n")
    with pytest.raises(
        CorpusError,
        match=r"corpus\.tsv: line 2: invalid UTF-8 \(byte 0xe9 at column 4\)$",
    ):
        read_tsv(f)


def test_empty_file_and_missing_file(tmp_path: Path) -> None:
    f = write(tmp_path / "x.tsv", "")
    with pytest.raises(CorpusError, match=r"x\.tsv: no sentence pairs \(empty file\)$"):
        read_tsv(f)
    missing = tmp_path / "nope.tsv"
    with pytest.raises(CorpusError, match=r"^no such corpus file: .*nope\.tsv$"):
        read_tsv(missing)


def test_all_lines_skipped_is_an_error(tmp_path: Path) -> None:
    f = write(tmp_path / "x.tsv", "a\t\n\tb\n")
    with pytest.raises(CorpusError, match="no sentence pairs"):
        read_tsv(f, skip_empty=True)


def test_corpus_error_is_a_cvmkd_error_with_one_line(tmp_path: Path) -> None:
    f = write(tmp_path / "x.tsv", "a\n")
    with pytest.raises(CvmkdError) as info:
        read_tsv(f)
    assert len(info.value.lines()) == 1


# --- two aligned files ----------------------------------------------------------------------


def test_parallel_files(tmp_path: Path) -> None:
    fr = write(tmp_path / "a.fr", "le chat\nle chien\n")
    en = write(tmp_path / "a.en", "the cat\r\nthe dog\r\n")
    assert read_parallel(fr, en) == [
        Pair("le chat", "the cat"),
        Pair("le chien", "the dog"),
    ]


def test_parallel_line_count_mismatch(tmp_path: Path) -> None:
    fr = write(tmp_path / "a.fr", "x\n" * 120)
    en = write(tmp_path / "a.en", "y\n" * 118)
    with pytest.raises(CorpusError, match=r"a\.fr has 120 lines but .*a\.en has 118$"):
        read_parallel(fr, en)


def test_parallel_empty_side_names_the_right_file(tmp_path: Path) -> None:
    fr = write(tmp_path / "a.fr", "x\ny\nz\n")
    en = write(tmp_path / "a.en", "x\n \nz\n")
    with pytest.raises(CorpusError, match=r"a\.en: line 2: empty target side"):
        read_parallel(fr, en)
    assert read_parallel(fr, en, skip_empty=True).skipped == 1


def test_parallel_invalid_utf8(tmp_path: Path) -> None:
    fr = write(tmp_path / "corpus.fr", b"ok\nn\xc3\n")
    en = write(tmp_path / "corpus.en", "ok\nno\n")
    with pytest.raises(
        CorpusError,
        match=r"corpus\.fr: line 2: invalid UTF-8 \(byte 0xc3 at column 2\)",
    ):
        read_parallel(fr, en)


# --- JSONL ----------------------------------------------------------------------------------


def test_jsonl_reads_and_custom_keys(tmp_path: Path) -> None:
    rows = [{"src": " a ", "tgt": "b", "extra": 1}, {"src": "c", "tgt": "d"}]
    f = write(tmp_path / "x.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    assert read_jsonl(f) == [Pair("a", "b"), Pair("c", "d")]
    g = write(
        tmp_path / "y.jsonl",
        json.dumps({"fr": "chat", "en": "cat"}, ensure_ascii=False) + "\n",
    )
    assert read_jsonl(g, src_key="fr", tgt_key="en") == [Pair("chat", "cat")]


def test_jsonl_errors(tmp_path: Path) -> None:
    f = write(
        tmp_path / "x.jsonl",
        '{"src": "a", "tgt": "b"}\n{"src": "a", "tgt": "b"}\n{"src": "a"}\n',
    )
    with pytest.raises(CorpusError, match=r'x\.jsonl: line 3: missing key "tgt"$'):
        read_jsonl(f)
    g = write(tmp_path / "bad.jsonl", '{"src": "a", "tgt": \n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl: line 1: invalid JSON"):
        read_jsonl(g)
    h = write(tmp_path / "list.jsonl", '["a", "b"]\n')
    with pytest.raises(CorpusError, match=r"line 1: expected a JSON object, got list"):
        read_jsonl(h)
    i = write(tmp_path / "num.jsonl", '{"src": "a", "tgt": 3}\n')
    with pytest.raises(CorpusError, match=r'line 1: key "tgt" must be a string, got int'):
        read_jsonl(i)
    j = write(tmp_path / "empty.jsonl", '{"src": "a", "tgt": ""}\n{"src": "c", "tgt": "d"}\n')
    with pytest.raises(CorpusError, match=r"empty\.jsonl: line 1: empty target side"):
        read_jsonl(j)
    assert read_jsonl(j, skip_empty=True) == [Pair("c", "d")]


# --- filtering and splitting ----------------------------------------------------------------


def test_filter_pairs_lengths_and_ratio() -> None:
    pairs = [
        Pair("a b c", "x y z"),  # kept
        Pair("a", "x y z w v u t"),  # ratio 7
        Pair(" ".join(["w"] * 30), " ".join(["w"] * 28)),  # too long for max_len=20
        Pair("a b", "x y"),  # kept
    ]
    kept, dropped = filter_pairs(pairs, min_len=1, max_len=20, max_ratio=3.0)
    assert kept == [pairs[0], pairs[3]] and dropped == 2
    kept, dropped = filter_pairs(pairs, max_len=None, max_ratio=None)
    assert dropped == 0
    kept, dropped = filter_pairs(pairs, min_len=3, max_len=None, max_ratio=None)
    assert kept == [pairs[0], pairs[2]]
    with pytest.raises(ValueError):
        filter_pairs(pairs, max_ratio=0.5)


def test_split_is_deterministic_disjoint_and_complete() -> None:
    pairs = [Pair(f"s{i}", f"t{i}") for i in range(100)]
    train, valid, test = split_pairs(pairs, valid_size=10, test_size=5, seed=7)
    assert (len(train), len(valid), len(test)) == (85, 10, 5)
    assert sorted(train + valid + test) == sorted(pairs)
    assert not set(train) & set(valid) and not set(train) & set(test) and not set(valid) & set(test)
    assert split_pairs(pairs, 10, 5, seed=7) == (train, valid, test)
    assert split_pairs(pairs, 10, 5, seed=8) != (train, valid, test)
    # parts keep the input order
    assert train == sorted(train, key=lambda p: int(p.src[1:]))


def test_split_refuses_no_training_data() -> None:
    pairs = [Pair(f"s{i}", f"t{i}") for i in range(10)]
    with pytest.raises(
        CorpusError,
        match="corpus has 10 pairs: valid_size=5 \\+ test_size=5 leaves no training data",
    ):
        split_pairs(pairs, 5, 5, seed=1)
    with pytest.raises(CorpusError, match="must not be negative"):
        split_pairs(pairs, -1, 2, seed=1)
    assert len(split_pairs(pairs, 0, 0, seed=1)[0]) == 10


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst"])
def test_every_format_reads_the_same_pairs_plain_gzip_or_zstd(tmp_path: Path, suffix: str) -> None:
    """The files are streamed through gzip or zstd by their names, with the same line rules:
    a BOM, CRLF, no final newline, a U+2028 inside a sentence."""
    import gzip

    import zstandard

    def write(name: str, text: str) -> Path:
        data = text.encode()
        if suffix == ".gz":
            data = gzip.compress(data)
        elif suffix == ".zst":
            data = zstandard.ZstdCompressor().compress(data)
        path = tmp_path / f"{name}{suffix}"
        path.write_bytes(data)
        return path

    tsv = write("c.tsv", "\ufeffLe chat\tThe cat\r\nun\u2028deux\tone two")
    assert read_tsv(tsv) == [("Le chat", "The cat"), ("un\u2028deux", "one two")]
    src, tgt = write("c.fr", "a\nb\n"), write("c.en", "x\ny\n")
    assert read_parallel(src, tgt) == [("a", "x"), ("b", "y")]
    jsonl = write("c.jsonl", '{"src": "a", "tgt": "x"}\n')
    assert read_jsonl(jsonl) == [("a", "x")]
    assert read_sources(write("s.tsv", "a\tx\nb\ty\n")) == ["a", "b"]
    assert read_sources(write("s.jsonl", '{"src": "a"}\n')) == ["a"]
    assert read_sources(write("s.txt", "one\n\ntwo\n")) == ["one", "two"]


@pytest.mark.parametrize("suffix", [".gz", ".zst"])
def test_a_cut_compressed_file_is_one_line_naming_it(tmp_path: Path, suffix: str) -> None:
    import gzip

    import zstandard

    text = "".join(f"source {i}\ttarget {i}\n" for i in range(2000)).encode()
    data = gzip.compress(text) if suffix == ".gz" else zstandard.ZstdCompressor().compress(text)
    path = tmp_path / f"cut.tsv{suffix}"
    path.write_bytes(data[: len(data) // 2])
    kind = "gzip" if suffix == ".gz" else "zstd"
    with pytest.raises(CorpusError, match=rf"^{path}: not a complete {kind} file \("):
        read_tsv(path)


def test_a_large_file_is_streamed_not_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader never takes the whole file (Path.read_bytes is not called)."""

    def refuse(self: Path) -> bytes:
        raise AssertionError(f"{self} read whole")

    path = tmp_path / "big.tsv"
    path.write_text("".join(f"s{i}\tt{i}\n" for i in range(5000)))
    monkeypatch.setattr(Path, "read_bytes", refuse)
    assert len(read_tsv(path)) == 5000


def test_a_zstd_file_of_several_frames_reads_whole(tmp_path: Path) -> None:
    """As parallel compressors (pzstd, zstd -T) write them: frame after frame."""
    import zstandard

    compressor = zstandard.ZstdCompressor()
    path = tmp_path / "frames.tsv.zst"
    path.write_bytes(b"".join(compressor.compress(f"s{i}\tt{i}\n".encode()) for i in range(50)))
    assert read_tsv(path) == [(f"s{i}", f"t{i}") for i in range(50)]
