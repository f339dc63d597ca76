"""Weight quantization of a :class:`~cvmkd_nmt.model.transformer.CvmTransformer`: quantized
Linear and Embedding modules swapped in per layer by a plan, and a compact tensor format.

Four module kinds replace fp32 layers (see docs/quantization.md, "Storage format"):

* :class:`NbitLinear` - weight-only 4/8/16-bit linear, dequantized on the fly in ``forward``
  (any device, any dtype, autocast). Int4 weights stay packed two per byte in memory.
* :class:`DynamicInt8Linear` - int8 weights, per-output-channel scales, executed by PyTorch's
  dynamic int8 kernel (fbgemm/x86 on the CPU; activations quantized per batch).
* :class:`StaticInt8Linear` - int8 weights as above plus calibrated per-tensor quint8 input and
  output parameters, executed by PyTorch's static int8 kernel. Built uncalibrated by
  :func:`apply_plan`; :func:`calibrate` runs data through the model and freezes them.
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
import math
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, cast

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvmkd_core.errors import ModelError
from cvmkd_nmt.hardware import cpu_has_int8_dot
from cvmkd_nmt.kernels import int8_row_product

if TYPE_CHECKING:
    # imported where used at runtime (the torch.ao modules load only when an int8 layer is built)
    from torch.ao.nn.quantized import Linear as AoLinear

__all__ = [
    "FORMAT",
    "OBSERVERS",
    "DynamicInt8Linear",
    "LayerChoice",
    "NbitLinear",
    "QuantEmbedding",
    "QuantizedWeight",
    "StaticInt8Linear",
    "activation_qparams",
    "apply_plan",
    "calibrate",
    "dequantize_rows",
    "is_quantized",
    "load_quantized",
    "model_nbytes",
    "pack_int4",
    "quantizable_layers",
    "quantize_tensor",
    "quantized_state",
    "uncalibrated_layers",
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
        raise ValueError(f"pack_int4 values must be in [-8, 7], got [{int(values.min())}, {int(values.max())}]")
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
        raise ValueError(f"unpack_int4: {m} packed bytes per row cannot hold {numel} values")
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
        raise ValueError(f"in_features {cols} is not divisible by group_size {group_size}")
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
    wanted: str | None = next((e for e in ("x86", "fbgemm") if e in engines), None)
    if wanted is None and current in (None, "none"):
        wanted = "qnnpack" if "qnnpack" in engines else None
    # the engine to use for these calls, None to leave the current one alone
    switch = wanted if wanted is not None and wanted != current else None
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*", category=UserWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization.*deprecated.*")
        if switch is not None:
            torch.backends.quantized.engine = switch
        try:
            yield
        finally:
            if switch is not None:
                torch.backends.quantized.engine = current


def _per_channel_weight(data: Tensor, scale: Tensor) -> Tensor:
    """A per-output-channel qint8 tensor of int8 ``data`` (out, in) and float32 ``scale``
    (out, 1), zero points 0 (call inside :func:`_ao_calls`)."""
    return torch._make_per_channel_quantized_tensor(
        data.cpu().contiguous(),
        scale.detach().cpu().reshape(-1).to(torch.float64),
        torch.zeros(data.size(0), dtype=torch.long),
        0,
    )


def _dynamic_linear(data: Tensor, scale: Tensor, bias: Tensor | None) -> AoLinear:
    """A ``torch.ao.nn.quantized.dynamic.Linear`` holding int8 ``data`` (out, in) with
    per-output-channel float32 ``scale`` (out, 1) and zero points 0."""
    from torch.ao.nn.quantized.dynamic import Linear as AoDynamicLinear

    out_features, in_features = data.shape
    with _ao_calls():
        qweight = _per_channel_weight(data, scale)
        module = AoDynamicLinear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        module.set_weight_bias(qweight, None if bias is None else bias.detach().cpu().to(torch.float32).contiguous())
    return module


def _static_linear(data: Tensor, scale: Tensor, bias: Tensor | None) -> AoLinear:
    """A ``torch.ao.nn.quantized.Linear`` (static: quint8 in, quint8 out) holding int8
    ``data`` (out, in) with per-output-channel float32 ``scale`` (out, 1) and zero points 0;
    its output ``scale``/``zero_point`` are set by the caller."""
    from torch.ao.nn.quantized import Linear as AoLinear

    out_features, in_features = data.shape
    with _ao_calls():
        qweight = _per_channel_weight(data, scale)
        module = AoLinear(in_features, out_features, bias_=bias is not None, dtype=torch.qint8)
        module.set_weight_bias(qweight, None if bias is None else bias.detach().cpu().to(torch.float32).contiguous())
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
    # buffers (registered in __init__), declared for type checkers: nn.Module's __getattr__
    # types every buffer as ``Tensor | Module``
    qdata: Tensor
    qscale: Tensor | None

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
        return cls(quantize_tensor(embedding.weight, bits, group_size, half_dtype), embedding.padding_idx)

    @property
    def qweight(self) -> QuantizedWeight:
        return QuantizedWeight(
            self.bits,
            self.group_size,
            (self.num_embeddings, self.embedding_dim),
            self.qdata,
            self.qscale,
        )

    @property
    def weight(self) -> Tensor:
        """The dequantized float32 table (a new tensor; for inspection)."""
        return self.qweight.dequantize()

    def forward(self, ids: Tensor) -> Tensor:
        scale = None if self.qscale is None else self.qscale[ids]
        return dequantize_rows(self.qdata[ids], scale, self.bits, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"


class NbitLinear(_QuantModule):
    """Weight-only quantized linear (4, 8 or 16 bits) dequantized on the fly in ``forward``.

    Holds the quantized data as buffers ``qdata``/``qscale`` (int4 stays packed) and the bias as
    a float32 buffer. Built with ``tied_to`` it holds no weight of its own and reads the table of
    that :class:`QuantEmbedding` (tied output projection).
    """

    kind = "nbit"
    # set in __init__ (buffers, and tied_to as a plain attribute), declared for type checkers;
    # a tied layer has no qdata/qscale buffers of its own
    tied_to: QuantEmbedding | None
    qdata: Tensor
    qscale: Tensor | None
    bias: Tensor | None

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
                raise ValueError(f"bias shape {tuple(bias.shape)} does not fit {self.out_features} outputs")
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
        return QuantizedWeight(self.bits, self.group_size, (self.out_features, self.in_features), data, scale)

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


class _KernelInt8Linear(_QuantModule):
    """Int8 weights with per-output-channel scales held by a private torch.ao int8 module
    (built by :meth:`_make_kernel`). CPU only.

    The torch.ao module is a private attribute, not a submodule: ``state_dict`` and
    :func:`quantized_state` hold the plain int8 data, float32 scales and bias it was built from
    (unpacked exactly from the kernel's packed weight), never torch's packed params.
    """

    # plain attributes set with object.__setattr__, declared for type checkers
    tied_to: QuantEmbedding | None
    _qlinear: AoLinear

    def __init__(
        self,
        qweight: QuantizedWeight | None,
        bias: Tensor | None = None,
        *,
        tied_to: QuantEmbedding | None = None,
    ) -> None:
        super().__init__()
        cls = type(self).__name__
        if tied_to is not None:
            qweight = tied_to.qweight
        if qweight is None:
            raise ValueError(f"{cls} needs a QuantizedWeight or tied_to")
        if qweight.bits != 8 or qweight.group_size != 0:
            raise ValueError(
                f"{cls} needs 8-bit weights with per-row scales (group_size 0), got "
                f"bits={qweight.bits}, group_size={qweight.group_size}"
            )
        object.__setattr__(self, "tied_to", tied_to)
        self.out_features, self.in_features = qweight.shape
        self.bits = 8
        self.group_size = 0
        if bias is not None and bias.shape != (self.out_features,):
            raise ValueError(f"bias shape {tuple(bias.shape)} does not fit {self.out_features} outputs")
        self._build(qweight.data, qweight.scale, bias)

    def _make_kernel(self, data: Tensor, scale: Tensor, bias: Tensor | None) -> AoLinear:
        """The torch.ao kernel holding the int8 weights; each subclass (dynamic, static) builds its own."""
        raise NotImplementedError

    def _build(self, data: Tensor, scale: Tensor | None, bias: Tensor | None) -> None:
        assert scale is not None
        object.__setattr__(self, "_qlinear", self._make_kernel(data, scale, bias))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Any:
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

    def _check_cpu(self, x: Tensor) -> None:
        if x.device.type != "cpu":
            raise ModelError(f"{self.kind} layers run on the CPU only, got an input on {x.device}")

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
        names = (["qdata", "qscale"] if self.tied_to is None else []) + (["bias"] if self.bias is not None else [])
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
        assert scale is not None  # 8-bit weights always have scales (checked in __init__)
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
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}{tied}"


class DynamicInt8Linear(_KernelInt8Linear):
    """Int8 weights with per-output-channel scales, run by PyTorch's dynamic int8 kernel
    (``torch.ao.nn.quantized.dynamic.Linear``; fbgemm/x86 engine where available). CPU only.

    The torch.ao module is a private attribute, not a submodule: ``state_dict`` and
    :func:`quantized_state` hold the plain int8 data, float32 scales and bias it was built from
    (unpacked exactly from the kernel's packed weight), never torch's packed params. The input
    is cast to float32 (bf16 autocast) and the output is float32.
    """

    kind = "dynamic-int8"

    def _make_kernel(self, data: Tensor, scale: Tensor, bias: Tensor | None) -> AoLinear:
        return _dynamic_linear(data, scale, bias)

    def forward(self, x: Tensor) -> Tensor:
        self._check_cpu(x)
        if x.dtype != torch.float32:
            x = x.float()
        return self._qlinear(x)

    def as_function(self) -> Callable[[Tensor], Tensor]:
        """This layer's int8 product as a function of float32 CPU inputs, calling the kernel's
        operator directly (decoding's per-token step: two module calls fewer per product)."""
        return _kernel_function(self._qlinear)

    @classmethod
    def stacked_function(cls, layers: Sequence[DynamicInt8Linear]) -> Callable[[Tensor], Tensor]:
        """The outputs of ``layers`` on one input concatenated on the last dimension, as one
        int8 product over their stacked rows (remembered until one of them is rebuilt). Exact:
        the input's int8 scale is computed from the input alone and every weight row keeps its
        own scale, so each output equals its layer's own."""
        kernels = tuple(layer._qlinear for layer in layers)
        memo = _STACKED.get(layers[0])
        if memo is None or len(memo[0]) != len(kernels) or any(a is not b for a, b in zip(memo[0], kernels)):
            biases = [layer.bias for layer in layers]
            if len({b is None for b in biases}) > 1:  # some with a bias, some without: one by one
                fns = [layer.as_function() for layer in layers]
                return lambda x: torch.cat([f(x) for f in fns], dim=-1)
            bias = None if biases[0] is None else torch.cat(cast("list[Tensor]", biases))
            weights = [layer.qweight for layer in layers]
            data = torch.cat([w.data for w in weights])
            scale = torch.cat([cast("Tensor", w.scale) for w in weights])
            memo = (kernels, _dynamic_linear(data, scale, bias))
            _STACKED[layers[0]] = memo
        return _kernel_function(memo[1])


# the stacked kernel of DynamicInt8Linear.stacked_function, by the first stacked layer
_STACKED: weakref.WeakKeyDictionary[DynamicInt8Linear, tuple[tuple[Any, ...], Any]] = weakref.WeakKeyDictionary()


def _kernel_function(kernel: Any) -> Callable[[Tensor], Tensor]:
    """A torch.ao dynamic int8 Linear's operator on float32 CPU inputs, without its module call;
    inputs of one or two rows (decoding one sentence) through cvmkd's C kernel where the CPU has
    AVX512-VNNI (:func:`cvmkd_nmt.kernels.int8_row_product`: the same values, faster). Made once
    per kernel."""
    fast = _ROW_FUNCTIONS.get(kernel)
    if fast is not None:
        return fast
    packed = kernel._packed_params._packed_params
    reduce_range = kernel.version is not None and kernel.version >= 4
    op = torch.ops.quantized.linear_dynamic

    def run(x: Tensor) -> Tensor:
        if x.device.type != "cpu":
            raise ModelError(f"dynamic-int8 layers run on the CPU only, got an input on {x.device}")
        if x.dtype != torch.float32:
            x = x.float()
        return op(x, packed, reduce_range=reduce_range)

    # the plain int8 weights, unpacked once per kernel (a copy beside the kernel's packed one)
    with _ao_calls():
        weight, bias = kernel.weight(), kernel.bias()
        data, scale = weight.int_repr(), weight.q_per_channel_scales().to(torch.float32)
    fast = _ROW_FUNCTIONS[kernel] = int8_row_product(data, scale, bias, reduce_range, run)
    return fast


# the function of _kernel_function by torch.ao kernel (rebuilt, with a new kernel, when weights change)
_ROW_FUNCTIONS: weakref.WeakKeyDictionary[Any, Callable[[Tensor], Tensor]] = weakref.WeakKeyDictionary()


# -- static int8: calibrated activation ranges ----------------------------------------------------

#: Observers :func:`calibrate` offers.
OBSERVERS = ("minmax", "percentile")
# quint8 range of a static layer's input: with reduce_range 7 bits (torch's default for the
# x86/fbgemm engines, whose AVX2 kernels add pairs of u8 x s8 products in int16, which can
# saturate on CPUs without VNNI), else the full 8 bits.
_INPUT_QRANGE = {True: (0, 127), False: (0, 255)}
# quint8 range of a static layer's output (requantized from int32: no saturation risk)
_OUTPUT_QRANGE = (0, 255)
_HIST_BINS = 2048


class _RangeObserver:
    """The range of every value passed to :meth:`observe` over a whole calibration.

    ``minmax`` keeps the exact running min and max. ``percentile`` also keeps a histogram of
    2048 bins over a symmetric bound ``[-R, R]`` that doubles (merging pairs of bins, exactly)
    when a value falls outside, and reports the ``(100 - p)``th and ``p``th percentiles, to the
    bin's outer edge and within the observed min/max. Memory is constant whatever the data.
    """

    def __init__(self, method: str, percentile: float) -> None:
        self.method = method
        self.percentile = percentile
        self.count = 0
        self.min = math.inf
        self.max = -math.inf
        self.bound = 0.0
        self.hist: Tensor | None = None

    def observe(self, x: Tensor) -> None:
        x = x.detach().to(torch.float32)
        if x.numel() == 0:
            return
        lo, hi = (float(v) for v in torch.aminmax(x))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ModelError("calibration saw inf or NaN activations")
        self.count += x.numel()
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        if self.method != "percentile":
            return
        bound = max(-lo, hi)
        if self.hist is None:
            self.bound = bound if bound > 0 else 1.0
            self.hist = torch.zeros(_HIST_BINS, dtype=torch.float64)
        while bound > self.bound:
            # [-R, R] -> [-2R, 2R]: bins 2j and 2j+1 become bin BINS/4 + j
            pairs = self.hist.view(-1, 2).sum(dim=1)
            self.hist = torch.zeros(_HIST_BINS, dtype=torch.float64)
            self.hist[_HIST_BINS // 4 : _HIST_BINS // 4 + pairs.numel()] = pairs
            self.bound *= 2
        counts = torch.histc(x.reshape(-1), _HIST_BINS, -self.bound, self.bound)
        self.hist = self.hist + counts.to(torch.float64)

    def range(self) -> tuple[float, float]:
        """(low, high) to quantize to: the min/max, or the percentiles within them."""
        if self.count == 0:
            raise ValueError("no values observed")
        if self.method != "percentile" or self.hist is None:
            return self.min, self.max
        cum = self.hist.cumsum(0)
        total = float(cum[-1])
        width = 2 * self.bound / _HIST_BINS
        tail = total * (1 - self.percentile / 100)
        low_bin = int(torch.searchsorted(cum, torch.tensor(tail, dtype=torch.float64), right=True))
        high_bin = int(torch.searchsorted(cum, torch.tensor(total - tail, dtype=torch.float64)))
        low = -self.bound + low_bin * width
        high = -self.bound + (min(high_bin, _HIST_BINS - 1) + 1) * width
        return max(low, self.min), min(high, self.max)


def activation_qparams(low: float, high: float, qmin: int, qmax: int) -> tuple[Tensor, Tensor]:
    """Affine quint8 parameters for values in [low, high] (widened to include 0, so that zero
    is exact): float32 ``scale = (high - low) / (qmax - qmin)`` (at least float32 eps) and int64
    ``zero_point = qmin - round(low / scale)`` within [qmin, qmax] - torch's MinMaxObserver rule."""
    lo = torch.tensor(min(low, 0.0), dtype=torch.float32)
    hi = torch.tensor(max(high, 0.0), dtype=torch.float32)
    scale = torch.clamp((hi - lo) / float(qmax - qmin), min=torch.finfo(torch.float32).eps)
    zero_point = torch.clamp(qmin - torch.round(lo / scale).to(torch.int64), qmin, qmax)
    return scale, zero_point


class StaticInt8Linear(_KernelInt8Linear):
    """Int8 weights with per-output-channel scales and calibrated (static) int8 activations,
    run by PyTorch's static int8 kernel (``torch.ao.nn.quantized.Linear``, i.e.
    ``torch.ops.quantized.linear`` on a prepacked weight; fbgemm/x86 engine). CPU only.

    ``forward`` casts the input to float32 (bf16 autocast), quantizes it to quint8 with the
    calibrated input ``scale``/``zero_point``, runs the kernel (int32 accumulation, requantized
    to quint8 with the calibrated output ``scale``/``zero_point``) and returns the dequantized
    float32 output. The four parameters are the float32 buffer ``act_scale`` = [input, output]
    and the int64 buffer ``act_zero_point`` = [input, output].

    A new layer (from :func:`apply_plan` or :meth:`from_linear`) is uncalibrated: its forward,
    ``state_dict`` and :func:`quantized_state` raise :class:`ModelError` until
    :func:`calibrate` has run data through it. While calibrating, ``forward`` computes
    ``x @ dequantized(w).T + b`` in float32 and observes its input and output.
    """

    kind = "static-int8"
    # plain attributes set with object.__setattr__, declared for type checkers:
    # (input scale, input zero point, output scale, output zero point) once calibrated
    _act: tuple[float, int, float, int] | None
    # (dequantized weight, bias, (input observer, output observer)) while calibrating
    _calibration: tuple[Tensor, Tensor | None, tuple[_RangeObserver, _RangeObserver]] | None

    def __init__(
        self,
        qweight: QuantizedWeight | None,
        bias: Tensor | None = None,
        *,
        tied_to: QuantEmbedding | None = None,
        act_scale: Tensor | None = None,
        act_zero_point: Tensor | None = None,
    ) -> None:
        object.__setattr__(self, "_act", None)  # (in scale, in zp, out scale, out zp) as Python
        object.__setattr__(self, "_calibration", None)
        super().__init__(qweight, bias, tied_to=tied_to)
        self.register_buffer("act_scale", None)
        self.register_buffer("act_zero_point", None)
        if act_scale is not None or act_zero_point is not None:
            if act_scale is None or act_zero_point is None:
                raise ValueError("StaticInt8Linear needs both act_scale and act_zero_point")
            self.set_activation_qparams(act_scale, act_zero_point)

    def _make_kernel(self, data: Tensor, scale: Tensor, bias: Tensor | None) -> AoLinear:
        return _static_linear(data, scale, bias)

    def _build(self, data: Tensor, scale: Tensor | None, bias: Tensor | None) -> None:
        super()._build(data, scale, bias)
        self._sync_kernel()

    def _sync_kernel(self) -> None:
        if self._act is not None:
            self._qlinear.scale = self._act[2]
            self._qlinear.zero_point = self._act[3]

    @property
    def calibrated(self) -> bool:
        return self._act is not None

    def set_activation_qparams(self, act_scale: Tensor, act_zero_point: Tensor) -> None:
        """Freeze the activation parameters: float32 ``act_scale`` and int64
        ``act_zero_point``, each [input, output]; scales finite and > 0, zero points in the
        quint8 range [0, 255]."""
        scale = torch.as_tensor(act_scale).detach()
        zero_point = torch.as_tensor(act_zero_point).detach()
        if scale.dtype != torch.float32 or tuple(scale.shape) != (2,):
            raise ValueError(f"act_scale must be float32 of shape [2], got {scale.dtype} {list(scale.shape)}")
        if zero_point.dtype != torch.int64 or tuple(zero_point.shape) != (2,):
            raise ValueError(
                f"act_zero_point must be int64 of shape [2], got {zero_point.dtype} {list(zero_point.shape)}"
            )
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise ValueError(f"act_scale must be finite and > 0, got {scale.tolist()}")
        if not bool(((zero_point >= 0) & (zero_point <= 255)).all()):
            raise ValueError(f"act_zero_point must be in [0, 255], got {zero_point.tolist()}")
        self.act_scale = scale.cpu().clone()
        self.act_zero_point = zero_point.cpu().clone()
        s, z = self.act_scale.tolist(), self.act_zero_point.tolist()
        object.__setattr__(self, "_act", (s[0], int(z[0]), s[1], int(z[1])))
        self._sync_kernel()

    # -- calibration (driven by calibrate()) --

    def _start_calibration(self, method: str, percentile: float) -> None:
        weight = self.qweight.dequantize()
        observers = (_RangeObserver(method, percentile), _RangeObserver(method, percentile))
        object.__setattr__(self, "_calibration", (weight, self.bias, observers))

    def _stop_calibration(self) -> None:
        object.__setattr__(self, "_calibration", None)

    def _calibration_result(self, reduce_range: bool) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """(act_scale, act_zero_point, summary) from what the observers saw."""
        assert self._calibration is not None
        scales, zero_points, summary = [], [], {}
        for observer, side, (qmin, qmax) in zip(
            self._calibration[2], ("input", "output"), (_INPUT_QRANGE[reduce_range], _OUTPUT_QRANGE)
        ):
            low, high = observer.range()
            scale, zero_point = activation_qparams(low, high, qmin, qmax)
            scales.append(scale)
            zero_points.append(zero_point)
            summary[side] = {
                "min": observer.min,
                "max": observer.max,
                "low": low,
                "high": high,
                "scale": float(scale),
                "zero_point": int(zero_point),
            }
        return torch.stack(scales), torch.stack(zero_points), summary

    def _observe(self, x: Tensor) -> Tensor:
        assert self._calibration is not None  # forward calls this only while calibrating
        weight, bias, (inputs, outputs) = self._calibration
        with torch.autocast(x.device.type, enabled=False):
            x = x.to(torch.float32)
            inputs.observe(x)
            y = F.linear(x, weight.to(x.device), None if bias is None else bias.to(x.device))
            outputs.observe(y)
        return y

    def forward(self, x: Tensor) -> Tensor:
        if self._calibration is not None:
            return self._observe(x)
        act = self._act
        if act is None:
            raise ModelError(
                "static-int8 layer is not calibrated: run cvmkd_nmt.quantized.calibrate(model, run) "
                "on it before using it"
            )
        self._check_cpu(x)
        if x.dtype != torch.float32:
            x = x.float()
        qx = torch.quantize_per_tensor(x, act[0], act[1], torch.quint8)
        return self._qlinear(qx).dequantize()

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        if self._act is None:
            raise ModelError(f"static-int8 layer {prefix.rstrip('.') or '(root)'} is not calibrated: nothing to save")
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "act_scale"] = self.act_scale
        destination[prefix + "act_zero_point"] = self.act_zero_point

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
        missing = [prefix + n for n in ("act_scale", "act_zero_point") if prefix + n not in state_dict]
        if missing:
            missing_keys.extend(missing)
            return
        try:
            self.set_activation_qparams(state_dict[prefix + "act_scale"], state_dict[prefix + "act_zero_point"])
        except ValueError as exc:
            error_msgs.append(f"{prefix}act_scale/act_zero_point: {exc}")
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        base = super().extra_repr()
        if self._act is None:
            return base + ", uncalibrated"
        s_in, z_in, s_out, z_out = self._act
        return base + f", input=({s_in:.4g}, {z_in}), output=({s_out:.4g}, {z_out})"


_LINEAR_TYPES = (NbitLinear, DynamicInt8Linear, StaticInt8Linear)


def uncalibrated_layers(model: nn.Module) -> list[str]:
    """Names of the static-int8 layers of ``model`` that :func:`calibrate` has not frozen yet."""
    return [name for name, m in model.named_modules() if isinstance(m, StaticInt8Linear) and not m.calibrated]


def calibrate(
    model: nn.Module,
    run: Callable[[nn.Module], Any],
    *,
    observer: str = "minmax",
    percentile: float = 99.99,
    reduce_range: bool = True,
) -> dict[str, dict[str, Any]]:
    """Calibrate every :class:`StaticInt8Linear` of ``model`` (a new one or a calibrated one,
    again) and freeze its activation parameters; returns, per layer, what was observed and
    chosen (``{"input": {"min", "max", "low", "high", "scale", "zero_point"}, "output": ...}``).

    ``run(model)`` runs the calibration data through the model (forward passes, decoding, ...;
    under ``torch.no_grad`` or inference mode as it likes). Meanwhile each static layer computes
    in float32 with its dequantized int8 weight and observes its input and output.
    ``observer`` "minmax" takes the observed extremes; "percentile" the ``100 - percentile``
    and ``percentile`` percentiles of all values seen (a histogram, :class:`_RangeObserver`).
    Outputs get 8-bit quint8 parameters ([0, 255]); inputs 7-bit ([0, 127]) with
    ``reduce_range`` (torch's default for x86/fbgemm: safe on any x86 CPU), else 8-bit: more
    precise, exact on CPUs with VNNI (AVX512-VNNI, AVX-VNNI, AMX), but fbgemm's AVX2 kernel adds
    pairs of u8 x s8 products in int16 and may saturate there. Values beyond the input range
    still quantize up to 255 at inference (torch's behaviour), outputs clamp to [0, 255].
    All layers are frozen together at the end; if ``run`` raises, or some layer saw no data,
    no layer changes (the latter is a :class:`ModelError`).
    """
    if observer not in OBSERVERS:
        raise ModelError(f"observer must be one of {', '.join(OBSERVERS)}, got {observer!r}")
    if not (isinstance(percentile, (int, float)) and 50 < percentile <= 100):
        raise ModelError(f"percentile must be in (50, 100], got {percentile!r}")
    if not reduce_range and not cpu_has_int8_dot():
        warnings.warn(
            "static-int8 with 8-bit inputs (reduce_range=False) on a CPU without VNNI: fbgemm's AVX2 "
            "kernel can saturate, so this machine's outputs may be far from the model's; use "
            "reduce_range=True here, or run the model on a CPU with AVX512-VNNI, AVX-VNNI or AMX",
            RuntimeWarning,
            stacklevel=2,
        )
    layers: dict[str, StaticInt8Linear] = {}
    for name, module in model.named_modules():
        if isinstance(module, StaticInt8Linear):
            layers[name] = module
    if not layers:
        raise ModelError("calibrate: the model has no static-int8 layers")
    for module in layers.values():
        module._start_calibration(observer, float(percentile))
    try:
        run(model)
        unseen = []
        for name, m in layers.items():
            assert m._calibration is not None  # started above, stopped only in the finally below
            if m._calibration[2][0].count == 0:
                unseen.append(name)
        if unseen:
            more = f" and {len(unseen) - 3} more" if len(unseen) > 3 else ""
            raise ModelError(f"calibration ran no data through static-int8 layer(s) {', '.join(unseen[:3])}{more}")
        results = {name: m._calibration_result(bool(reduce_range)) for name, m in layers.items()}
    finally:
        for module in layers.values():
            module._stop_calibration()
    summary: dict[str, dict[str, Any]] = {}
    for name, (scale, zero_point, info) in results.items():
        layers[name].set_activation_qparams(scale, zero_point)
        summary[name] = info
    return summary


def is_quantized(model: nn.Module) -> bool:
    """True when any module of ``model`` is a quantized module of this file."""
    return any(isinstance(m, _QuantModule) for m in model.modules())


# -- plans ------------------------------------------------------------------------------------------

_KINDS = ("fp32", "nbit", "dynamic-int8", "static-int8")
_INT8_KINDS = ("dynamic-int8", "static-int8")


def _choice_kind(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value not in _KINDS:
        raise ModelError(f"quantization kind must be one of {', '.join(_KINDS)}, got {value!r}")


@attrs.frozen
class LayerChoice:
    """How one layer (or the tied embedding group) is stored.

    ``kind``: "fp32" (unchanged), "nbit" (:class:`NbitLinear` / :class:`QuantEmbedding`, bits
    4, 8 or 16, scales per row or per ``group_size`` input columns), "dynamic-int8"
    (:class:`DynamicInt8Linear`: bits 8, per-row scales) or "static-int8"
    (:class:`StaticInt8Linear`: bits 8, per-row scales, activation ranges from
    :func:`calibrate`). ``half_dtype`` ("float16" or "bfloat16") is the 16-bit storage type. An
    embedding table under "dynamic-int8" or "static-int8" is stored as 8-bit per-row (the same
    data a tied int8 output projection runs on).
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
        if self.kind in _INT8_KINDS and (self.bits != 8 or self.group_size != 0):
            raise ModelError(
                f"quantization {self.kind} needs bits 8 and group_size 0, got "
                f"bits={self.bits}, group_size={self.group_size}"
            )
        if self.half_dtype not in _HALF_DTYPES:
            raise ModelError(f"quantization half_dtype must be float16 or bfloat16, got {self.half_dtype!r}")


def _tied_group(model: nn.Module) -> bool:
    """True when the model's src/tgt embeddings and output projection are one fp32 matrix."""
    src = getattr(model, "src_embed", None)
    out = getattr(model, "output_proj", None)
    # the identity test first: mypy's narrowing on ``is`` would undo isinstance's narrowing of src
    return (
        getattr(model, "tgt_embed", None) is src
        and isinstance(src, nn.Embedding)
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
    if choice.kind == "static-int8":
        return StaticInt8Linear.from_linear(linear)
    return NbitLinear.from_linear(linear, choice.bits, choice.group_size, _HALF_DTYPES[choice.half_dtype])


_LINEAR_CLASSES: dict[str, type[nn.Module]] = {
    "nbit": NbitLinear,
    "dynamic-int8": DynamicInt8Linear,
    "static-int8": StaticInt8Linear,
}


def _quantized_embedding(embedding: nn.Embedding, choice: LayerChoice) -> QuantEmbedding:
    bits, group = (8, 0) if choice.kind in _INT8_KINDS else (choice.bits, choice.group_size)
    return QuantEmbedding.from_embedding(embedding, bits, group, _HALF_DTYPES[choice.half_dtype])


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

    "static-int8" layers come out uncalibrated: run :func:`calibrate` on the model before
    using or saving it (:func:`uncalibrated_layers` lists them).
    """
    layers = quantizable_layers(model)
    unknown = sorted(set(plan) - set(layers))
    if unknown:
        shown = ", ".join(layers[:6]) + (", ..." if len(layers) > 6 else "")
        raise ModelError(f"quantization plan names unknown layer(s) {', '.join(unknown)}; quantizable layers: {shown}")
    for name, entry in plan.items():
        if not isinstance(entry, LayerChoice):
            raise ModelError(f"quantization plan entry {name!r} must be a LayerChoice, got {type(entry).__name__}")
    if default is not None and not isinstance(default, LayerChoice):
        raise ModelError(f"quantization default must be a LayerChoice, got {type(default).__name__}")

    swaps: list[tuple[str, nn.Module]] = []
    for name in layers:
        choice = plan.get(name, default)
        if choice is None or choice.kind == "fp32":
            continue
        try:
            if name == EMBEDDINGS and _tied_group(model):
                src_embed, output_proj = model.src_embed, model.output_proj
                assert isinstance(src_embed, nn.Embedding) and isinstance(output_proj, nn.Linear)  # _tied_group
                table = _quantized_embedding(src_embed, choice)
                bias = output_proj.bias
                out = _LINEAR_CLASSES[choice.kind](None, bias, tied_to=table)
                swaps += [("src_embed", table), ("tgt_embed", table), ("output_proj", out)]
                continue
            module = model.get_submodule(name)
            if isinstance(module, nn.Embedding):
                swaps.append((name, _quantized_embedding(module, choice)))
            else:
                assert isinstance(module, nn.Linear)  # quantizable_layers names only these two kinds
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
            (n, b) for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
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
    quantized module owning its data, ``<layer>.act_scale`` / ``<layer>.act_zero_point`` of each
    static-int8 layer (tied or not), plus every other parameter and persistent buffer under its
    state_dict name; shared data (tied embeddings) appears once. All are contiguous CPU tensors
    of plain dtypes (int8, uint8, float16, bfloat16, float32, int64) for
    ``safetensors.torch.save_file``. An uncalibrated static-int8 layer is a :class:`ModelError`.
    """
    pending = uncalibrated_layers(model)
    if pending:
        more = f" and {len(pending) - 3} more" if len(pending) > 3 else ""
        raise ModelError(
            f"cannot save: static-int8 layer(s) {', '.join(pending[:3])}{more} not calibrated "
            "(run cvmkd_nmt.quantized.calibrate first)"
        )
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
            assert isinstance(module, (QuantEmbedding, NbitLinear, _KernelInt8Linear))  # the _QuantModule kinds
            qweight = module.qweight
            if qweight.bits == 16:
                entry["dtype"] = _HALF_NAMES[qweight.data.dtype]
            tensors[f"{name}.qdata"] = _cpu(qweight.data)
            if qweight.scale is not None:
                tensors[f"{name}.qscale"] = _cpu(qweight.scale)
        if isinstance(module, _LINEAR_TYPES) and module.bias is not None:
            tensors[f"{name}.bias"] = _cpu(module.bias).to(torch.float32)
        if isinstance(module, StaticInt8Linear):
            tensors[f"{name}.act_scale"] = _cpu(module.act_scale)
            tensors[f"{name}.act_zero_point"] = _cpu(module.act_zero_point)
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
def load_quantized(model: nn.Module, spec: dict[str, Any], tensors: dict[str, Tensor]) -> nn.Module:
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
        if kind not in ("nbit", "dynamic-int8", "static-int8", "embedding"):
            raise ModelError(
                f"quantization spec: layer {name!r} has unknown kind {kind!r} "
                "(known: nbit, dynamic-int8, static-int8, embedding)"
            )
        bits = _int_field(name, entry, "bits")
        group_size = _int_field(name, entry, "group_size")
        try:
            _check_bits(bits, group_size)
        except ValueError as exc:
            raise ModelError(f"quantization spec: layer {name!r}: {exc}") from None
        if kind in _INT8_KINDS and (bits, group_size) != (8, 0):
            raise ModelError(f"quantization spec: layer {name!r}: {kind} needs bits 8 and group_size 0")
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
                f"quantization spec: layer {name!r}: {cols} columns not divisible by group_size {group_size}"
            )
        try:
            target = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"quantization spec names layer {name!r}, which the model does not have") from None
        if kind == "embedding":
            if not isinstance(target, nn.Embedding):
                raise ModelError(f"quantization spec: layer {name!r} is not an embedding in the model")
            have = (target.num_embeddings, target.embedding_dim)
        else:
            if not isinstance(target, nn.Linear):
                raise ModelError(f"quantization spec: layer {name!r} is not a linear layer in the model")
            have = (target.out_features, target.in_features)
        if have != (rows, cols):
            raise ModelError(
                f"quantization spec: layer {name!r} has shape {[rows, cols]} but the model's is {list(have)}"
            )

        tied_to = entry.get("tied_to")
        owner: QuantEmbedding | None = None
        if tied_to is not None:
            tied_module = built.get(tied_to) if isinstance(tied_to, str) else None
            if not isinstance(tied_module, QuantEmbedding):
                raise ModelError(
                    f"quantization spec: layer {name!r} is tied to {tied_to!r}, which is not a quantized embedding"
                )
            owner = tied_module
            if (owner.bits, owner.group_size, owner.qweight.shape) != (bits, group_size, (rows, cols)):
                raise ModelError(
                    f"quantization spec: layer {name!r} does not match the bits/group_size/shape of {tied_to!r}"
                )
            qweight = owner.qweight
        else:
            dtypes = _stored_dtypes(bits)
            if bits == 16:
                dtype_name = entry.get("dtype", "float16")
                if dtype_name not in _HALF_DTYPES:
                    raise ModelError(f"quantization spec: layer {name!r} has unknown dtype {dtype_name!r}")
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
            assert isinstance(target, nn.Embedding)  # checked above for kind "embedding"
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
        qweight_or_none = qweight if owner is None else None
        if kind == "static-int8":
            act_scale = _take(tensors, f"{name}.act_scale", (torch.float32,), (2,), used)
            act_zero_point = _take(tensors, f"{name}.act_zero_point", (torch.int64,), (2,), used)
            try:
                built[name] = StaticInt8Linear(
                    qweight_or_none,
                    bias,
                    tied_to=owner,
                    act_scale=act_scale,
                    act_zero_point=act_zero_point,
                )
            except ValueError as exc:
                raise ModelError(f"quantization spec: layer {name!r}: {exc}") from None
            continue
        cls = DynamicInt8Linear if kind == "dynamic-int8" else NbitLinear
        built[name] = cls(qweight_or_none, bias, tied_to=owner)

    for name, module in built.items():
        _set_module(model, name, module)

    plain = _plain_tensors(model)
    for key, tensor in plain.items():
        if key not in tensors:
            raise ModelError(f"tensor {key!r} is missing")
        source = tensors[key]
        if tuple(source.shape) != tuple(tensor.shape):
            raise ModelError(f"tensor {key!r} has shape {list(source.shape)}, expected {list(tensor.shape)}")
        if not source.dtype.is_floating_point and tensor.dtype.is_floating_point:
            raise ModelError(f"tensor {key!r} has dtype {source.dtype}, expected {tensor.dtype}")
        tensor.copy_(source)
        used.add(key)
    extra = sorted(set(tensors) - used)
    if extra:
        more = f" and {len(extra) - 3} more" if len(extra) > 3 else ""
        raise ModelError(
            f"unexpected tensor(s) {', '.join(repr(k) for k in extra[:3])}{more} not named by the quantization spec"
        )
    return model.eval()


# -- size -------------------------------------------------------------------------------------------


def model_nbytes(model: nn.Module) -> int:
    """Bytes of parameters and persistent buffers the model holds: quantized data at its real
    size (int4 packed), every distinct tensor once (tied data once), non-persistent buffers such
    as ``positions`` excluded. A :class:`DynamicInt8Linear` or :class:`StaticInt8Linear` adds
    its kernel's own int8 copy (``packed_nbytes``), which is held in memory besides a tied
    table; a static layer's activation parameters are buffers (24 bytes)."""
    seen: set[tuple[int, int, torch.dtype]] = set()
    total = 0
    for module in model.modules():
        items = list(module.parameters(recurse=False)) + [
            b for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set
        ]
        for tensor in items:
            if tensor is None:
                continue
            key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
            if key in seen:
                continue
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
        if isinstance(module, _KernelInt8Linear):
            total += module.packed_nbytes()
    return total
