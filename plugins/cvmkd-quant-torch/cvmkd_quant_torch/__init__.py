"""cvmkd-quant-torch: int8 students on PyTorch's x86 int8 kernels.

Quantizers (``[[quantize]]`` components):

``dynamic-int8``
    every linear layer gets int8 weights with one scale per output channel, executed by
    PyTorch's dynamic int8 linear (``torch.ao``: inputs are quantized per batch from their own
    range); the embedding table is stored in int8 with one scale per row (and the tied output
    projection uses the same int8 table).
``qat-int8``
    quantization-aware training: from ``start_step`` the student trains with fake-quantized
    weights and inputs (:mod:`cvmkd_quant_torch.qat`), so it learns weights that survive int8;
    at the end it is converted exactly like ``dynamic-int8``.
``static-int8``
    post-training static quantization (:mod:`cvmkd_quant_torch.static`): int8 weights as above
    and int8 activations with per-tensor scales and zero points calibrated once, by greedy
    decoding ``calibration_batches`` batches of validation sources, then run by PyTorch's static
    int8 linear; the embedding table in int8 with a dynamic int8 output projection.

Why ``torch.ao`` although it is deprecated: on this x86 CPU its int8 linear (fbgemm/x86 engine)
is the fast path measured in ``benchmarks/quantization.py``; torchao's eager-mode int8 on CPU was
slower than fp32 there (see ``docs/quantization.md``).

All check the quantized student against the fp32 one on the validation split: a loss beyond
``max_bleu_loss`` BLEU points or ``max_composite_loss`` of the composite score puts it over the
quality budget, and the run keeps it only as ``model-<name>-rejected``.
"""

from __future__ import annotations

import logging
from typing import Any

import attrs

from cvmkd_core.config import between, ge
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.state import RunState
from cvmkd_nmt.contracts import QuantizationResult
from cvmkd_quant_torch import qat
from cvmkd_quant_torch.static import StaticInt8, StaticInt8Config
from cvmkd_validation.contract import TranslationTrainer

__version__ = "0.1.0"

log = logging.getLogger("cvmkd")


@attrs.frozen
class DynamicInt8Config:
    """``{name = "dynamic-int8", embeddings = true, max_bleu_loss = 1.0, max_composite_loss = 0.02}``."""

    embeddings: bool = True
    """store the embedding table (and a tied output projection) in int8 too"""
    max_bleu_loss: float = attrs.field(default=1.0, validator=ge(0))
    max_composite_loss: float = attrs.field(default=0.02, validator=between(0.0, 1.0))


@attrs.frozen
class QatInt8Config:
    """``{name = "qat-int8", start_step = 8000, activations = true, embeddings = true, ...}``."""

    start_step: int = attrs.field(default=0, validator=ge(0))
    """fake quantization from this training step on (0: from the start)"""
    activations: bool = True
    """fake-quantize layer inputs too, as the dynamic int8 kernels do at inference"""
    embeddings: bool = True
    max_bleu_loss: float = attrs.field(default=1.0, validator=ge(0))
    max_composite_loss: float = attrs.field(default=0.02, validator=between(0.0, 1.0))


def int8_plan(model: Any, embeddings: bool) -> dict[str, Any]:
    """Every linear layer in dynamic int8; the embedding group in int8 or left in fp32."""
    from cvmkd_nmt.quantized import LayerChoice, quantizable_layers

    plan = {}
    for name in quantizable_layers(model):
        if name == "embeddings" or name.endswith("embed") or name == "output_proj":
            plan[name] = LayerChoice("dynamic-int8") if embeddings else LayerChoice("fp32")
        else:
            plan[name] = LayerChoice("dynamic-int8")
    return plan


def convert_int8(model: Any, embeddings: bool) -> tuple[Any, dict[str, Any]]:
    from cvmkd_nmt.quantized import apply_plan

    plan = int8_plan(model, embeddings)
    apply_plan(model, plan)
    choices = {name: attrs.asdict(choice) for name, choice in plan.items()}
    return model, {
        "bits": 8,
        "weights": "int8, one scale per output channel",
        "activations": "int8, dynamic per batch",
        "embeddings": "int8, one scale per row" if embeddings else "fp32",
        "layers": choices,
    }


class DynamicInt8:
    """Post-training dynamic int8 quantization (no calibration data needed)."""

    def __init__(self, config: DynamicInt8Config | None = None) -> None:
        self.config = config or DynamicInt8Config()

    def quantize(self, model: Any, context: Any) -> Any:
        model, details = convert_int8(model, self.config.embeddings)
        return QuantizationResult(model=model, scheme="dynamic-int8", details={**details, "calibration": "none"})


class QatInt8:
    """Quantization-aware training from ``start_step``, converted to dynamic int8 at the end."""

    #: under torchrun, every rank trains with fake quantization (cvmkd_core.distributed)
    cvmkd_all_ranks = True

    def __init__(self, config: QatInt8Config | None = None) -> None:
        self.config = config or QatInt8Config()
        self.started_at: int | None = None

    def _student(self, state: RunState) -> Any:
        return state.trainer.model if isinstance(state.trainer, TranslationTrainer) else None

    def _sync(self, state: RunState) -> None:
        model = self._student(state)
        if model is None:
            return
        wanted = state.step >= self.config.start_step
        if wanted and not qat.is_enabled(model):
            count = qat.enable(model, activations=self.config.activations)
            self.started_at = state.step if self.started_at is None else self.started_at
            log.info("quantization-aware training from step %d: %d linear layers fake-quantize int8", state.step, count)
        elif not wanted and qat.is_enabled(model):
            qat.disable(model)  # rolled back to before the start

    @hookimpl
    def cvmkd_step_start(self, state: RunState, batch: Any) -> None:
        self._sync(state)

    @hookimpl
    def cvmkd_restore(self, state: RunState, payload: Any, reason: str) -> None:
        self._sync(state)

    def quantize(self, model: Any, context: Any) -> Any:
        qat.disable(model)
        model, details = convert_int8(model, self.config.embeddings)
        details.update(
            qat_start_step=self.config.start_step,
            qat_activations=self.config.activations,
            calibration="none (trained with fake quantization)",
        )
        return QuantizationResult(model=model, scheme="qat-int8", details=details)


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.quantizer("dynamic-int8", DynamicInt8, config=DynamicInt8Config)
    register.quantizer("qat-int8", QatInt8, config=QatInt8Config)
    register.quantizer("static-int8", StaticInt8, config=StaticInt8Config)
