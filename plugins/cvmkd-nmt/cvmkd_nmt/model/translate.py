"""Translate text with a cvm model: tokenize, batch by length, decode, detokenize, restore order;
and ``cvmkd translate --model DIR``, which does it for any model package, fp32 or quantized."""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from cvmkd_core.errors import CvmkdError
from cvmkd_nmt.hardware import autocast

log = logging.getLogger("cvmkd")

#: the largest --beam-size: wider beams cost time in proportion and gain nothing measurable
MAX_BEAM = 64

#: lines read before translating when the input is a file or a pipe; sorting by length inside a
#: chunk keeps batches dense while the memory stays bounded for inputs of any size
CHUNK_LINES = 2000


def encode_sources(tokenizer: Any, sources: list[str], max_len: int) -> list[list[int]]:
    """Source ids as a model reads them: cut to ``max_len - 1`` pieces, then end-of-sentence."""
    return [ids[: max_len - 1] + [tokenizer.eos_id] for ids in tokenizer.encode(sources)]


def source_batches(
    tokenizer: Any, sources: list[str], max_len: int, batch_size: int, max_batches: int | None = None
) -> list[torch.Tensor]:
    """``sources`` in order, as padded id tensors of ``batch_size`` rows (the last may be
    shorter); at most ``max_batches``. Used to time decoding and to calibrate quantized models."""
    from cvmkd_nmt.data.batching import pad_rows

    encoded = encode_sources(tokenizer, sources, max_len)
    end = len(encoded) if max_batches is None else min(len(encoded), batch_size * max_batches)
    return [pad_rows(encoded[start : start + batch_size], tokenizer.pad_id) for start in range(0, end, batch_size)]


def decode_batches(
    model: Any,
    encoded: list[list[int]],
    pad_id: int,
    batch_size: int,
    device: torch.device | str,
    decode: Callable[[torch.Tensor, list[int]], list[list[str]]],
) -> list[list[str]]:
    """The one decoding loop every translation goes through (cvm models, Hugging Face models,
    ``cvmkd translate``, validation, the teacher's passes): sentences sorted by length, padded
    batches of ``batch_size``, the model in eval mode and inference mode, the results put back in
    the sources' order. ``decode(src, rows)`` turns a batch (the rows' indices in ``encoded``)
    into each row's n-best texts, best first."""
    from cvmkd_nmt.data.batching import pad_rows

    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[list[str]] = [[] for _ in encoded]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src = pad_rows([encoded[i] for i in chunk], pad_id).to(device)
            with torch.inference_mode():
                texts = decode(src, chunk)
            for i, hyps in zip(chunk, texts):
                results[i] = hyps
    finally:
        model.train(was_training)
    return results


def translate(
    model: Any,
    tokenizer: Any,
    sources: list[str],
    *,
    beam_size: int = 1,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    max_len_a: float = 1.5,
    max_len_b: int = 10,
) -> list[str]:
    """Translations of ``sources`` in their order: greedy, or the best of a beam search. Sentences
    longer than the model's maximum length are cut (their tail is not translated)."""
    lists = _translate(model, tokenizer, sources, beam_size, None, batch_size, device, precision, max_len_a, max_len_b)
    return [hyps[0] if hyps else "" for hyps in lists]


def translate_nbest(
    model: Any,
    tokenizer: Any,
    sources: list[str],
    *,
    beam_size: int,
    nbest: int,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    max_len_a: float = 1.5,
    max_len_b: int = 10,
) -> list[list[str]]:
    """The ``nbest`` best beam-search translations of each of ``sources``, best first."""
    return _translate(model, tokenizer, sources, beam_size, nbest, batch_size, device, precision, max_len_a, max_len_b)


