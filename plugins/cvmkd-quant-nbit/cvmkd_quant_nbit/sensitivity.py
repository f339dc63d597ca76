"""How much quantizing one layer alone damages the model, measured cheaply on calibration data.

For each calibration batch of source sentences the fp32 model first translates greedily; its
own translation, ``bos + hypothesis``, is then the teacher-forced decoder input, and the fp32
model's output distributions at every real target position (each hypothesis token and the
final eos) are kept as the reference. The sensitivity of layer ``L`` at ``b`` bits is the mean,
over those positions, of the KL divergence ``KL(p_fp32 || p_L@b)`` between the fp32 model's
next-token distribution and that of the model in which only ``L`` is quantized to ``b`` bits.

Why this measure: it needs no references (only the validation sources), it looks at the
distributions on the text the model actually produces, KL weighs the tokens the fp32 model is
sure of most (flipping a confident choice is what changes translations), and it costs one
teacher-forced forward pass per layer, level and batch, the fp32 log-probabilities being
computed once. A single layer is quantized by replacing its weight, in a private copy of the
model, with the dequantized values, which is exactly what ``NbitLinear`` / ``QuantEmbedding``
compute; the tied embedding group changes the shared table, as its quantized form does.
Sensitivities of separate layers are treated as additive (a first-order approximation).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvmkd_core.errors import ModelError
from cvmkd_nmt.model import CvmTransformer, greedy_decode
from cvmkd_nmt.quantized import quantize_tensor
from cvmkd_quant_nbit.plans import FP32, HALF_DTYPES, LayerInfo, group_for, level_name, weight_of

#: How the measure is described in details.
METHOD = (
    "mean KL(p_fp32 || p_quantized) per target position, one layer quantized at a time, decoder "
    "teacher-forced with the fp32 model's greedy translations of calibration sources"
)


def teacher_inputs(hypotheses: list[list[int]], model: CvmTransformer) -> tuple[Tensor, Tensor]:
    """Decoder inputs ``bos + hypothesis`` (right-padded) and the mask of the positions that
    predict a hypothesis token or the final eos (truncated to the model's max_len)."""
    cfg = model.config
    rows = [[cfg.bos_id, *hyp][: cfg.max_len] for hyp in hypotheses]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), cfg.pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = True
    return ids, mask


class Sensitivity:
    """Sensitivity of single layers of ``model`` (float32, left untouched) on ``batches`` of
    source ids; values are cached per (layer, bits). ``group_size`` and ``half`` are the
    quantizer's (a layer gets the same groups it would get in the quantized model)."""

    def __init__(
        self,
        model: nn.Module,
        batches: list[Tensor],
        infos: dict[str, LayerInfo],
        *,
        group_size: int = 0,
        half: str = "float16",
    ) -> None:
        if not batches:
            raise ModelError("layer sensitivity needs calibration sentences, and the validation split gave none")
        fp32 = copy.deepcopy(model).float().eval()
        # greedy decoding and teacher forcing need the student's CvmTransformer interface
        assert isinstance(fp32, CvmTransformer), type(fp32).__name__
        self.model = fp32
        self.infos = infos
        self.group_size = group_size
        self.half = HALF_DTYPES[half]
        self.inputs: list[tuple[Tensor, Tensor, Tensor]] = []
        self.reference: list[Tensor] = []
        self.cache: dict[tuple[str, int], float] = {}
        with torch.no_grad():
            for src in batches:
                src = src.cpu()
                tgt, mask = teacher_inputs(greedy_decode(self.model, src), self.model)
                logits = self.model(src, tgt)[mask].float()
                self.inputs.append((src, tgt, mask))
                self.reference.append(F.log_softmax(logits, dim=-1))
        self.positions = sum(int(mask.sum()) for _, _, mask in self.inputs)
        self.sentences = sum(int(src.size(0)) for src, _, _ in self.inputs)
        self.passes = 0

    def __call__(self, layer: str, bits: int) -> float:
        """Mean KL per target position when only ``layer`` is at ``bits`` (0 for fp32)."""
        if bits == FP32:
            return 0.0
        key = (layer, bits)
        if key not in self.cache:
            self.cache[key] = self._measure(layer, bits)
        return self.cache[key]

    @torch.no_grad()
    def _measure(self, layer: str, bits: int) -> float:
        weight = weight_of(self.model, layer)
        original = weight.detach().clone()
        group = group_for(self.infos[layer], bits, self.group_size)
        try:
            fake = quantize_tensor(original, bits, group, self.half).dequantize()
        except ValueError as exc:
            raise ModelError(f"cannot quantize layer {layer!r} to {bits} bits: {exc}") from None
        total = 0.0
        try:
            weight.copy_(fake)
            for (src, tgt, mask), reference in zip(self.inputs, self.reference):
                logq = F.log_softmax(self.model(src, tgt)[mask].float(), dim=-1)
                total += float(F.kl_div(logq, reference, log_target=True, reduction="sum"))
                self.passes += 1
        finally:
            weight.copy_(original)
        return max(total, 0.0) / max(self.positions, 1)

    def table(self) -> dict[str, dict[str, float]]:
        """Every measured value: ``{layer: {"4": kl, "8": kl, ...}}`` in layer order."""
        out: dict[str, dict[str, float]] = {}
        for name in self.infos:
            row = {str(level_name(b)): round(v, 8) for (n, b), v in sorted(self.cache.items()) if n == name}
            if row:
                out[name] = row
        return out

    def summary(self) -> dict[str, Any]:
        """What details record about the measurement."""
        return {
            "method": METHOD,
            "batches": len(self.inputs),
            "sentences": self.sentences,
            "positions": self.positions,
            "forward_passes": self.passes,
        }
