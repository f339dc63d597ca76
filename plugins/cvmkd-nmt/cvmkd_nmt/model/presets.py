"""Named model sizes (full teacher/student, CPU pair, tiny test model) and parameter counts."""

from __future__ import annotations

from typing import Any

import attrs
from torch import nn

from cvmkd_core.errors import ModelError
from cvmkd_nmt.model.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    # The requested full-size pair (32k joint SentencePiece vocabulary).
    "teacher-base": ModelConfig(
        vocab_size=32000,
        d_model=768,
        n_heads=12,
        n_encoder_layers=12,
        n_decoder_layers=12,
        d_ff=3072,
        dropout=0.1,
        max_len=512,
    ),
    "student-base": ModelConfig(
        vocab_size=32000,
        d_model=512,
        n_heads=8,
        n_encoder_layers=6,
        n_decoder_layers=6,
        d_ff=2048,
        dropout=0.1,
        max_len=512,
    ),
    # Sizes that train in reasonable time on a few CPU cores; the student is ~39% of the teacher.
    "teacher-cpu": ModelConfig(
        vocab_size=8000,
        d_model=256,
        n_heads=4,
        n_encoder_layers=4,
        n_decoder_layers=4,
        d_ff=1024,
        dropout=0.1,
        max_len=256,
    ),
    "student-cpu": ModelConfig(
        vocab_size=8000,
        d_model=160,
        n_heads=4,
        n_encoder_layers=3,
        n_decoder_layers=3,
        d_ff=768,
        dropout=0.1,
        max_len=256,
    ),
    # For unit tests only.
    "tiny": ModelConfig(
        vocab_size=64,
        d_model=32,
        n_heads=2,
        n_encoder_layers=2,
        n_decoder_layers=2,
        d_ff=64,
        dropout=0.0,
        max_len=64,
    ),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The named preset, with any field replaced by ``overrides`` (validated like a new config)."""
    try:
        base = PRESETS[name]
    except KeyError:
        raise ModelError(f"unknown model preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None
    fields = attrs.fields_dict(ModelConfig)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ModelError(
            f"unknown model config key(s) for preset {name!r}: {', '.join(unknown)}; known keys: {', '.join(fields)}"
        )
    return attrs.evolve(base, **overrides)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of distinct parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def estimate_parameters(config: ModelConfig) -> int:
    """Parameter count of a :class:`CvmTransformer` with ``config``, without building it."""
    d, ff, v = config.d_model, config.d_ff, config.vocab_size
    attention = 4 * (d * d + d)
    feed_forward = d * ff + ff + ff * d + d
    norm = 2 * d
    encoder_layer = attention + feed_forward + 2 * norm
    decoder_layer = 2 * attention + feed_forward + 3 * norm
    embeddings = v * d if config.tie_embeddings else 3 * v * d
    return embeddings + config.n_encoder_layers * encoder_layer + config.n_decoder_layers * decoder_layer + 2 * norm
