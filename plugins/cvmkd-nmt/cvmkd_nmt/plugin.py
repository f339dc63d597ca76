"""The core's own components: the "cvm" transformer and corpora read from files."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import attrs

from cvmkd_core.config import ConfigValueError, ge, gt, one_of
from cvmkd_core.hookspecs import hookimpl
from cvmkd_nmt.contracts import CorpusSplits
from cvmkd_nmt.errors import CorpusError
from cvmkd_nmt.model.presets import PRESETS


@attrs.frozen
class TokenizerConfig:
    """``[tokenizer]``: the joint SentencePiece vocabulary shared by teacher and student."""

    vocab_size: int = attrs.field(default=8000, validator=gt(4))
    model_type: str = attrs.field(default="unigram", validator=one_of("unigram", "bpe"))
    max_sentences: int = attrs.field(default=2_000_000, validator=ge(0))
    """the vocabulary is trained on at most this many sentences (both sides of the training pairs
    count), a seeded sample above it; 0: every sentence"""


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

    def model_config(self, vocab_size: int, special_ids: dict[str, int] | None = None) -> Any:
        from cvmkd_nmt.model.presets import preset

        overrides = {
            f.name: getattr(self.spec, f.name)
            for f in attrs.fields(CvmSpec)
            if f.name != "preset" and getattr(self.spec, f.name) is not None
        }
        return preset(self.spec.preset, vocab_size=vocab_size, **overrides, **(special_ids or {}))

    def build(self, vocab_size: int, special_ids: dict[str, int] | None = None) -> Any:
        """The model for a vocabulary of ``vocab_size``; ``special_ids`` (``pad_id``, ``bos_id``,
        ``eos_id``) are the tokenizer's, when they are not SentencePiece's 0, 1, 2."""
        from cvmkd_nmt.model.transformer import CvmTransformer

        return CvmTransformer(self.model_config(vocab_size, special_ids))


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
        from cvmkd_nmt.data.readers import read_jsonl, read_parallel, read_tsv

        c = self.config
        if c.format == "tsv":
            return read_tsv(path, exact=True)
        if c.format == "jsonl":
            return read_jsonl(path)
        return read_parallel(f"{path}.{c.source_lang}", f"{path}.{c.target_lang}")

    def load(self) -> CorpusSplits:
        from cvmkd_nmt.data.readers import filter_pairs, split_pairs

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
        before = len(train)
        train, dropped = filter_pairs(train, max_len=c.max_words, max_ratio=c.max_ratio)
        if dropped:
            logging.getLogger("cvmkd").warning(
                "%s: dropped %d of %d training pairs longer than max_words = %d words or with a length "
                "ratio above max_ratio = %g",
                c.train,
                dropped,
                before,
                c.max_words,
                c.max_ratio,
            )
        if not train:
            raise CorpusError(f"{c.train}: no training pairs left after length filtering")
        copies = sum(1 for pair in train if pair.src == pair.tgt)
        if copies:
            logging.getLogger("cvmkd").warning(
                "%s: %d of %d training pairs have identical source and target (untranslated copies?)",
                c.train,
                copies,
                len(train),
            )
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
    # the kinds of component translation needs, which other plugins provide
    register.kind("corpus", "a source of training and held-out sentence pairs")
    register.kind("model", "a translation model architecture")
    register.kind("package", "a model folder shipped with a plugin, accepted by name wherever a model folder is")
    register.kind("loader", "a model format read from a folder: recognizes(folder), load(folder, device)")
    register.kind(
        "exporter",
        "an export format: export(package, out, quantization=None), recognizes(folder), translator(folder, device)",
    )
    register.kind("quantizer", "a quantization backend for a trained model")
    register.model("cvm", CvmModel, config=CvmSpec)
    register.corpus("files", FilesCorpus, config=FilesConfig)
    register.section("tokenizer", TokenizerConfig)
    # the recipe keys that select a corpus and the formats the finished model is exported to
    # ([[exports]] name = "ctranslate2")
    register.slot("corpus", "corpus")
    register.slot("exports", "exporter", many=True)


# --- commands and the run's outcome ---------------------------------------------------------------


def _translate_arguments(parser: Any) -> None:
    parser.add_argument(
        "--model",
        required=True,
        metavar="DIR",
        help="a model package (runs/NAME/model, runs/NAME/model-SCHEME) or the name of an installed one",
    )
    parser.add_argument("--input", "-i", default="-", metavar="FILE", help="one sentence per line (default: stdin)")
    parser.add_argument(
        "--output", "-o", default="-", metavar="FILE", help="one translation per line (default: stdout)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=32, metavar="N", help="sentences decoded together (default 32)"
    )
    parser.add_argument(
        "--beam-size", type=int, default=1, metavar="N", help="1: greedy decoding (default); >1: beam search"
    )
    parser.add_argument("--device", default="cpu", metavar="DEVICE", help="cpu (default), cuda, or auto")
    for side, example in (("source", "fra_Latn"), ("target", "eng_Latn")):
        parser.add_argument(
            f"--{side}-lang",
            default="",
            metavar="CODE",
            help=f"a multilingual Hugging Face model's {side} language code (NLLB: {example})",
        )


def _translate(args: Any) -> int:
    from cvmkd_nmt.model.translate import translate_command

    return translate_command(args)


def _export_arguments(parser: Any) -> None:
    parser.add_argument("model", metavar="MODEL", help="a model package (runs/NAME/model) or an installed one's name")
    parser.add_argument("--format", required=True, metavar="NAME", help="an installed export format (ctranslate2)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the folder to write (must not exist, see --force)")
    parser.add_argument(
        "--quantization", metavar="TYPE", help="the format's weight type (ctranslate2: int8, float32...)"
    )
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")


def _export(args: Any) -> int:
    """``cvmkd export MODEL --format NAME --out DIR``: a model package in another format."""
    from cvmkd_core.errors import CvmkdError
    from cvmkd_core.plugins import build_plugins
    from cvmkd_nmt.model.package import resolve_package

    registry = build_plugins().registry
    exporter = registry.get("exporter", args.format).create()  # an unknown format names the installed ones
    package = resolve_package(args.model, registry)
    out = Path(args.out)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not args.force:
        raise CvmkdError(f"--out {out} exists already; pass --force to replace it")
    info = exporter.export(package, out, quantization=args.quantization)
    print(f"{out}: {args.format} ({info.get('quantization', '')}), {info.get('size_bytes', 0) / 1e6:.1f} MB")
    return 0


@hookimpl
def cvmkd_register_commands(cli: Any) -> None:
    cli.command(
        "translate",
        help="translate text with a model package (fp32 or quantized) or an export (CTranslate2)",
        configure=_translate_arguments,
        run=_translate,
    )
    cli.command(
        "export",
        help="write a model package in another format (an installed exporter: ctranslate2)",
        configure=_export_arguments,
        run=_export,
    )
