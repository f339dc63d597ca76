"""The native "cvm" pre-norm encoder-decoder transformer, with a key/value cache for decoding."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cvmkd_core.errors import ModelError
from cvmkd_nmt.kernels import dropout_kernel, row_product
from cvmkd_nmt.model.config import ModelConfig

# A padding mask in this module is a bool tensor (B, S), True at pad positions (the
# nn.Transformer convention). Masks handed to scaled_dot_product_attention are the
# opposite: True where attention is allowed.


def sinusoidal_positions(max_len: int, d_model: int) -> Tensor:
    """The (max_len, d_model) sin/cos table of Vaswani et al. (sin on even, cos on odd dims)."""
    position = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64) * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: d_model // 2])
    return table.float()


class _Scale(torch.autograd.Function):
    """``x * scale`` computed in float32 and rounded to ``x``'s dtype, whose backward multiplies
    by the same saved ``scale`` (a dropout mask): what the C kernel computes, element for element."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(scale)
        return (x.float() * scale).to(x.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        (scale,) = ctx.saved_tensors  # type: ignore[attr-defined]
        return (grad.float() * scale).to(grad.dtype), None


def _signed(value: int) -> int:
    """A 64-bit unsigned constant as the int64 of the same bits."""
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN, _MIX1, _MIX2 = _signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)


