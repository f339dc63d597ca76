"""The core's own components: the "cvm" transformer and corpora read from files."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import attrs

from cvmkd_core.components import CorpusSplits
from cvmkd_core.config import ConfigValueError, ge, gt, one_of
from cvmkd_core.errors import CorpusError
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.model.presets import PRESETS


@attrs.frozen
class CvmSpec:
    """``model = {name = "cvm", preset = "student-cpu", d_model = 256, ...}``: a preset, with any
    dimension overridden. The vocabulary size always comes from the tokenizer."""

    preset: str = attrs.field(default="student-cpu", validator=one_of(*sorted(PRESETS)))
    d_model: int | None = attrs.field(default=None, validator=gt(0))
    n_heads: int | None = attrs.field(default=None, validator=gt(0))
    n_encoder_layers: int | None = attrs.field(default=None, validator=gt(0))
    n_decoder_layers: int | None = attrs.field(default=None, validator=gt(0))
    d_ff: int | None = attrs.field(default=None, validator=gt(0))
    dropout: float | None = attrs.field(default=None, validator=ge(0))
    max_len: int | None = attrs.field(default=None, validator=gt(0))
    tie_embeddings: bool | None = None
    activation: str | None = attrs.field(default=None, validator=one_of("gelu", "relu"))


class CvmModel:
    """The native pre-norm encoder-decoder transformer, with cached incremental decoding."""

    def __init__(self, spec: CvmSpec) -> None:
        self.spec = spec

    def model_config(self, vocab_size: int) -> Any:
        from cvmkd_core.model.presets import preset

        overrides = {
            f.name: getattr(self.spec, f.name)
            for f in attrs.fields(CvmSpec)
            if f.name != "preset" and getattr(self.spec, f.name) is not None
        }
        return preset(self.spec.preset, vocab_size=vocab_size, **overrides)

    def build(self, vocab_size: int) -> Any:
        from cvmkd_core.model.transformer import CvmTransformer

        return CvmTransformer(self.model_config(vocab_size))


@attrs.frozen
class FilesConfig:
    """``[corpus] name = "files"``: a parallel corpus from local files.

    ``format``: ``tsv`` (source TAB target per line), ``jsonl`` (``{"src": ..., "tgt": ...}``)
    or ``parallel`` (two line-aligned files: ``<path>.<source_lang>`` and
    ``<path>.<target_lang>``). Without ``valid``/``test`` files, that many pairs are held out of
    ``train`` at random (seeded).
    """

    train: str = attrs.field(default="")
    valid: str = ""
    test: str = ""
    format: str = attrs.field(default="tsv", validator=one_of("tsv", "jsonl", "parallel"))
    source_lang: str = "src"
    target_lang: str = "tgt"
    valid_size: int = attrs.field(default=1000, validator=ge(0))
    test_size: int = attrs.field(default=1000, validator=ge(0))
    seed: int = attrs.field(default=1234, validator=ge(0))
    max_words: int = attrs.field(default=200, validator=gt(0))
    max_ratio: float = attrs.field(default=3.0, validator=gt(0))

    def __attrs_post_init__(self) -> None:
        if not self.train:
            raise ConfigValueError("train: give the training file (the corpus 'files' reads local files)")


def fingerprint_pairs(*splits: Any) -> str:
    digest = hashlib.sha256()
    for split in splits:
        digest.update(b"\x00split\x00")
        for src, tgt in split:
            digest.update(src.encode())
            digest.update(b"\t")
            digest.update(tgt.encode())
            digest.update(b"\n")
    return digest.hexdigest()


class FilesCorpus:
    """Parallel text from TSV, JSONL or line-aligned file pairs."""

    def __init__(self, config: FilesConfig) -> None:
        self.config = config

    def _read(self, path: str) -> Any:
        from cvmkd_core.data.readers import read_jsonl, read_parallel, read_tsv

        c = self.config
        if c.format == "tsv":
            return read_tsv(path)
        if c.format == "jsonl":
            return read_jsonl(path)
        return read_parallel(f"{path}.{c.source_lang}", f"{path}.{c.target_lang}")

    def load(self) -> CorpusSplits:
        from cvmkd_core.data.readers import filter_pairs, split_pairs

        c = self.config
        train = self._read(c.train)
        valid = self._read(c.valid) if c.valid else None
        test = self._read(c.test) if c.test else None
        held_valid = 0 if valid is not None else c.valid_size
        held_test = 0 if test is not None else c.test_size
        if held_valid or held_test:
            train, split_valid, split_test = split_pairs(train, held_valid, held_test, seed=c.seed)
            valid = valid if valid is not None else split_valid
            test = test if test is not None else split_test
        train, dropped = filter_pairs(train, max_len=c.max_words, max_ratio=c.max_ratio)
        if not train:
            raise CorpusError(f"{c.train}: no training pairs left after length filtering")
        if not valid:
            raise CorpusError(f"{c.valid or c.train}: no validation pairs (set valid or valid_size)")
        return CorpusSplits(
            name=f"files:{Path(c.train).name}",
            source_lang=c.source_lang,
            target_lang=c.target_lang,
            train=list(train),
            valid=list(valid),
            test=list(test or []),
            fingerprint=fingerprint_pairs(train, valid, test or []),
            notes={"filtered_out": dropped},
        )


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.model("cvm", CvmModel, config=CvmSpec)
    register.corpus("files", FilesCorpus, config=FilesConfig)
