"""Weight quantization of a :class:`~cvmkd_core.model.transformer.CvmTransformer`: quantized
Linear and Embedding modules swapped in per layer by a plan, and a compact tensor format.

Three module kinds replace fp32 layers (see docs/quantization.md, "Storage format"):

* :class:`NbitLinear` - weight-only 4/8/16-bit linear, dequantized on the fly in ``forward``
  (any device, any dtype, autocast). Int4 weights stay packed two per byte in memory.
* :class:`DynamicInt8Linear` - int8 weights, per-output-channel scales, executed by PyTorch's
  dynamic int8 kernel (fbgemm/x86 on the CPU; activations quantized per batch).
* :class:`QuantEmbedding` - a quantized embedding table that dequantizes only looked-up rows.

With tied embeddings the shared (vocab, d_model) matrix is quantized once: ``src_embed`` and
``tgt_embed`` become one :class:`QuantEmbedding` and ``output_proj`` a linear over the same
quantized data (the table's per-row scales are exactly per-output-channel scales of the
projection). :func:`quantized_state` stores that data once.

Quantization is symmetric: ``w ~= q * scale`` with ``q`` in [-127, 127] (8 bit) or [-7, 7]
(4 bit) and one scale per output row, or per group of ``group_size`` consecutive input columns.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvmkd_core.errors import ModelError

__all__ = [
    "FORMAT",
    "DynamicInt8Linear",
    "LayerChoice",
    "NbitLinear",
    "QuantEmbedding",
    "QuantizedWeight",
    "apply_plan",
    "dequantize_rows",
    "is_quantized",
    "load_quantized",
    "model_nbytes",
    "pack_int4",
    "quantizable_layers",
    "quantize_tensor",
    "quantized_state",
    "unpack_int4",
]

#: Version tag of the :func:`quantized_state` spec (``spec["format"]``).
FORMAT = "cvmkd-quant/1"
#: Name of the tied embedding group in :func:`quantizable_layers` and plans.
EMBEDDINGS = "embeddings"

_QMAX = {8: 127, 4: 7}
_HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_HALF_NAMES = {v: k for k, v in _HALF_DTYPES.items()}


# -- int4 packing ----------------------------------------------------------------------------


def pack_int4(values: Tensor) -> Tensor:
    """Pack integers in [-8, 7] two per byte along the last dimension.

    Returns uint8 of shape (..., ceil(n / 2)): element 2k goes to the low nibble of byte k,
    element 2k+1 to the high nibble, each as a 4-bit two's complement; an odd length is padded
    with a zero nibble. A 1-D tensor of ``numel`` values packs into ``ceil(numel / 2)`` bytes.
    """
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise ValueError(f"pack_int4 needs an integer tensor, got {values.dtype}")
    if values.dim() == 0:
        raise ValueError("pack_int4 needs at least one dimension")
    if values.numel() and (int(values.min()) < -8 or int(values.max()) > 7):
        raise ValueError(
            f"pack_int4 values must be in [-8, 7], got [{int(values.min())}, {int(values.max())}]"
        )
    v = values.to(torch.int16)
    if v.size(-1) % 2:
        v = torch.cat([v, v.new_zeros(*v.shape[:-1], 1)], dim=-1)
    nibbles = (v & 0xF).to(torch.uint8)
    return (nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)).contiguous()


def unpack_int4(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 (..., m) -> int8 (..., numel), ``numel`` in {2m-1, 2m}."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 needs a uint8 tensor, got {packed.dtype}")
    m = packed.size(-1) if packed.dim() else 0
    if packed.dim() == 0 or not 2 * m - 1 <= numel <= 2 * m:
        raise ValueError(
            f"unpack_int4: {m} packed bytes per row cannot hold {numel} values"
        )
    low = packed & 0xF
    high = packed >> 4
    nibbles = torch.stack([low, high], dim=-1).flatten(-2)[..., :numel]
    # 4-bit two's complement to int8: flipping the sign bit and subtracting 8 sign-extends.
    return (nibbles.to(torch.int8) ^ 8) - 8


# -- quantized weights -------------------------------------------------------------------------


def dequantize_rows(
    data: Tensor, scale: Tensor | None, bits: int, columns: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Dequantize rows of quantized data: ``data`` (..., stored columns) with ``scale``
    (..., n_groups) -> (..., columns) of ``dtype``. Works on a whole matrix or gathered rows."""
    if bits == 16:
        return data.to(dtype)
    values = unpack_int4(data, columns) if bits == 4 else data
    assert scale is not None
    groups = scale.size(-1)
    lead = values.shape[:-1]
    out = values.to(torch.float32).reshape(*lead, groups, columns // groups) * scale.unsqueeze(-1)
    return out.reshape(*lead, columns).to(dtype)


@attrs.define(eq=False)
class QuantizedWeight:
    """A quantized (out_features, in_features) matrix.

    ``data``: int8 (out, in) for 8 bits; uint8 (out, ceil(in / 2)) packed for 4 bits
    (:func:`pack_int4` per row); float16/bfloat16 (out, in) for 16 bits.
    ``scale``: float32 (out, n_groups) with n_groups = 1 when ``group_size`` is 0 (per row),
    else in / group_size; None for 16 bits. ``w ~= data * scale`` group-wise.
    """

    bits: int
    group_size: int
    shape: tuple[int, int]
    data: Tensor
    scale: Tensor | None

    @property
    def n_groups(self) -> int:
        return 1 if self.group_size == 0 else self.shape[1] // self.group_size

    def dequantize(self) -> Tensor:
        """The float32 (out, in) matrix the quantized data stands for."""
        return dequantize_rows(self.data, self.scale, self.bits, self.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes actually held by the data and the scales."""
        total = self.data.numel() * self.data.element_size()
        if self.scale is not None:
            total += self.scale.numel() * self.scale.element_size()
        return total


def _check_bits(bits: int, group_size: int) -> None:
    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, got {bits!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise ValueError(f"group_size must be an integer >= 0, got {group_size!r}")
    if bits == 16 and group_size:
        raise ValueError("16-bit weights have no scales: group_size must be 0")


def quantize_tensor(
    weight: Tensor, bits: int, group_size: int = 0, half_dtype: torch.dtype = torch.float16
) -> QuantizedWeight:
    """Symmetric quantization of a 2-D (out, in) weight.

    Scales are per output row (``group_size`` 0) or per group of ``group_size`` consecutive
    input columns (``in`` must be divisible by it): ``scale = max|w| / qmax`` with qmax 127 for
    8 bits and 7 for 4 bits, ``q = round(w / scale)``; an all-zero row/group gets scale 1.
    ``bits`` 16 is a plain ``half_dtype`` (float16 or bfloat16) copy without scales.
    """
    _check_bits(bits, group_size)
    if weight.dim() != 2:
        raise ValueError(f"quantize_tensor needs a 2-D weight, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if group_size and cols % group_size:
        raise ValueError(
            f"in_features {cols} is not divisible by group_size {group_size}"
        )
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("cannot quantize a weight holding inf or NaN")
    if bits == 16:
        if half_dtype not in _HALF_NAMES:
            raise ValueError(f"half_dtype must be torch.float16 or torch.bfloat16, got {half_dtype}")
        data = w.to(half_dtype).contiguous()
        if not bool(torch.isfinite(data).all()):
            raise ValueError(f"weight values overflow {half_dtype}")
        return QuantizedWeight(16, 0, (rows, cols), data, None)
    qmax = _QMAX[bits]
    groups = 1 if group_size == 0 else cols // group_size
    grouped = w.reshape(rows, groups, cols // groups)
    amax = grouped.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax)).contiguous()
    q = torch.clamp(torch.round(grouped / scale.unsqueeze(-1)), -qmax, qmax)
    q = q.to(torch.int8).reshape(rows, cols)
    data = pack_int4(q) if bits == 4 else q.contiguous()
    return QuantizedWeight(bits, group_size, (rows, cols), data, scale)


def _stored_shape(bits: int, shape: tuple[int, int]) -> tuple[int, int]:
    rows, cols = shape
    return (rows, (cols + 1) // 2) if bits == 4 else (rows, cols)


def _stored_dtypes(bits: int) -> tuple[torch.dtype, ...]:
    return {8: (torch.int8,), 4: (torch.uint8,), 16: (torch.float16, torch.bfloat16)}[bits]


# -- torch.ao plumbing for the dynamic int8 kernel --------------------------------------------


@contextlib.contextmanager
def _ao_calls() -> Iterator[None]:
    """Around torch.ao quantized-tensor calls: the fbgemm/x86 engine for packing, and torch's
    deprecation notices for quantized tensors silenced for these calls only."""
    engines = torch.backends.quantized.supported_engines
    current = torch.backends.quantized.engine
    wanted = next((e for e in ("x86", "fbgemm") if e in engines), None)
    if wanted is None and current in (None, "none"):
        wanted = "qnnpack" if "qnnpack" in engines else None
    switch = wanted is not None and wanted != current
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".*quantized tensor creation functions.*", category=UserWarning
        )
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated.*")
        if switch:
            torch.backends.quantized.engine = wanted
        try:
            yield
        finally:
            if switch:
                torch.backends.quantized.engine = current


def _dynamic_linear(data: Tensor, scale: Tensor, bias: Tensor | None) -> nn.Module:
    """A ``torch.ao.nn.quantized.dynamic.Linear`` holding int8 ``data`` (out, in) with
    per-output-channel float32 ``scale`` (out, 1) and zero points 0."""
    from torch.ao.nn.quantized.dynamic import Linear as AoDynamicLinear

    out_features, in_features = data.shape
    with _ao_calls():
        qweight = torch._make_per_channel_quantized_tensor(
            data.cpu().contiguous(),
            scale.detach().cpu().reshape(-1).to(torch.float64),
            torch.zeros(out_features, dtype=torch.long),
            0,
        )
        module = AoDynamicLinear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        module.set_weight_bias(
            qweight, None if bias is None else bias.detach().cpu().to(torch.float32).contiguous()
        )
    return module


# -- modules -------------------------------------------------------------------------------------


class _QuantModule(nn.Module):
    """Common base: the modules :func:`is_quantized` and :func:`quantized_state` recognise."""

    kind: str = ""


class QuantEmbedding(_QuantModule):
    """An embedding whose table is a :class:`QuantizedWeight` (4, 8 or 16 bits); ``forward``
    dequantizes only the looked-up rows, as float32. The table's buffers are ``qdata`` and
    ``qscale`` (absent for 16 bits). ``padding_idx`` is kept for reference only."""

    kind = "embedding"

    def __init__(self, qweight: QuantizedWeight, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.bits = qweight.bits
        self.group_size = qweight.group_size
        self.padding_idx = padding_idx
        self.register_buffer("qdata", qweight.data)
        self.register_buffer("qscale", qweight.scale)

    @classmethod
    def from_embedding(
        cls,
        embedding: nn.Embedding,
        bits: int,
        group_size: int = 0,
        half_dtype: torch.dtype = torch.float16,
    ) -> QuantEmbedding:
        return cls(
            quantize_tensor(embedding.weight, bits, group_size, half_dtype), embedding.padding_idx
        )

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.bits, self.group_size, (self.num_embeddings, self.embedding_dim),
            self.qdata, self.qscale,
        )

    @property
    def weight(self) -> Tensor:
        """The dequantized float32 table (a new tensor; for inspection)."""
        return self.qweight.dequantize()

    def forward(self, ids: Tensor) -> Tensor:
        scale = None if self.qscale is None else self.qscale[ids]
        return dequantize_rows(self.qdata[ids], scale, self.bits, self.embedding_dim)

    def extra_repr(self) -> str:
        return (
            f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, "
            f"group_size={self.group_size}"
        )


class NbitLinear(_QuantModule):
    """Weight-only quantized linear (4, 8 or 16 bits) dequantized on the fly in ``forward``.

    Holds the quantized data as buffers ``qdata``/``qscale`` (int4 stays packed) and the bias as
    a float32 buffer. Built with ``tied_to`` it holds no weight of its own and reads the table of
    that :class:`QuantEmbedding` (tied output projection).
    """

    kind = "nbit"

    def __init__(
        self,
        qweight: QuantizedWeight | None,
        bias: Tensor | None = None,
        *,
        tied_to: QuantEmbedding | None = None,
    ) -> None:
        super().__init__()
        if tied_to is not None:
            qweight = tied_to.qweight
            # A plain attribute, not a submodule: the table belongs to the embedding, and
            # reading it through the module keeps the tie after .to(device).
            object.__setattr__(self, "tied_to", tied_to)
        else:
            if qweight is None:
                raise ValueError("NbitLinear needs a QuantizedWeight or tied_to")
            object.__setattr__(self, "tied_to", None)
            self.register_buffer("qdata", qweight.data)
            self.register_buffer("qscale", qweight.scale)
        self.out_features, self.in_features = qweight.shape
        self.bits = qweight.bits
        self.group_size = qweight.group_size
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(
                    f"bias shape {tuple(bias.shape)} does not fit {self.out_features} outputs"
                )
            bias = bias.detach().to(torch.float32).clone()
        self.register_buffer("bias", bias)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        bits: int,
        group_size: int = 0,
        half_dtype: torch.dtype = torch.float16,
    ) -> NbitLinear:
        return cls(quantize_tensor(linear.weight, bits, group_size, half_dtype), linear.bias)

    def _table(self) -> tuple[Tensor, Tensor | None]:
        owner = self.tied_to if self.tied_to is not None else self
        return owner.qdata, owner.qscale

    @property
    def qweight(self) -> QuantizedWeight:
        data, scale = self._table()
        return QuantizedWeight(
            self.bits, self.group_size, (self.out_features, self.in_features), data, scale
        )

    def forward(self, x: Tensor) -> Tensor:
        data, scale = self._table()
        w = dequantize_rows(data, scale, self.bits, self.in_features)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    def extra_repr(self) -> str:
        tied = ", tied" if self.tied_to is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}{tied}"
        )


class DynamicInt8Linear(_QuantModule):
    """Int8 weights with per-output-channel scales, run by PyTorch's dynamic int8 kernel
    (``torch.ao.nn.quantized.dynamic.Linear``; fbgemm/x86 engine where available). CPU only.

    The torch.ao module is a private attribute, not a submodule: ``state_dict`` and
    :func:`quantized_state` hold the plain int8 data, float32 scales and bias it was built from
    (unpacked exactly from the kernel's packed weight), never torch's packed params. The input
    is cast to float32 (bf16 autocast) and the output is float32.
    """

    kind = "dynamic-int8"

    def __init__(
        self,
        qweight: QuantizedWeight | None,
        bias: Tensor | None = None,
        *,
        tied_to: QuantEmbedding | None = None,
    ) -> None:
        super().__init__()
        if tied_to is not None:
            qweight = tied_to.qweight
        if qweight is None:
            raise ValueError("DynamicInt8Linear needs a QuantizedWeight or tied_to")
        if qweight.bits != 8 or qweight.group_size != 0:
            raise ValueError(
                "DynamicInt8Linear needs 8-bit weights with per-row scales (group_size 0), got "
                f"bits={qweight.bits}, group_size={qweight.group_size}"
            )
        object.__setattr__(self, "tied_to", tied_to)
        self.out_features, self.in_features = qweight.shape
        self.bits = 8
        self.group_size = 0
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(
                f"bias shape {tuple(bias.shape)} does not fit {self.out_features} outputs"
            )
        self._build(qweight.data, qweight.scale, bias)

    def _build(self, data: Tensor, scale: Tensor | None, bias: Tensor | None) -> None:
        assert scale is not None
        object.__setattr__(self, "_qlinear", _dynamic_linear(data, scale, bias))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DynamicInt8Linear:
        return cls(quantize_tensor(linear.weight, 8, 0), linear.bias)

    @property
    def qweight(self) -> QuantizedWeight:
        """The int8 data and float32 (out, 1) scales, unpacked from the kernel's weight."""
        with _ao_calls():
            w = self._qlinear.weight()
            data = w.int_repr().contiguous()
            scale = w.q_per_channel_scales().to(torch.float32).reshape(-1, 1).contiguous()
        return QuantizedWeight(8, 0, (self.out_features, self.in_features), data, scale)

    @property
    def bias(self) -> Tensor | None:
        with _ao_calls():
            bias = self._qlinear.bias()
        return None if bias is None else bias.detach()

    def packed_nbytes(self) -> int:
        """Bytes of int8 weights, float32 scales and bias the kernel holds (its packed copy)."""
        bias = 0 if self.bias is None else 4 * self.out_features
        return self.out_features * self.in_features + 4 * self.out_features + bias

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise ModelError(
                f"dynamic-int8 layers run on the CPU only, got an input on {x.device}"
            )
        if x.dtype != torch.float32:
            x = x.float()
        return self._qlinear(x)

    # state_dict holds plain tensors, not torch's packed params
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self.tied_to is None:
            qweight = self.qweight
            destination[prefix + "qdata"] = qweight.data
            destination[prefix + "qscale"] = qweight.scale
        bias = self.bias
        if bias is not None:
            destination[prefix + "bias"] = bias

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        names = (["qdata", "qscale"] if self.tied_to is None else []) + (
            ["bias"] if self.bias is not None else []
        )
        missing = [prefix + n for n in names if prefix + n not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        current = self.qweight
        data = state_dict[prefix + "qdata"] if self.tied_to is None else current.data
        scale = state_dict[prefix + "qscale"] if self.tied_to is None else current.scale
        bias = state_dict[prefix + "bias"] if self.bias is not None else None
        if data.shape != current.data.shape or data.dtype != torch.int8:
            error_msgs.append(f"{prefix}qdata: expected int8 {tuple(current.data.shape)}")
            return
        self._build(data, scale.to(torch.float32), bias)

    # deepcopy/pickle: rebuild the kernel's weight from plain tensors
    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        qweight = self.qweight
        state["_qlinear"] = None
        state["_plain"] = (qweight.data, qweight.scale, self.bias)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        plain = state.pop("_plain")
        super().__setstate__(state)
        self._build(*plain)

    def extra_repr(self) -> str:
        tied = ", tied" if self.tied_to is not None else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}{tied}"
        )


_LINEAR_TYPES = (NbitLinear, DynamicInt8Linear)


def is_quantized(model: nn.Module) -> bool:
    """True when any module of ``model`` is a quantized module of this file."""
    return any(isinstance(m, _QuantModule) for m in model.modules())


# -- plans ------------------------------------------------------------------------------------------

_KINDS = ("fp32", "nbit", "dynamic-int8")


def _choice_kind(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value not in _KINDS:
        raise ModelError(f"quantization kind must be one of {', '.join(_KINDS)}, got {value!r}")


@attrs.frozen
class LayerChoice:
    """How one layer (or the tied embedding group) is stored.

    ``kind``: "fp32" (unchanged), "nbit" (:class:`NbitLinear` / :class:`QuantEmbedding`, bits
    4, 8 or 16, scales per row or per ``group_size`` input columns) or "dynamic-int8"
    (:class:`DynamicInt8Linear`: bits 8, per-row scales). ``half_dtype`` ("float16" or
    "bfloat16") is the 16-bit storage type. An embedding table under "dynamic-int8" is stored
    as 8-bit per-row (the same data a tied dynamic-int8 output projection runs on).
    """

    kind: str = attrs.field(validator=_choice_kind)
    bits: int = 8
    group_size: int = 0
    half_dtype: str = "float16"

    def __attrs_post_init__(self) -> None:
        if self.kind == "fp32":
            return
        try:
            _check_bits(self.bits, self.group_size)
        except ValueError as exc:
            raise ModelError(f"quantization {self.kind}: {exc}") from None
        if self.kind == "dynamic-int8" and (self.bits != 8 or self.group_size != 0):
            raise ModelError(
                "quantization dynamic-int8 needs bits 8 and group_size 0, got "
                f"bits={self.bits}, group_size={self.group_size}"
            )
        if self.half_dtype not in _HALF_DTYPES:
            raise ModelError(
                f"quantization half_dtype must be float16 or bfloat16, got {self.half_dtype!r}"
            )


def _tied_group(model: nn.Module) -> bool:
    """True when the model's src/tgt embeddings and output projection are one fp32 matrix."""
    src = getattr(model, "src_embed", None)
    out = getattr(model, "output_proj", None)
    return (
        isinstance(src, nn.Embedding)
        and getattr(model, "tgt_embed", None) is src
        and isinstance(out, nn.Linear)
        and out.weight is src.weight
    )


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the fp32 layers a plan can choose for: every nn.Linear and nn.Embedding module,
    with a tied CvmTransformer's src_embed/tgt_embed/output_proj as one entry ``"embeddings"``."""
    tied = _tied_group(model)
    grouped = {"src_embed", "tgt_embed", "output_proj"} if tied else set()
    names: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        if name in grouped:
            if name == "src_embed":
                names.append(EMBEDDINGS)
            continue
        names.append(name)
    return names


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, module)


def _quantized_linear(linear: nn.Linear, choice: LayerChoice) -> nn.Module:
    if choice.kind == "dynamic-int8":
        return DynamicInt8Linear.from_linear(linear)
    return NbitLinear.from_linear(
        linear, choice.bits, choice.group_size, _HALF_DTYPES[choice.half_dtype]
    )


def _quantized_embedding(embedding: nn.Embedding, choice: LayerChoice) -> QuantEmbedding:
    bits, group = (8, 0) if choice.kind == "dynamic-int8" else (choice.bits, choice.group_size)
    return QuantEmbedding.from_embedding(
        embedding, bits, group, _HALF_DTYPES[choice.half_dtype]
    )


@torch.no_grad()
def apply_plan(
    model: nn.Module,
    plan: dict[str, LayerChoice],
    default: LayerChoice | None = None,
) -> nn.Module:
    """Swap the fp32 layers of ``model`` for quantized ones, in place; returns ``model``.

    ``plan`` maps names from :func:`quantizable_layers` to choices; other layers get
    ``default`` (stay fp32 when it is None). Every choice is checked and every new module built
    before any is swapped in, so an error leaves the model unchanged.
    """
    layers = quantizable_layers(model)
    unknown = sorted(set(plan) - set(layers))
    if unknown:
        shown = ", ".join(layers[:6]) + (", ..." if len(layers) > 6 else "")
        raise ModelError(
            f"quantization plan names unknown layer(s) {', '.join(unknown)}; "
            f"quantizable layers: {shown}"
        )
    for name, choice in plan.items():
        if not isinstance(choice, LayerChoice):
            raise ModelError(
                f"quantization plan entry {name!r} must be a LayerChoice, got {type(choice).__name__}"
            )
    if default is not None and not isinstance(default, LayerChoice):
        raise ModelError(f"quantization default must be a LayerChoice, got {type(default).__name__}")

    swaps: list[tuple[str, nn.Module]] = []
    for name in layers:
        choice = plan.get(name, default)
        if choice is None or choice.kind == "fp32":
            continue
        try:
            if name == EMBEDDINGS and _tied_group(model):
                table = _quantized_embedding(model.src_embed, choice)
                bias = model.output_proj.bias
                out = (
                    DynamicInt8Linear(None, bias, tied_to=table)
                    if choice.kind == "dynamic-int8"
                    else NbitLinear(None, bias, tied_to=table)
                )
                swaps += [("src_embed", table), ("tgt_embed", table), ("output_proj", out)]
                continue
            module = model.get_submodule(name)
            if isinstance(module, nn.Embedding):
                swaps.append((name, _quantized_embedding(module, choice)))
            else:
                swaps.append((name, _quantized_linear(module, choice)))
        except ValueError as exc:
            raise ModelError(f"cannot quantize layer {name!r} ({choice.kind}): {exc}") from None
    for name, module in swaps:
        _set_module(model, name, module)
    return model


# -- storage --------------------------------------------------------------------------------------


def _plain_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and persistent buffers outside the quantized modules, each distinct tensor
    once under its first name (a tied fp32 matrix appears once)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for mname, module in model.named_modules():
        if isinstance(module, _QuantModule):
            continue
        prefix = f"{mname}." if mname else ""
        items = list(module.named_parameters(recurse=False)) + [
            (n, b)
            for n, b in module.named_buffers(recurse=False)
            if n not in module._non_persistent_buffers_set
        ]
        for pname, tensor in items:
            if tensor is None or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            out[prefix + pname] = tensor
    return out


def _module_names(model: nn.Module) -> dict[int, str]:
    """First name of each module (by identity)."""
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    return names


def _cpu(t: Tensor) -> Tensor:
    return t.detach().cpu().contiguous()


def quantized_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and JSON spec that store a (partly) quantized model; see docs/quantization.md.

    Tensors: ``<layer>.qdata``, ``<layer>.qscale`` (not for 16 bits) and ``<layer>.bias`` of each
    quantized module owning its data, plus every other parameter and persistent buffer under its
    state_dict name; shared data (tied embeddings) appears once. All are contiguous CPU tensors
    of plain dtypes (int8, uint8, float16, bfloat16, float32) for ``safetensors.torch.save_file``.
    """
    first = _module_names(model)
    layers: dict[str, dict[str, Any]] = {}
    tensors: dict[str, Tensor] = {}
    tied = False
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, _QuantModule) or name in layers:
            continue
        owner_name = first[id(module)]
        entry: dict[str, Any] = {
            "kind": module.kind,
            "bits": module.bits,
            "group_size": module.group_size,
        }
        if isinstance(module, QuantEmbedding):
            entry["shape"] = [module.num_embeddings, module.embedding_dim]
        else:
            entry["shape"] = [module.out_features, module.in_features]
            entry["bias"] = module.bias is not None
        if isinstance(module, QuantEmbedding) and owner_name != name:
            entry["tied_to"] = owner_name  # the same module under a second name
            tied = True
        elif isinstance(module, _LINEAR_TYPES) and module.tied_to is not None:
            entry["tied_to"] = first[id(module.tied_to)]
            tied = True
        else:
            qweight = module.qweight
            if qweight.bits == 16:
                entry["dtype"] = _HALF_NAMES[qweight.data.dtype]
            tensors[f"{name}.qdata"] = _cpu(qweight.data)
            if qweight.scale is not None:
                tensors[f"{name}.qscale"] = _cpu(qweight.scale)
        if isinstance(module, _LINEAR_TYPES) and module.bias is not None:
            tensors[f"{name}.bias"] = _cpu(module.bias).to(torch.float32)
        layers[name] = entry
    for key, tensor in _plain_tensors(model).items():
        tensors[key] = _cpu(tensor)
    spec = {"format": FORMAT, "tied_embeddings": tied, "layers": layers}
    return tensors, spec


def _take(
    tensors: dict[str, Tensor],
    key: str,
    dtypes: tuple[torch.dtype, ...],
    shape: tuple[int, ...],
    used: set[str],
) -> Tensor:
    if key not in tensors:
        raise ModelError(f"tensor {key!r} named by the quantization spec is missing")
    t = tensors[key]
    if t.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        got = str(t.dtype).removeprefix("torch.")
        raise ModelError(f"tensor {key!r} has dtype {got}, expected {names}")
    if tuple(t.shape) != tuple(shape):
        raise ModelError(f"tensor {key!r} has shape {list(t.shape)}, expected {list(shape)}")
    used.add(key)
    return t


def _int_field(name: str, entry: dict[str, Any], key: str) -> int:
    value = entry.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelError(f"quantization spec: layer {name!r} has no valid {key!r} (got {value!r})")
    return value


@torch.no_grad()
def load_quantized(
    model: nn.Module, spec: dict[str, Any], tensors: dict[str, Tensor]
) -> nn.Module:
    """Rebuild, in the fp32 skeleton ``model`` (e.g. a fresh ``CvmTransformer(config)``), the
    modules described by ``spec`` from ``tensors`` (as written by :func:`quantized_state`), and
    load every other tensor; returns ``model`` in eval mode. Outputs are bit-identical to the
    saved model's. Any missing, extra or ill-shaped tensor or bad spec entry is a one-line
    :class:`ModelError`."""
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        got = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise ModelError(f"quantization spec has format {got!r}, expected {FORMAT!r}")
    layers = spec.get("layers")
    if not isinstance(layers, dict):
        raise ModelError("quantization spec has no 'layers' mapping")
    used: set[str] = set()
    built: dict[str, nn.Module] = {}
    # owners first, then the names tied to them
    order = sorted(layers, key=lambda n: isinstance(layers[n], dict) and "tied_to" in layers[n])
    for name in order:
        entry = layers[name]
        if not isinstance(entry, dict):
            raise ModelError(f"quantization spec: layer {name!r} is not a mapping")
        kind = entry.get("kind")
        if kind not in ("nbit", "dynamic-int8", "embedding"):
            raise ModelError(
                f"quantization spec: layer {name!r} has unknown kind {kind!r} "
                "(known: nbit, dynamic-int8, embedding)"
            )
        bits = _int_field(name, entry, "bits")
        group_size = _int_field(name, entry, "group_size")
        try:
            _check_bits(bits, group_size)
        except ValueError as exc:
            raise ModelError(f"quantization spec: layer {name!r}: {exc}") from None
        if kind == "dynamic-int8" and (bits, group_size) != (8, 0):
            raise ModelError(
                f"quantization spec: layer {name!r}: dynamic-int8 needs bits 8 and group_size 0"
            )
        shape = entry.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) != 2
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
        ):
            raise ModelError(f"quantization spec: layer {name!r} has no valid shape (got {shape!r})")
        rows, cols = shape
        if group_size and cols % group_size:
            raise ModelError(
                f"quantization spec: layer {name!r}: {cols} columns not divisible by "
                f"group_size {group_size}"
            )
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise ModelError(
                f"quantization spec names layer {name!r}, which the model does not have"
            ) from None
        if kind == "embedding":
            if not isinstance(target, nn.Embedding):
                raise ModelError(f"quantization spec: layer {name!r} is not an embedding in the model")
            have = (target.num_embeddings, target.embedding_dim)
        else:
            if not isinstance(target, nn.Linear):
                raise ModelError(
                    f"quantization spec: layer {name!r} is not a linear layer in the model"
                )
            have = (target.out_features, target.in_features)
        if have != (rows, cols):
            raise ModelError(
                f"quantization spec: layer {name!r} has shape {[rows, cols]} but the model's "
                f"is {list(have)}"
            )

        tied_to = entry.get("tied_to")
        owner: QuantEmbedding | None = None
        if tied_to is not None:
            owner = built.get(tied_to) if isinstance(tied_to, str) else None
            if not isinstance(owner, QuantEmbedding):
                raise ModelError(
                    f"quantization spec: layer {name!r} is tied to {tied_to!r}, which is not a "
                    "quantized embedding"
                )
            if (owner.bits, owner.group_size, owner.qweight.shape) != (bits, group_size, (rows, cols)):
                raise ModelError(
                    f"quantization spec: layer {name!r} does not match the bits/group_size/shape "
                    f"of {tied_to!r}"
                )
            qweight = owner.qweight
        else:
            dtypes = _stored_dtypes(bits)
            if bits == 16:
                dtype_name = entry.get("dtype", "float16")
                if dtype_name not in _HALF_DTYPES:
                    raise ModelError(
                        f"quantization spec: layer {name!r} has unknown dtype {dtype_name!r}"
                    )
                dtypes = (_HALF_DTYPES[dtype_name],)
            data = _take(tensors, f"{name}.qdata", dtypes, _stored_shape(bits, (rows, cols)), used)
            scale = None
            if bits != 16:
                groups = 1 if group_size == 0 else cols // group_size
                scale = _take(tensors, f"{name}.qscale", (torch.float32,), (rows, groups), used)
                scale = scale.clone()
            qweight = QuantizedWeight(bits, group_size, (rows, cols), data.clone(), scale)

        if kind == "embedding":
            if owner is not None:
                built[name] = owner
                continue
            built[name] = QuantEmbedding(qweight, target.padding_idx)
            continue
        has_bias = entry.get("bias")
        if not isinstance(has_bias, bool) or has_bias != (target.bias is not None):
            raise ModelError(
                f"quantization spec: layer {name!r} has bias {has_bias!r} but the model's layer "
                f"{'has' if target.bias is not None else 'has no'} bias"
            )
        bias = None
        if has_bias:
            bias = _take(tensors, f"{name}.bias", (torch.float32,), (rows,), used)
        cls = DynamicInt8Linear if kind == "dynamic-int8" else NbitLinear
        built[name] = cls(qweight if owner is None else None, bias, tied_to=owner)

    for name, module in built.items():
        _set_module(model, name, module)

    plain = _plain_tensors(model)
    for key, tensor in plain.items():
        if key not in tensors:
            raise ModelError(f"tensor {key!r} is missing")
        source = tensors[key]
        if tuple(source.shape) != tuple(tensor.shape):
            raise ModelError(
                f"tensor {key!r} has shape {list(source.shape)}, expected {list(tensor.shape)}"
            )
        if not source.dtype.is_floating_point and tensor.dtype.is_floating_point:
            raise ModelError(f"tensor {key!r} has dtype {source.dtype}, expected {tensor.dtype}")
        tensor.copy_(source)
        used.add(key)
    extra = sorted(set(tensors) - used)
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise ModelError(
            f"unexpected tensor(s) {', '.join(repr(k) for k in extra[:3])}{more} not named by "
            "the quantization spec"
        )
    return model.eval()


# -- size -------------------------------------------------------------------------------------------


def model_nbytes(model: nn.Module) -> int:
    """Bytes of parameters and persistent buffers the model holds: quantized data at its real
    size (int4 packed), every distinct tensor once (tied data once), non-persistent buffers such
    as ``positions`` excluded. A :class:`DynamicInt8Linear` adds its kernel's own int8 copy
    (:meth:`DynamicInt8Linear.packed_nbytes`), which is held in memory besides a tied table."""
    seen: set[tuple[int, int, torch.dtype]] = set()
    total = 0
    for module in model.modules():
        items = list(module.parameters(recurse=False)) + [
            b
            for n, b in module.named_buffers(recurse=False)
            if n not in module._non_persistent_buffers_set
        ]
        for tensor in items:
            if tensor is None:
                continue
            key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
            if key in seen:
                continue
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        if isinstance(module, DynamicInt8Linear):
            total += module.packed_nbytes()
    return total
