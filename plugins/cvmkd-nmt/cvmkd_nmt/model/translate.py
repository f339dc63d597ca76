"""Translate text with a cvm model: tokenize, batch by length, decode, detokenize, restore order;
and ``cvmkd translate --model DIR``, which does it for any model package, fp32 or quantized."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

from cvmkd_core.errors import CvmkdError
from cvmkd_nmt.hardware import autocast

log = logging.getLogger("cvmkd")

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
    """Translations of ``sources`` in their order. Sentences longer than the model's maximum
    length are cut (their tail is not translated)."""
    from cvmkd_nmt.data.batching import pad_rows
    from cvmkd_nmt.model.decoding import beam_search, greedy_decode

    device = torch.device(device)
    encoded = encode_sources(tokenizer, sources, model.config.max_len)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[str] = [""] * len(sources)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src = pad_rows([encoded[i] for i in chunk], tokenizer.pad_id).to(device)
            with torch.inference_mode(), autocast(device, precision):
                if beam_size > 1:
                    ids = beam_search(model, src, beam_size=beam_size, max_len_a=max_len_a, max_len_b=max_len_b)
                else:
                    ids = greedy_decode(model, src, max_len_a=max_len_a, max_len_b=max_len_b)
            for i, text in zip(chunk, tokenizer.decode(ids)):
                results[i] = text
    finally:
        model.train(was_training)
    return results


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
    from cvmkd_nmt.data.batching import pad_rows
    from cvmkd_nmt.model.decoding import beam_search_nbest

    device = torch.device(device)
    encoded = encode_sources(tokenizer, sources, model.config.max_len)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[list[str]] = [[] for _ in sources]
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            src = pad_rows([encoded[i] for i in chunk], tokenizer.pad_id).to(device)
            with torch.inference_mode(), autocast(device, precision):
                lists = beam_search_nbest(
                    model, src, beam_size=beam_size, nbest=nbest, max_len_a=max_len_a, max_len_b=max_len_b
                )
            for i, hyps in zip(chunk, lists):
                results[i] = tokenizer.decode(hyps) if hyps else [""]
    finally:
        model.train(was_training)
    return results


def _chunks(lines: Iterable[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for line in lines:
        chunk.append(line.rstrip("\r\n"))
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _translate_lines(
    model: Any, tokenizer: Any, lines: list[str], args: argparse.Namespace, device: torch.device
) -> list[str]:
    """Translations of ``lines``; an empty line stays empty (nothing to translate)."""
    todo = [i for i, line in enumerate(lines) if line.strip()]
    outputs = [""] * len(lines)
    if todo:
        done = translate(
            model,
            tokenizer,
            [lines[i].strip() for i in todo],
            beam_size=args.beam_size,
            batch_size=args.batch_size,
            device=device,
        )
        for i, text in zip(todo, done):
            outputs[i] = text.replace("\n", " ")
    return outputs


def translate_command(args: argparse.Namespace) -> int:
    """``cvmkd translate --model DIR [--input FILE] [--output FILE] [--batch-size N] [--beam-size N]``:
    one translation per input line, in order. A file output is written to a temporary file and
    renamed when complete, so an error never leaves a partial or clobbered file."""
    from cvmkd_core.plugins import build_plugins
    from cvmkd_nmt.hardware import resolve_device
    from cvmkd_nmt.model.package import load_package, resolve_package

    for option, value in (("--batch-size", args.batch_size), ("--beam-size", args.beam_size)):
        if value < 1:
            raise CvmkdError(f"{option} must be at least 1 (got {value})")
    if args.input != "-" and not Path(args.input).is_file():
        raise CvmkdError(f"--input {args.input}: no such file")
    if args.output != "-" and Path(args.output).is_dir():
        raise CvmkdError(f"--output {args.output}: is a directory")
    device = resolve_device(args.device)
    folder = resolve_package(args.model, build_plugins().registry)  # a folder, or a registered name
    model, tokenizer, metadata = load_package(folder, device)
    scheme = (metadata.get("quantization") or {}).get("scheme") or metadata.get("scheme") or "none"
    scheme = "fp32" if scheme == "none" else scheme
    started = time.perf_counter()
    count = 0
    source: IO[str] = sys.stdin if args.input == "-" else open(args.input, encoding="utf-8")
    try:
        interactive = args.input == "-" and sys.stdin.isatty() and args.output == "-"
        chunks = _chunks(source, 1 if interactive else CHUNK_LINES)
        if args.output == "-":
            for chunk in chunks:
                for line in _translate_lines(model, tokenizer, chunk, args, device):
                    sys.stdout.write(line + "\n")
                sys.stdout.flush()
                count += len(chunk)
        else:
            target = Path(args.output)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    for chunk in chunks:
                        out.writelines(line + "\n" for line in _translate_lines(model, tokenizer, chunk, args, device))
                        count += len(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
    except UnicodeDecodeError as exc:
        raise CvmkdError(f"--input {args.input}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    finally:
        if source is not sys.stdin:
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
