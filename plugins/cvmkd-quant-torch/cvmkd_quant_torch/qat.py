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
    quantization computes it at inference), with a straight-through gradient."""
    levels = 2**bits - 1
    detached = x.detach().float()  # the rounding in float32 even under bf16 autocast
    low = detached.min().clamp(max=0.0)
    high = detached.max().clamp(min=0.0)
    scale = ((high - low) / levels).clamp(min=1e-8)
    zero = (-low / scale).round()
    quantized = ((detached / scale).round() + zero).clamp(0, levels)
    return x + ((quantized - zero) * scale - detached).to(x.dtype)


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
