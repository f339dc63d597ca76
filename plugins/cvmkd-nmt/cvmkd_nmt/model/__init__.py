"""The native "cvm" encoder-decoder transformer: config, presets, model and decoding."""

from __future__ import annotations

from cvmkd_nmt.model.config import ModelConfig
from cvmkd_nmt.model.decoding import beam_search, greedy_decode, score_sequences
from cvmkd_nmt.model.presets import PRESETS, count_parameters, estimate_parameters, preset
from cvmkd_nmt.model.transformer import CvmTransformer, DecoderCache

__all__ = [
    "PRESETS",
    "CvmTransformer",
    "DecoderCache",
    "ModelConfig",
    "beam_search",
    "count_parameters",
    "estimate_parameters",
    "greedy_decode",
    "preset",
    "score_sequences",
]
