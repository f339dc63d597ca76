"""``static-int8``: post-training static int8 quantization, calibrated on validation sentences.

Every linear layer of the encoder and decoder becomes a :class:`cvmkd_nmt.quantized.StaticInt8Linear`:
int8 weights with one scale per output channel, and int8 activations whose per-tensor scale and
zero point were fixed once from the ranges seen while the model greedy-decoded
``calibration_batches`` batches of validation sources (``QuantizationContext.calibration_batches``).
At inference no activation range is computed per batch: the input is quantized with the
calibrated parameters and PyTorch's static int8 kernel requantizes the output.

Two choices (see docs/quantization.md, "static-int8"):

* Calibration greedy-decodes the source batches with the model being calibrated (float32
  arithmetic with the already-quantized int8 weights), so the decoder layers see the model's own
  prefixes one token at a time, as at inference, and the cross-attention projections see the
  real encoder memory. Teacher forcing would need target sentences: the calibration batches are
  sources only, and references would show the decoder prefixes it never produces.
* The embedding table is int8 with one scale per row (as in ``dynamic-int8``); the output
  projection (tied to it or not) is *dynamic* int8: a static one would requantize the logits to
  256 levels, coarse for the small logit differences greedy and beam search decide on, and it
  is no faster per decode step (measured: equal with one thread, 24% slower with two, the
  dequantization of the vocabulary-wide output eating what the static kernel saves).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs

from cvmkd_core.config import between, ge, one_of
from cvmkd_core.errors import ModelError
from cvmkd_nmt.contracts import QuantizationResult

log = logging.getLogger("cvmkd")


@attrs.frozen
class StaticInt8Config:
    """``{name = "static-int8", calibration_batches = 8, observer = "minmax", embeddings = true, ...}``."""

    calibration_batches: int = attrs.field(default=8, validator=ge(1))
    """batches of (up to) 32 validation sources greedy-decoded to calibrate activation ranges"""
    embeddings: bool = True
    """store the embedding table in int8 too, with a dynamic int8 output projection"""
    observer: str = attrs.field(default="minmax", validator=one_of("minmax", "percentile"))
    """activation ranges: observed min/max, or the 0.01th/99.99th percentiles"""
    reduce_range: bool = True
    """7-bit layer inputs (torch's x86 default, exact on any x86 CPU); false: 8-bit, more precise,
    exact only on CPUs with VNNI (fbgemm's AVX2 kernel may saturate int16 sums otherwise)"""
    max_bleu_loss: float = attrs.field(default=1.0, validator=ge(0))
    max_composite_loss: float = attrs.field(default=0.02, validator=between(0.0, 1.0))


def static_int8_plan(model: Any, embeddings: bool) -> dict[str, Any]:
    """Static int8 for every linear layer but the output projection; the embedding group (and
    the output projection) in int8 with a dynamic int8 output projection, or left in fp32."""
    from cvmkd_nmt.quantized import LayerChoice, quantizable_layers

    table = LayerChoice("dynamic-int8") if embeddings else LayerChoice("fp32")
    plan = {}
    for name in quantizable_layers(model):
        if name == "embeddings" or name == "output_proj":
            plan[name] = table  # a tied group: int8 table + dynamic int8 projection
        elif name.endswith("embed"):
            plan[name] = table  # untied tables: 8-bit per-row either way (no activations)
        else:
            plan[name] = LayerChoice("static-int8")
    return plan


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def _qparams_summary(summary: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per layer: input and output scale, zero point, observed range and range used."""
    out: dict[str, Any] = {}
    for name, sides in summary.items():
        out[name] = {
            side: {
                "scale": _round(info["scale"]),
                "zero_point": info["zero_point"],
                "observed": [_round(info["min"]), _round(info["max"])],
                "range": [_round(info["low"]), _round(info["high"])],
            }
            for side, info in sides.items()
        }
    return out


class StaticInt8:
    """Post-training static int8 quantization, calibrated by greedy decoding of validation sources."""

    def __init__(self, config: StaticInt8Config | None = None) -> None:
        self.config = config or StaticInt8Config()

    def quantize(self, model: Any, context: Any) -> Any:
        from cvmkd_nmt.hardware import cpu_has_int8_dot
        from cvmkd_nmt.model.decoding import greedy_decode
        from cvmkd_nmt.quantized import apply_plan, calibrate

        config = self.config
        batches = context.calibration_batches(config.calibration_batches)
        if not batches:
            raise ModelError("static-int8 needs calibration sentences, but the validation split is empty")
        plan = static_int8_plan(model, config.embeddings)
        apply_plan(model, plan)
        pad_id = model.config.pad_id

        def run(m: Any) -> None:
            for src in batches:
                greedy_decode(m, src)

        started = time.perf_counter()
        summary = calibrate(model, run, observer=config.observer, reduce_range=config.reduce_range)
        seconds = time.perf_counter() - started
        sentences = sum(int(b.size(0)) for b in batches)
        tokens = sum(int(b.ne(pad_id).sum()) for b in batches)
        log.info(
            "static-int8: calibrated %d layers on %d validation sentences (%d batches, %s observer) in %.1fs",
            len(summary),
            sentences,
            len(batches),
            config.observer,
            seconds,
        )
        bits = 7 if config.reduce_range else 8
        details = {
            "bits": 8,
            "weights": "int8, one scale per output channel",
            "activations": f"static: per-tensor quint8 scale and zero point from calibration "
            f"({bits}-bit inputs, 8-bit outputs)",
            "embeddings": "int8, one scale per row" if config.embeddings else "fp32",
            "output_projection": "dynamic int8 (float32 logits)" if config.embeddings else "fp32",
            "observer": config.observer,
            "reduce_range": config.reduce_range,
            # 8-bit inputs are exact only with VNNI: without it fbgemm's kernel may saturate
            "cpu_int8_dot": cpu_has_int8_dot(),
            "calibration": {
                "split": "validation",
                "batches": len(batches),
                "sentences": sentences,
                "source_tokens": tokens,
                "method": "greedy decoding of the source batches",
                "seconds": round(seconds, 2),
            },
            "layers": {name: attrs.asdict(choice) for name, choice in plan.items()},
            "qparams": _qparams_summary(summary),
        }
        return QuantizationResult(model=model, scheme="static-int8", details=details)
