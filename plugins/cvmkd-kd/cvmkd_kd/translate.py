"""Translate text with a cvm model: tokenize, batch by length, decode, detokenize, restore order."""

from __future__ import annotations

from typing import Any

import torch

from cvmkd_core.hardware import autocast


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
    from cvmkd_core.model.decoding import beam_search, greedy_decode

    device = torch.device(device)
    limit = model.config.max_len
    encoded = [ids[: limit - 1] + [tokenizer.eos_id] for ids in tokenizer.encode(sources)]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[str] = [""] * len(sources)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in chunk)
            src = torch.full((len(chunk), width), tokenizer.pad_id, dtype=torch.long)
            for row, i in enumerate(chunk):
                src[row, : len(encoded[i])] = torch.tensor(encoded[i])
            src = src.to(device)
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