def _translate(
    model: Any,
    tokenizer: Any,
    sources: list[str],
    beam_size: int,
    nbest: int | None,
    batch_size: int,
    device: torch.device | str,
    precision: str,
    max_len_a: float,
    max_len_b: int,
) -> list[list[str]]:
    """``nbest`` None: the one best (greedy with a beam of one); else the n best of a beam
    search. A model of another library (a Hugging Face model) decodes with its own engine
    (``translate_texts``), through the same loop."""
    from cvmkd_nmt.model.decoding import beam_search, beam_search_nbest, greedy_decode

    if hasattr(model, "translate_texts"):  # a model of another library (a Hugging Face teacher)
        return [
            hyps or [""]
            for hyps in model.translate_texts(
                sources,
                beam_size=beam_size,
                nbest=nbest or 1,
                batch_size=batch_size,
                max_len_a=max_len_a,
                max_len_b=max_len_b,
                device=device,
            )
        ]
    device = torch.device(device)

    def decode(src: torch.Tensor, rows: list[int]) -> list[list[str]]:
        with autocast(device, precision):
            if nbest is not None:
                lists = beam_search_nbest(
                    model, src, beam_size=beam_size, nbest=nbest, max_len_a=max_len_a, max_len_b=max_len_b
                )
                return [tokenizer.decode(hyps) if hyps else [""] for hyps in lists]
            if beam_size > 1:
                ids = beam_search(model, src, beam_size=beam_size, max_len_a=max_len_a, max_len_b=max_len_b)
            else:
                ids = greedy_decode(model, src, max_len_a=max_len_a, max_len_b=max_len_b)
        return [[text] for text in tokenizer.decode(ids)]

    encoded = encode_sources(tokenizer, sources, model.config.max_len)
    return decode_batches(model, encoded, tokenizer.pad_id, batch_size, device, decode)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _decoded(lines: Iterable[bytes], name: str) -> Iterator[str]:
    for number, raw in enumerate(lines, 1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CvmkdError(
                f"--input {name}: line {number}: invalid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
            ) from None


def _chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line.rstrip("\r\n"))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


#: where a line too long for the model is split, most preferred first: after the end of a
#: sentence, after a clause, after a comma, then at any space
_BREAKS = (re.compile(r"(?<=[.!?…])\s+"), re.compile(r"(?<=[;:])\s+"), re.compile(r"(?<=,)\s+"), re.compile(r"\s+"))