def _shifted(z: Tensor, bits: int) -> Tensor:
    """``z >> bits`` as on unsigned 64-bit integers (torch shifts int64 arithmetically)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def random16(seed: int, n: int) -> Tensor:
    """``n`` 16-bit random numbers (0..65535, as int32): splitmix64 of a counter from ``seed``,
    each 64-bit number four of them, low bits first; the C dropout kernel's numbers exactly.
    int64 arithmetic wraps around as the C code's unsigned arithmetic does."""
    z = torch.arange((n + 3) // 4, dtype=torch.int64) + seed + _GOLDEN
    z = (z ^ _shifted(z, 30)) * _MIX1
    z = (z ^ _shifted(z, 27)) * _MIX2
    z = z ^ _shifted(z, 31)
    return z.view(torch.int16)[:n].to(torch.int32) & 0xFFFF


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout: zero each element with probability ``p``, scale the rest to keep the mean.

    On a CPU the mask comes from 16-bit random numbers: ``p`` is rounded to a multiple of
    1/65536 and the kept elements are scaled by the inverse of the exact keep probability, so the
    expectation is unchanged. The numbers are splitmix64 of a counter seeded by one draw from
    torch's generator (so ``torch.manual_seed`` and a run's saved RNG state decide the masks). For
    fp32 and bf16 activations the numbers, the mask and the output come from one C loop
    (:mod:`cvmkd_nmt.kernels`, built with the machine's C compiler); without a compiler, the same
    numbers, masks and outputs come from torch's operations (:func:`random16`): a seeded run trains
    the same weights with and without one. torch's own ``F.dropout`` draws one Bernoulli sample
    per element, which took 19% of a student's training step. Other devices use ``F.dropout``.
    """
    if not training or p <= 0:
        return x
    if x.device.type != "cpu" or p >= 1:
        return F.dropout(x, p, True)
    cut = round(p * 65536)
    scale = 65536 / (65536 - cut)
    kernel = dropout_kernel(x)
    if kernel is not None:
        return cast("Tensor", kernel(x, cut, scale))
    seed = int(torch.empty((), dtype=torch.int64).random_())  # the kernel's one draw from torch's generator
    keep = random16(seed, x.numel()).view(x.shape) >= cut
    return cast("Tensor", _Scale.apply(x, keep.float() * torch.tensor(scale, dtype=torch.float32)))


class Dropout(nn.Module):
    """``nn.Dropout`` through :func:`dropout`."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


Fn = Callable[[Tensor], Tensor]


def as_function(module: nn.Module) -> Fn:
    """``module(x)`` without the module call, for the decoder's per-token step, where calls are
    many and tensors tiny: plain ``nn.Linear``, ``nn.LayerNorm``, ``nn.Embedding``, ``nn.GELU``
    and ``nn.ReLU`` as their functional forms over the tensors they hold now, a module offering
    ``as_function()`` (cvmkd's int8 layers) as what that returns, any other module as itself.
    The tensors are taken once: valid while the weights do not change (one decoding call). A
    float32 ``nn.Linear`` on the CPU multiplies inputs of a few rows (one sentence, a beam) with
    :func:`cvmkd_nmt.kernels.row_product`, which reads the weights at 2-2.7x the speed of torch's
    product."""
    kind = type(module)
    if kind is nn.Linear:
        lin = cast("nn.Linear", module)
        w, b = lin.weight, lin.bias
        return row_product(w, b) or (lambda x: F.linear(x, w, b))
    if kind is nn.LayerNorm:
        norm = cast("nn.LayerNorm", module)
        shape, nw, nb, eps = norm.normalized_shape, norm.weight, norm.bias, norm.eps
        return lambda x: F.layer_norm(x, shape, nw, nb, eps)
    if kind is nn.Embedding:
        emb = cast("nn.Embedding", module)
        ew, pad = emb.weight, emb.padding_idx
        return lambda ids: F.embedding(ids, ew, pad)
    if kind is nn.GELU:
        approximate = cast("nn.GELU", module).approximate
        return lambda x: F.gelu(x, approximate=approximate)
    if kind is nn.ReLU:
        return F.relu
    own = getattr(module, "as_function", None)
    return cast("Fn", own()) if callable(own) else module


def stacked_function(projections: Sequence[nn.Module]) -> Fn:
    """One function giving the outputs of ``projections`` (applied to the same input)
    concatenated on the last dimension, as one matrix product where it can: plain
    ``nn.Linear`` layers through their stacked weights (copied now: valid while the weights do
    not change), layers of one class offering ``stacked_function`` (cvmkd's dynamic int8) as
    that; others one by one."""
    first = type(projections[0])
    if all(type(p) is nn.Linear for p in projections):
        linears = cast("Sequence[nn.Linear]", projections)
        if all(p.bias is not None for p in linears):
            w = torch.cat([p.weight for p in linears])
            b = torch.cat([cast("Tensor", p.bias) for p in linears])
            return row_product(w, b) or (lambda x: F.linear(x, w, b))
    stack = getattr(first, "stacked_function", None)
    if stack is not None and all(type(p) is first for p in projections):
        return cast("Fn", stack(projections))
    fns = [as_function(p) for p in projections]
    return lambda x: torch.cat([f(x) for f in fns], dim=-1)


def _key_keep_mask(pad_mask: Tensor | None) -> Tensor | None:
    """(B, 1, 1, S) 'may attend' mask from a (B, S) pad mask, or None when nothing is padded."""
    if pad_mask is None:
        return None
    keep = ~pad_mask
    # An all-pad row would make every score -inf and the softmax NaN; letting it attend
    # to its (meaningless) pads keeps NaN out of the batch, and the row is ignored anyway.
    keep = keep | ~keep.any(dim=1, keepdim=True)
    return keep[:, None, None, :]


class MultiHeadAttention(nn.Module):
    """Attention with separate nn.Linear projections, so dynamic int8 quantization covers all."""

    def __init__(self, d_model: int, n_heads: int, dropout: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _split(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def _project(self, x: Tensor, projections: tuple[nn.Linear, ...]) -> tuple[Tensor, ...]:
        """``x`` through each projection, split into heads (B, H, T, head_dim). Plain
        ``nn.Linear`` layers are applied as one product with their weights stacked for this call
        (a larger, faster matrix product, one weight cast under autocast); layers of one class
        offering ``stacked_function`` (dynamic int8, QAT's fake-quantized layers) through it;
        others one by one, as they are. The stacked copy is not kept: fused optimizers update
        weights without bumping their version counters. (Decoding steps go through
        :meth:`DecoderLayer.step`, which stacks once per decoding call.)"""
        if len(projections) == 1:
            return (self._split(projections[0](x)),)
        b, t, _ = x.shape
        out = stacked_function(projections)(x).view(b, t, len(projections), self.n_heads, self.head_dim)
        return out.permute(2, 0, 3, 1, 4).unbind(0)

    def project_kv(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H, S, head_dim) of ``x``; cached by the decoder."""
        k, v = self._project(x, (self.k_proj, self.v_proj))
        return k, v

    def project_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values (B, H, T, head_dim) of ``x`` (self-attention)."""
        q, k, v = self._project(x, (self.q_proj, self.k_proj, self.v_proj))
        return q, k, v

    def attend(
        self,
        x: Tensor,
        k: Tensor,
        v: Tensor,
        attn_mask: Tensor | None = None,
        is_causal: bool = False,
        q: Tensor | None = None,
    ) -> Tensor:
        """Attend from queries ``x`` (B, T, D) to given keys/values; returns (B, T, D). ``q``:
        the queries already projected from ``x`` (see :meth:`project_qkv`)."""
        if q is None:
            q = self._split(self.q_proj(x))
        if self.training and self.dropout > 0 and q.device.type == "cpu":
            out = self._attend_with_dropout(q, k, v, attn_mask, is_causal)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=self.dropout if self.training else 0.0,
                is_causal=is_causal,
            )
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))

    def _attend_with_dropout(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool
    ) -> Tensor:
        """Attention with dropout on its weights, written out: on a CPU, scaled_dot_product_attention
        with dropout takes the same unfused path and draws its mask with torch's slower dropout."""
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if is_causal:
            t, s = scores.shape[-2:]
            scores = scores.masked_fill(torch.ones(t, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        weights = dropout(torch.softmax(scores, dim=-1), self.dropout, True)
        return torch.matmul(weights.to(v.dtype), v)


class FeedForward(nn.Module):
    """Position-wise two-layer MLP."""

    def __init__(self, d_model: int, d_ff: int, dropout: float, activation: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.dropout = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(self.act(self.fc1(x))))


class EncoderLayer(nn.Module):
    """Pre-norm self-attention + feed-forward block."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(config.d_model)
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.dropout)
        self.ff_norm = nn.LayerNorm(config.d_model)
        self.ff = FeedForward(config.d_model, config.d_ff, config.dropout, config.activation)
        self.dropout = Dropout(config.dropout)

    def forward(self, x: Tensor, keep_mask: Tensor | None) -> Tensor:
        h = self.self_attn_norm(x)
        q, k, v = self.self_attn.project_qkv(h)
        x = x + self.dropout(self.self_attn.attend(h, k, v, attn_mask=keep_mask, q=q))
        return x + self.dropout(self.ff(self.ff_norm(x)))


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention, cross-attention and feed-forward block."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn_norm = nn.LayerNorm(config.d_model)
        self.self_attn = MultiHeadAttention(config.d_model, config.n_heads, config.dropout)
        self.cross_attn_norm = nn.LayerNorm(config.d_model)
        self.cross_attn = MultiHeadAttention(config.d_model, config.n_heads, config.dropout)
        self.ff_norm = nn.LayerNorm(config.d_model)
        self.ff = FeedForward(config.d_model, config.d_ff, config.dropout, config.activation)
        self.dropout = Dropout(config.dropout)

    def forward(
        self,
        x: Tensor,
        cross_k: Tensor,
        cross_v: Tensor,
        cross_mask: Tensor | None,
        self_mask: Tensor | None = None,
        self_causal: bool = False,
        past_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One block; returns the output and this layer's self-attention keys/values
        (``past_kv`` prepended), which incremental decoding caches."""
        h = self.self_attn_norm(x)
        q, k, v = self.self_attn.project_qkv(h)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        x = x + self.dropout(self.self_attn.attend(h, k, v, attn_mask=self_mask, is_causal=self_causal, q=q))
        h = self.cross_attn_norm(x)
        x = x + self.dropout(self.cross_attn.attend(h, cross_k, cross_v, attn_mask=cross_mask))
        return x + self.dropout(self.ff(self.ff_norm(x))), (k, v)

    def step_functions(self) -> tuple[Fn, ...]:
        """This layer's parts as functions for :meth:`step` (see :func:`as_function`): the
        query/key/value projections of self-attention stacked into one product."""
        sa, ca, ff = self.self_attn, self.cross_attn, self.ff
        return (
            as_function(self.self_attn_norm),
            stacked_function((sa.q_proj, sa.k_proj, sa.v_proj)),
            as_function(sa.out_proj),
            as_function(self.cross_attn_norm),
            as_function(ca.q_proj),
            as_function(ca.out_proj),
            as_function(self.ff_norm),
            as_function(ff.fc1),
            as_function(ff.act),
            as_function(ff.fc2),
        )

    def step(
        self,
        fns: tuple[Fn, ...],
        x: Tensor,
        past_kv: tuple[Tensor, Tensor] | None,
        cross_k: Tensor,
        cross_v: Tensor,
        cross_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """One decoding position of every row, in eval mode: ``x`` (B, D) -> (B, D) and this
        layer's self-attention keys/values (B, H, len, head_dim) with ``past_kv`` prepended.

        The same computation as :meth:`forward` for a single query, with fewer operations (the
        step's matrices are tiny, so the time goes to operations, not arithmetic): no module
        calls, no dropout, one product for the query/key/value projections, and 2-D rows where
        :meth:`forward` reshapes (B, 1, D) tensors."""
        norm1, qkv, out1, norm2, q2, out2, norm3, fc1, act, fc2 = fns
        b, d = x.shape
        heads = self.self_attn.n_heads
        hd = d // heads
        # (B, 3D) holds [q | k | v] per row, each (H, hd): with one position, (B, 3, H, 1, hd) is a view
        q, k, v = qkv(norm1(x)).view(b, 3, heads, 1, hd).unbind(1)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)
            v = torch.cat([past_kv[1], v], dim=2)
        x = x + out1(F.scaled_dot_product_attention(q, k, v).reshape(b, d))
        q = q2(norm2(x)).view(b, heads, 1, hd)
        x = x + out2(F.scaled_dot_product_attention(q, cross_k, cross_v, attn_mask=cross_mask).reshape(b, d))
        return x + fc2(act(fc1(norm3(x)))), k, v


class DecoderCache:
    """Per-layer self-attention keys/values grown one step at a time, and cross-attention
    keys/values computed once from the encoder memory. Tensors are (B, H, len, head_dim)."""

    def __init__(self) -> None:
        self.self_k: list[Tensor] = []
        self.self_v: list[Tensor] = []
        self.cross_k: list[Tensor] = []
        self.cross_v: list[Tensor] = []
        # (B, 1, 1, S) 'may attend' mask over the source, or None without source padding.
        self.cross_mask: Tensor | None = None
        # The model's parts as functions for this decoding call's eval-mode steps (set at its first
        # step): embedding, each decoder layer's DecoderLayer.step_functions(), final norm, output.
        self.functions: tuple[Fn, list[tuple[Fn, ...]], Fn, Fn] | None = None

    @property
    def length(self) -> int:
        """Number of target positions already decoded (the position of the next token)."""
        return self.self_k[0].size(2) if self.self_k else 0

    def reorder(self, index: Tensor, include_cross: bool = True) -> DecoderCache:
        """Select batch rows by ``index`` (beam search), in place; returns self.

        ``include_cross=False`` skips the cross-attention tensors, valid when ``index``
        only permutes rows that share the same source (beams of one sentence).
        """
        self.self_k = [t.index_select(0, index) for t in self.self_k]
        self.self_v = [t.index_select(0, index) for t in self.self_v]
        if include_cross:
            self.cross_k = [t.index_select(0, index) for t in self.cross_k]
            self.cross_v = [t.index_select(0, index) for t in self.cross_v]
            if self.cross_mask is not None:
                self.cross_mask = self.cross_mask.index_select(0, index)
        return self


class CvmTransformer(nn.Module):
    """Pre-norm encoder-decoder transformer with sinusoidal positions and optional tied embeddings.

    Attribute names are stable whatever the config: ``src_embed``, ``tgt_embed`` and
    ``output_proj`` always exist; when tied they are the same matrix (and ``tgt_embed is
    src_embed``), so a state dict holds three keys that alias one tensor.
    """

    # a buffer (registered in __init__), declared for type checkers: nn.Module's __getattr__
    # types every buffer as ``Tensor | Module``
    positions: Tensor

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.src_embed = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_id)
        if config.tie_embeddings:
            self.tgt_embed = self.src_embed
        else:
            self.tgt_embed = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_id)
        self.output_proj = nn.Linear(d, config.vocab_size, bias=False)
        self.embed_scale = math.sqrt(d)
        self.embed_dropout = Dropout(config.dropout)
        # A buffer, not a parameter: max_len costs no weights and is not saved in checkpoints.
        self.register_buffer("positions", sinusoidal_positions(config.max_len, d), persistent=False)
        self.encoder_layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.n_encoder_layers))
        self.encoder_norm = nn.LayerNorm(d)
        self.decoder_layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.n_decoder_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform projections, zero biases, N(0, d^-1/2) embeddings (pad row zero).

        The embedding std d^-1/2 times the sqrt(d) input scale gives unit-variance inputs,
        and keeps the initial logits of a tied output projection near unit scale.
        """
        d = self.config.d_model
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
        for embed in {id(m): m for m in (self.src_embed, self.tgt_embed)}.values():
            nn.init.normal_(embed.weight, mean=0.0, std=d**-0.5)
            with torch.no_grad():
                embed.weight[self.config.pad_id].zero_()
        if self.config.tie_embeddings:
            self.output_proj.weight = self.src_embed.weight
        else:
            nn.init.normal_(self.output_proj.weight, mean=0.0, std=d**-0.5)

    # -- input checks -------------------------------------------------------------------

    def _check_ids(self, ids: Tensor, what: str) -> None:
        if ids.dim() != 2:
            raise ModelError(f"{what} must be a (batch, length) tensor, got shape {tuple(ids.shape)}")
        if ids.dtype != torch.long:
            raise ModelError(f"{what} must hold int64 token ids, got {ids.dtype}")
        if ids.size(1) > self.config.max_len:
            raise ModelError(
                f"{what} has length {ids.size(1)}, more than the model's max_len "
                f"{self.config.max_len}; filter or truncate longer sentences"
            )
        if ids.numel() and (int(ids.max()) >= self.config.vocab_size or int(ids.min()) < 0):
            raise ModelError(
                f"{what} holds token ids outside [0, {self.config.vocab_size}) "
                f"(min {int(ids.min())}, max {int(ids.max())}): does the tokenizer match the model?"
            )

    def _embed(self, embed: nn.Embedding, ids: Tensor, start: int = 0) -> Tensor:
        x = embed(ids) * self.embed_scale + self.positions[start : start + ids.size(1)]
        return self.embed_dropout(x)

    # -- encoder --------------------------------------------------------------------------

    def encode(self, src_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Encode (B, S) source ids into memory (B, S, D) and the (B, S) pad mask (True = pad)."""
        self._check_ids(src_ids, "source")
        src_pad_mask = src_ids.eq(self.config.pad_id)
        # Without padding, SDPA can take its unmasked (faster) path.
        keep = _key_keep_mask(src_pad_mask) if bool(src_pad_mask.any()) else None
        x = self._embed(self.src_embed, src_ids)
        for layer in self.encoder_layers:
            x = layer(x, keep)
        return self.encoder_norm(x), src_pad_mask

    # -- decoder --------------------------------------------------------------------------

    def _cross_mask(self, src_pad_mask: Tensor | None) -> Tensor | None:
        if src_pad_mask is None or not bool(src_pad_mask.any()):
            return None
        return _key_keep_mask(src_pad_mask)

    def _decoders(self) -> Iterable[DecoderLayer]:
        # decoder_layers holds only DecoderLayers (built in __init__); ModuleList types them as Module
        return cast("Iterable[DecoderLayer]", self.decoder_layers)

    def decode(
        self, tgt_in_ids: Tensor, memory: Tensor, src_pad_mask: Tensor | None, rows: Tensor | None = None
    ) -> Tensor:
        """Full (teacher-forced) decoder pass: (B, T) target inputs -> (B, T, V) logits, or with
        ``rows`` (a (B, T) bool mask) the (N, V) logits of the N positions it marks only."""
        self._check_ids(tgt_in_ids, "target")
        t = tgt_in_ids.size(1)
        tgt_pad = tgt_in_ids.eq(self.config.pad_id)
        # With right padding (the usual teacher-forcing batch) the causal mask already hides
        # every pad from every real token, so the fast is_causal path is exact; only a pad
        # followed by a real token (left padding, gaps) needs an explicit mask.
        if bool((tgt_pad[:, :-1] & ~tgt_pad[:, 1:]).any()):
            causal = torch.ones(t, t, dtype=torch.bool, device=tgt_in_ids.device).tril()
            diag = torch.eye(t, dtype=torch.bool, device=tgt_in_ids.device)
            # The diagonal keeps pad query rows from attending to nothing (NaN); real
            # tokens see themselves anyway, so their outputs are unaffected.
            self_mask: Tensor | None = (causal & ~tgt_pad[:, None, None, :]) | diag
            causal_flag = False
        else:
            self_mask, causal_flag = None, True
        cross_mask = self._cross_mask(src_pad_mask)
        x = self._embed(self.tgt_embed, tgt_in_ids)
        for layer in self._decoders():
            cross_k, cross_v = layer.cross_attn.project_kv(memory)
            x, _ = layer(x, cross_k, cross_v, cross_mask, self_mask, causal_flag)
        if rows is not None:
            # the projection onto the vocabulary is the largest product: skip positions no
            # loss reads (the padding of a training batch)
            x = x[rows]
        return self.output_proj(self.decoder_norm(x))

    def decode_step(
        self,
        tgt_token_ids_last: Tensor,
        memory: Tensor,
        src_pad_mask: Tensor | None,
        cache: DecoderCache | None = None,
    ) -> tuple[Tensor, DecoderCache]:
        """Decode one position for every row: (B,) or (B, 1) ids -> (B, V) logits and the cache.

        Pass ``cache=None`` on the first step (with the bos token); the returned cache is
        updated in place and must be passed back on the next step. Decoder inputs are
        assumed pad-free (no self-attention pad mask is applied to cached positions).
        """
        ids = tgt_token_ids_last.view(-1, 1)
        if cache is None:
            cache = DecoderCache()
        pos = cache.length
        if pos >= self.config.max_len:
            raise ModelError(f"cannot decode position {pos}: the model's max_len is {self.config.max_len}")
        first = not cache.cross_k
        if first:
            cache.cross_mask = self._cross_mask(src_pad_mask)
            for layer in self._decoders():
                cross_k, cross_v = layer.cross_attn.project_kv(memory)
                cache.cross_k.append(cross_k)
                cache.cross_v.append(cross_v)
        if not self.training:
            return self._fast_step(ids.view(-1), pos, cache), cache
        cross_mask = cache.cross_mask
        x = self._embed(self.tgt_embed, ids, start=pos)
        for i, layer in enumerate(self._decoders()):
            past = None if first else (cache.self_k[i], cache.self_v[i])
            # The single new query may see every cached position: no causal mask needed.
            x, (k, v) = layer(x, cache.cross_k[i], cache.cross_v[i], cross_mask, past_kv=past)
            if first:
                cache.self_k.append(k)
                cache.self_v.append(v)
            else:
                cache.self_k[i], cache.self_v[i] = k, v
        logits = self.output_proj(self.decoder_norm(x))
        return logits[:, -1], cache

    def _fast_step(self, ids: Tensor, pos: int, cache: DecoderCache) -> Tensor:
        """:meth:`decode_step` in eval mode through :meth:`DecoderLayer.step`: (B,) ids at
        position ``pos`` -> (B, V) logits, the cache updated."""
        layers = list(self._decoders())
        if cache.functions is None:
            cache.functions = (
                as_function(self.tgt_embed),
                [layer.step_functions() for layer in layers],
                as_function(self.decoder_norm),
                as_function(self.output_proj),
            )
        embed, per_layer, norm, output = cache.functions
        x = embed(ids) * self.embed_scale + self.positions[pos]
        first = not cache.self_k
        for i, layer in enumerate(layers):
            past = None if first else (cache.self_k[i], cache.self_v[i])
            x, k, v = layer.step(per_layer[i], x, past, cache.cross_k[i], cache.cross_v[i], cache.cross_mask)
            if first:
                cache.self_k.append(k)
                cache.self_v.append(v)
            else:
                cache.self_k[i], cache.self_v[i] = k, v
        return output(norm(x))

    # -- training entry point ---------------------------------------------------------------

    def forward(self, src_ids: Tensor, tgt_in_ids: Tensor, rows: Tensor | None = None) -> Tensor:
        """Teacher-forced logits (B, T, V) for source ids (B, S) and decoder inputs (B, T); with
        ``rows``, a (B, T) bool mask, only the (N, V) logits of the positions it marks."""
        memory, src_pad_mask = self.encode(src_ids)
        return self.decode(tgt_in_ids, memory, src_pad_mask, rows)
