"""Quantization-aware training: from a chosen step, every linear layer of the student computes
with fake-quantized weights (symmetric int8 per output channel) and fake-quantized inputs
(asymmetric per-tensor, from the batch's own range), exactly what the dynamic int8 kernels do at
inference. Rounding passes gradients straight through, so the student learns weights that
survive int8.

The swap changes each layer's class, not its parameters: the optimizer, checkpoints and the
fp32 package see the same tensors under the same names. ``FakeQuantLinear.cvmkd_float_class``
tells the finalizer how to turn a layer back into a plain one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def fake_quant_weight(weight: Tensor, bits: int = 8) -> Tensor:
    """Symmetric per-row fake quantization with a straight-through gradient."""
    qmax = 2 ** (bits - 1) - 1
    scale = weight.detach().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / qmax
    quantized = (weight / scale).round().clamp(-qmax, qmax) * scale
    return weight + (quantized - weight).detach()


def fake_quant_activation(x: Tensor, bits: int = 8) -> Tensor:
    """Asymmetric per-tensor fake quantization over the tensor's own range (as dynamic
    quantization computes it at inference), with a straight-through gradient.

    The rounding is in float32 even under bf16 autocast, in place on one temporary: five passes
    over the tensor where the formula written out takes ten (``(round(x/s) + z).clamp(0, L) - z``
    equals ``round(x/s).clamp(-z, L - z)`` exactly, the values being small integers). torch's fused
    ``fake_quantize_per_tensor_affine`` measured slower than these passes on the CPUs cvmkd is
    developed on."""
    levels = 2**bits - 1
    detached = x.detach().float()
    low, high = torch.aminmax(detached)
    low = low.clamp(max=0.0)
    high = high.clamp(min=0.0)
    scale = ((high - low) / levels).clamp(min=1e-8)
    zero = (-low / scale).round()
    error = detached.div(scale).round_().clamp_(-zero, levels - zero).mul_(scale).sub_(detached)
    return x + error.to(x.dtype)


class FakeQuantLinear(nn.Linear):
    """An ``nn.Linear`` whose forward sees fake-quantized weights and inputs."""

    cvmkd_float_class = nn.Linear
    weight_bits = 8
    activation_bits = 8
    quantize_activations = True

    def forward(self, x: Tensor) -> Tensor:
        if self.quantize_activations:
            x = fake_quant_activation(x, self.activation_bits)
        return F.linear(x, fake_quant_weight(self.weight, self.weight_bits), self.bias)

    @classmethod
    def stacked_function(cls, layers: Sequence[FakeQuantLinear]) -> Callable[[Tensor], Tensor]:
        """The outputs of ``layers`` on one input concatenated on the last dimension, as one
        product: the input fake-quantized once, the stacked weights fake-quantized row by row.
        The same outputs as the layers one by one (each row keeps its own scale, and the input's
        range is the same input's), at a third of the work for attention's query, key and value."""
        head = layers[0]
        settings = (head.quantize_activations, head.activation_bits, head.weight_bits)
        same = all((m.quantize_activations, m.activation_bits, m.weight_bits) == settings for m in layers)
        if not same or any(m.bias is None for m in layers):
            return lambda x: torch.cat([m(x) for m in layers], dim=-1)

        def run(x: Tensor) -> Tensor:
            if head.quantize_activations:
                x = fake_quant_activation(x, head.activation_bits)
            weight = fake_quant_weight(torch.cat([m.weight for m in layers]), head.weight_bits)
            return F.linear(x, weight, torch.cat([cast("Tensor", m.bias) for m in layers]))

        return run


def enable(model: nn.Module, *, activations: bool = True) -> int:
    """Make every ``nn.Linear`` of ``model`` fake-quantize; returns how many were changed."""
    changed = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FakeQuantLinear
            assert isinstance(module, FakeQuantLinear)  # the class swap above; narrows it for mypy
            module.quantize_activations = activations
            changed += 1
    return changed


def disable(model: nn.Module) -> int:
    """Turn every fake-quantizing layer back into a plain ``nn.Linear``."""
    changed = 0
    for module in model.modules():
        restore = getattr(type(module), "cvmkd_float_class", None)
        if restore is not None:
            module.__dict__.pop("quantize_activations", None)
            module.__class__ = restore
            changed += 1
    return changed


def is_enabled(model: nn.Module) -> bool:
    return any(isinstance(m, FakeQuantLinear) for m in model.modules())


__all__ = ["FakeQuantLinear", "disable", "enable", "fake_quant_activation", "fake_quant_weight", "is_enabled"]