def split_to_fit(tokenizer: Any, text: str, max_pieces: int, level: int = 0) -> list[str]:
    """``text`` as consecutive segments of at most ``max_pieces`` tokenizer pieces each, split
    at the most natural boundary that makes them fit (sentence, clause, comma, word); a single
    word longer than that is cut into pieces of characters."""
    if len(tokenizer.encode([text])[0]) <= max_pieces:
        return [text]
    if level >= len(_BREAKS):
        half = max(1, len(text) // 2)
        return split_to_fit(tokenizer, text[:half], max_pieces, level) + split_to_fit(
            tokenizer, text[half:], max_pieces, level
        )
    parts = [p for p in _BREAKS[level].split(text) if p]
    if len(parts) == 1:
        return split_to_fit(tokenizer, text, max_pieces, level + 1)
    segments: list[str] = []
    current = ""
    for part in parts:
        joined = f"{current} {part}" if current else part
        if current and len(tokenizer.encode([joined])[0]) > max_pieces:
            segments.extend(split_to_fit(tokenizer, current, max_pieces, level + 1))
            current = part
        else:
            current = joined
    if current:
        segments.extend(split_to_fit(tokenizer, current, max_pieces, level + 1))
    return segments


class PackageTranslator:
    """A cvm model package's model and tokenizer, as ``cvmkd translate`` uses them."""

    def __init__(self, model: Any, tokenizer: Any, device: torch.device) -> None:
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.max_len = int(model.config.max_len)

    def translate(self, sources: list[str], beam_size: int = 1, batch_size: int = 32) -> list[str]:
        return translate(
            self.model, self.tokenizer, sources, beam_size=beam_size, batch_size=batch_size, device=self.device
        )


def open_runtime(folder: Path, registry: Any, device: Any, **languages: str) -> tuple[Any, str]:
    """What translates with the model in ``folder``, and its scheme: an export (CTranslate2...)
    on its own engine, recognised by an installed exporter, else a model package (a cvm package,
    or a folder an installed loader reads) as a :class:`PackageTranslator`. Each has
    ``translate(sources, beam_size=, batch_size=)``, ``tokenizer`` and ``max_len``."""
    from cvmkd_nmt.model.package import load_model_folder

    for name in registry.names("exporter"):
        exporter = registry.get("exporter", name).create()
        if exporter.recognizes(folder):
            runtime = exporter.translator(folder, str(device))
            return runtime, f"{name} {runtime.metadata.get('export', {}).get('quantization', '')}".strip()
    model, tokenizer, metadata = load_model_folder(folder, registry, device, **languages)
    scheme = (metadata.get("quantization") or {}).get("scheme") or metadata.get("scheme") or "none"
    return PackageTranslator(model, tokenizer, device), "fp32" if scheme == "none" else scheme


def _translate_lines(runtime: Any, lines: list[str], args: argparse.Namespace, first_line: int = 1) -> list[str]:
    """Translations of ``lines`` by ``runtime`` (a :class:`PackageTranslator`, or an export's
    translator); an empty line stays empty (nothing to translate). A line longer than the model
    reads at once is split into segments that fit (at sentence boundaries where it can), each is
    translated, and the translations are joined: nothing is cut off unseen."""
    tokenizer = runtime.tokenizer
    max_pieces = runtime.max_len - 1  # the end-of-sentence mark takes the last position
    segments: list[str] = []
    owners: list[int] = []
    for i, line in enumerate(lines):
        text = line.strip()
        if not text:
            continue
        parts = split_to_fit(tokenizer, text, max_pieces)
        if len(parts) > 1:
            log.warning(
                "line %d: %d pieces, more than the model reads at once (%d): translated as %d segments",
                first_line + i,
                len(tokenizer.encode([text])[0]),
                max_pieces,
                len(parts),
            )
        segments.extend(parts)
        owners.extend([i] * len(parts))
    outputs: list[list[str]] = [[] for _ in lines]
    if segments:
        done = runtime.translate(segments, beam_size=args.beam_size, batch_size=args.batch_size)
        for i, text in zip(owners, done):
            outputs[i].append(text.replace("\n", " "))
    return [" ".join(parts) for parts in outputs]


def translate_command(args: argparse.Namespace) -> int:
    """``cvmkd translate --model DIR [--input FILE] [--output FILE] [--batch-size N] [--beam-size N]``:
    one translation per input line, in order. A file output is written to a temporary file and
    renamed when complete, so an error never leaves a partial or clobbered file."""
    from cvmkd_core.plugins import build_plugins
    from cvmkd_nmt.hardware import resolve_device
    from cvmkd_nmt.model.package import resolve_package

    for option, value, most in (("--batch-size", args.batch_size, None), ("--beam-size", args.beam_size, MAX_BEAM)):
        if value < 1:
            raise CvmkdError(f"{option} must be at least 1 (got {value})")
        if most is not None and value > most:
            raise CvmkdError(f"{option} must be at most {most} (got {value})")
    if args.input != "-":
        if Path(args.input).is_dir():
            raise CvmkdError(f"--input {args.input}: is a directory")
        if not Path(args.input).exists():  # /dev/null, a named pipe or <(command) are fine
            raise CvmkdError(f"--input {args.input}: no such file")
    if args.output != "-" and Path(args.output).is_dir():
        raise CvmkdError(f"--output {args.output}: is a directory")
    device = resolve_device(args.device, "--device")
    registry = build_plugins().registry
    folder = resolve_package(args.model, registry)  # a folder, or a registered name
    languages = {k: v for k in ("source_lang", "target_lang") if (v := getattr(args, k, ""))}
    runtime, scheme = open_runtime(Path(folder), registry, device, **languages)
    started = time.perf_counter()
    count = 0
    # bytes, decoded line by line: an undecodable line is named, whatever the locale (stdin's
    # default handler would pass such bytes on as surrogates, which the tokenizer cannot take)
    source: IO[bytes] = sys.stdin.buffer if args.input == "-" else open(args.input, "rb")
    name = "stdin" if args.input == "-" else args.input
    try:
        interactive = args.input == "-" and sys.stdin.isatty() and args.output == "-"
        chunks = _chunks(_decoded(source, name), 1 if interactive else CHUNK_LINES)
        if args.output == "-":
            for chunk in chunks:
                for line in _translate_lines(runtime, chunk, args, count + 1):
                    sys.stdout.write(line + "\n")
                sys.stdout.flush()
                count += len(chunk)
        else:
            target = Path(args.output)
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            except OSError as exc:
                raise CvmkdError(f"--output {args.output}: cannot write it ({exc.strerror or exc})") from None
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    for chunk in chunks:
                        translated = _translate_lines(runtime, chunk, args, count + 1)
                        out.writelines(line + "\n" for line in translated)
                        count += len(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                # the permissions an ordinary new file gets, or those of the file it replaces
                os.chmod(tmp, target.stat().st_mode & 0o7777 if target.exists() else 0o666 & ~_umask())
                os.replace(tmp, target)
            except OSError as exc:
                Path(tmp).unlink(missing_ok=True)
                raise CvmkdError(f"--output {args.output}: cannot write it ({exc.strerror or exc})") from None
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    finally:
        if source is not sys.stdin.buffer:
            source.close()
    seconds = time.perf_counter() - started
    log.info(
        "translated %d lines in %.2fs with %s (%s, beam %d, batch %d)",
        count,
        seconds,
        args.model,
        scheme,
        args.beam_size,
        args.batch_size,
    )
    return 0
