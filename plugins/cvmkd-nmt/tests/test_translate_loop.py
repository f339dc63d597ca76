"""One decoding loop: every translation, greedy, beam or n-best, goes through ``decode_batches``,
which sorts by length, batches, restores the order and the model's training mode."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from cvmkd_nmt.data.batching import pad_rows
from cvmkd_nmt.model import beam_search, greedy_decode
from cvmkd_nmt.model import translate as translate_module
from cvmkd_nmt.model.package import load_package
from cvmkd_nmt.model.translate import encode_sources, translate, translate_nbest

SOURCES = ["la maison", "le chat noir dort dans la maison", "", "le chat", "la maison du chat"]


def test_every_translation_goes_through_the_one_loop(
    tiny_teacher_package: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer, _ = load_package(tiny_teacher_package)
    model.train()
    calls: list[int] = []
    original = translate_module.decode_batches

    def counted(*args: Any, **kwargs: Any) -> list[list[str]]:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(translate_module, "decode_batches", counted)
    greedy = translate(model, tokenizer, SOURCES, batch_size=2)
    beam = translate(model, tokenizer, SOURCES, beam_size=3, batch_size=2)
    nbest = translate_nbest(model, tokenizer, SOURCES, beam_size=3, nbest=2, batch_size=2)
    assert len(calls) == 3 and model.training  # the training mode is restored

    # batches of sentences of similar length, decoded by the decoder, put back in the sources' order
    model.eval()
    encoded = encode_sources(tokenizer, SOURCES, model.config.max_len)
    order = sorted(range(len(SOURCES)), key=lambda i: len(encoded[i]))
    expected_greedy: dict[int, str] = {}
    expected_beam: dict[int, str] = {}
    with torch.inference_mode():
        for start in range(0, len(order), 2):
            rows = order[start : start + 2]
            src = pad_rows([encoded[i] for i in rows], tokenizer.pad_id)
            expected_greedy.update(zip(rows, tokenizer.decode(greedy_decode(model, src, max_len_a=1.5, max_len_b=10))))
            expected_beam.update(
                zip(rows, tokenizer.decode(beam_search(model, src, beam_size=3, max_len_a=1.5, max_len_b=10)))
            )
    assert greedy == [expected_greedy[i] for i in range(len(SOURCES))]
    assert beam == [expected_beam[i] for i in range(len(SOURCES))]
    assert [len(hyps) for hyps in nbest] == [2] * len(SOURCES)
