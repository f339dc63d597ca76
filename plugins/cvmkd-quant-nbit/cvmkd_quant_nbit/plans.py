"""Per-layer bit plans: which layers a quantizer may touch, what a plan costs in bytes, how a
plan becomes a model, and the quality-budget rule.

A plan maps every name of :func:`cvmkd_nmt.quantized.quantizable_layers` to a level: 4, 8 or 16
bits, or :data:`FP32` (the layer is left as it is). Levels 4 and 8 use the quantizer's
``group_size`` where it divides the layer's input width, else one scale per output row (see
:func:`group_for`); 16 is a float16/bfloat16 copy without scales.
"""

from __future__ import annotations

import copy
from typing import Any

import attrs
import torch
from torch import Tensor, nn

from cvmkd_nmt.quantized import EMBEDDINGS, LayerChoice, apply_plan, model_nbytes, quantizable_layers

#: The level of a layer left in float32.
FP32 = 32
#: Every level, from the smallest to the largest.
LEVELS = (4, 8, 16, FP32)
#: Layer names that make up the embedding group (tied: one entry ``embeddings``).
EMBEDDING_NAMES = frozenset({EMBEDDINGS, "src_embed", "tgt_embed", "output_proj"})
HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@attrs.frozen
class LayerInfo:
    """A quantizable layer: its plan name and weight shape (rows, columns); columns are the
    input features of a linear layer, the embedding width of a table."""

    name: str
    shape: tuple[int, int]

    @property
    def embedding(self) -> bool:
        return self.name in EMBEDDING_NAMES


def weight_of(model: nn.Module, name: str) -> Tensor:
    """The weight of the plan entry ``name`` (the shared matrix for the tied group)."""
    weight = model.get_submodule("src_embed" if name == EMBEDDINGS else name).weight
    # nn.Module's __getattr__ types it as Tensor | Module; a Linear's or Embedding's is a Parameter
    assert isinstance(weight, Tensor), name
    return weight


def layer_infos(model: nn.Module) -> dict[str, LayerInfo]:
    """Every quantizable layer of ``model``, in model order."""
    return {
        name: LayerInfo(name, tuple(weight_of(model, name).shape))  # type: ignore[arg-type]
        for name in quantizable_layers(model)
    }


def group_for(info: LayerInfo, bits: int, group_size: int) -> int:
    """The group size layer ``info`` gets at ``bits``: ``group_size`` for 4 and 8 bits when it
    divides the layer's columns, else 0 (one scale per row)."""
    if bits in (4, 8) and group_size and info.shape[1] % group_size == 0:
        return group_size
    return 0


def ungroupable(infos: dict[str, LayerInfo], names: list[str], group_size: int) -> list[str]:
    """Those of ``names`` whose columns ``group_size`` does not divide (they get per-row scales)."""
    if not group_size:
        return []
    return [n for n in names if infos[n].shape[1] % group_size]


def weight_bytes(info: LayerInfo, bits: int, group_size: int) -> int:
    """Bytes the layer's weight takes at ``bits`` (data plus float32 scales), as
    :func:`cvmkd_nmt.quantized.model_nbytes` and the package's ``model.safetensors`` count them."""
    rows, cols = info.shape
    if bits == FP32:
        return rows * cols * 4
    if bits == 16:
        return rows * cols * 2
    group = group_for(info, bits, group_size)
    groups = 1 if group == 0 else cols // group
    data = rows * cols if bits == 8 else rows * ((cols + 1) // 2)
    return data + rows * groups * 4


def level_name(bits: int) -> int | str:
    """How a level is written in details: 4, 8, 16 or "fp32"."""
    return "fp32" if bits == FP32 else bits


def next_level(bits: int) -> int:
    """The next larger level (4 -> 8 -> 16 -> fp32)."""
    return LEVELS[LEVELS.index(bits) + 1]


class Sizer:
    """Bytes of a plan, before building it: the fixed bytes of the model (LayerNorms, biases,
    anything not quantizable) plus each layer's weight at its level."""

    def __init__(self, model: nn.Module, infos: dict[str, LayerInfo], group_size: int) -> None:
        self.infos = infos
        self.group_size = group_size
        self.fp32_bytes = model_nbytes(model)
        self.fixed = self.fp32_bytes - sum(weight_bytes(i, FP32, 0) for i in infos.values())

    def layer(self, name: str, bits: int) -> int:
        return weight_bytes(self.infos[name], bits, self.group_size)

    def bytes(self, plan: dict[str, int]) -> int:
        return self.fixed + sum(self.layer(name, bits) for name, bits in plan.items())

    def ratio(self, plan: dict[str, int]) -> float:
        return self.bytes(plan) / self.fp32_bytes


def choices(plan: dict[str, int], infos: dict[str, LayerInfo], group_size: int, half: str) -> dict[str, LayerChoice]:
    """The :class:`LayerChoice` of every layer of ``plan``."""
    out: dict[str, LayerChoice] = {}
    for name, bits in plan.items():
        if bits == FP32:
            out[name] = LayerChoice("fp32")
        else:
            out[name] = LayerChoice("nbit", bits, group_for(infos[name], bits, group_size), half)
    return out


def build(fp32: nn.Module, plan: dict[str, int], infos: dict[str, LayerInfo], group_size: int, half: str) -> nn.Module:
    """A quantized copy of ``fp32`` (left untouched) following ``plan``, in eval mode."""
    return apply_plan(copy.deepcopy(fp32), choices(plan, infos, group_size, half)).eval()


def describe_plan(plan: dict[str, int], infos: dict[str, LayerInfo], group_size: int) -> dict[str, Any]:
    """Per layer: ``{"bits": 4 | 8 | 16 | "fp32", "group_size": g}`` (for details)."""
    return {
        name: {"bits": level_name(bits), "group_size": group_for(infos[name], bits, group_size)}
        for name, bits in plan.items()
    }


def level_counts(plan: dict[str, int]) -> dict[str, int]:
    """How many layers are at each level, e.g. ``{"4": 30, "8": 2, "fp32": 1}``."""
    counts: dict[str, int] = {}
    for bits in LEVELS:
        n = sum(1 for b in plan.values() if b == bits)
        if n:
            counts[str(level_name(bits))] = n
    return counts
