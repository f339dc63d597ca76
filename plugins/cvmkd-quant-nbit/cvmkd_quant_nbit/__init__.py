"""cvmkd-quant-nbit: weight-only 4/8/16-bit students, layer by layer.

Quantizers (``[[quantize]]`` components), all built on :mod:`cvmkd_nmt.quantized` (``NbitLinear``
and ``QuantEmbedding``: weights stored in 4 bits packed, 8 bits or float16/bfloat16, dequantized
on the fly; any device):

``nbit``
    every layer (and the embedding table unless ``embeddings = false``) at ``bits`` 4, 8 or 16,
    optionally with one scale per ``group_size`` input columns. Over the quality budget on the
    validation split, ``fallback = "per-layer"`` raises the precision of the most sensitive
    layers one step (4 -> 8 -> 16 -> fp32) per round until the model is within the budget.
``progressive``
    ``stages`` of decreasing precision (16 -> 8 -> 4 bits): each stage is validated and the
    last one within the budget is kept.
``target-ratio``
    chooses 4, 8 or 16 bits per layer to reach a target size (``ratio`` of the fp32 bytes) with
    the least total sensitivity.

Layer sensitivity (:mod:`cvmkd_quant_nbit.sensitivity`): the KL divergence between the fp32
model's next-token distributions and those of the model with one layer quantized, teacher-forced
on the fp32 model's own greedy translations of calibration sources. See docs/quantization.md.
"""

from __future__ import annotations

from typing import Any

from cvmkd_core.hookspecs import hookimpl
from cvmkd_nmt.contracts import within_budget
from cvmkd_quant_nbit.quantizers import (
    NbitConfig,
    NbitQuantizer,
    ProgressiveConfig,
    ProgressiveQuantizer,
    TargetRatioConfig,
    TargetRatioQuantizer,
    choose_bits,
)
from cvmkd_quant_nbit.sensitivity import Sensitivity

__version__ = "0.1.0"

__all__ = [
    "NbitConfig",
    "NbitQuantizer",
    "ProgressiveConfig",
    "ProgressiveQuantizer",
    "Sensitivity",
    "TargetRatioConfig",
    "TargetRatioQuantizer",
    "choose_bits",
    "within_budget",
]


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.quantizer("nbit", NbitQuantizer, config=NbitConfig)
    register.quantizer("progressive", ProgressiveQuantizer, config=ProgressiveConfig)
    register.quantizer("target-ratio", TargetRatioQuantizer, config=TargetRatioConfig)
