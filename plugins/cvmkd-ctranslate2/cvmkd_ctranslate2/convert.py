"""A cvm model package as a CTranslate2 model: the model specification built from the weights.

The cvm transformer is a pre-norm encoder-decoder with sinusoidal positions (sin on even, cos on
odd dimensions, as OpenNMT-py), embeddings scaled by sqrt(d_model), separate query/key/value
projections (fused here as CTranslate2 expects), final layer norms on both stacks and, usually,
one embedding matrix shared by encoder, decoder and output projection. Every one of those maps onto
CTranslate2's ``TransformerSpec``; ``tests/test_ctranslate2.py`` checks that the converted model
gives the same log-probabilities and the same greedy translations as the package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from ctranslate2.converters.converter import Converter
from ctranslate2.specs import common_spec, transformer_spec

#: what ``--quantization`` accepts (CTranslate2's weight types for a CPU or a GPU)
QUANTIZATIONS = ("float32", "int8", "int8_float32", "int8_float16", "int8_bfloat16", "int16", "float16", "bfloat16")

#: the layer-norm epsilon of torch.nn.LayerNorm, which the cvm model uses
TORCH_LAYER_NORM_EPS = 1e-5


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().to(torch.float32).cpu().numpy()


def _linear(spec: Any, module: torch.nn.Linear) -> None:
    spec.weight = _array(module.weight)
    if module.bias is not None:
        spec.bias = _array(module.bias)


def _fused(spec: Any, modules: list[torch.nn.Linear]) -> None:
    """Several projections of the same input as one (CTranslate2 computes q, k, v at once)."""
    spec.weight = np.concatenate([_array(m.weight) for m in modules])
    spec.bias = np.concatenate([_array(m.bias) for m in modules])


def _norm(spec: Any, module: torch.nn.LayerNorm) -> None:
    spec.gamma = _array(module.weight)
    spec.beta = _array(module.bias)


def _ffn(spec: Any, norm: torch.nn.LayerNorm, ff: Any) -> None:
    _norm(spec.layer_norm, norm)
    _linear(spec.linear_0, ff.fc1)
    _linear(spec.linear_1, ff.fc2)


def cvm_spec(model: Any, pieces: list[str]) -> transformer_spec.TransformerSpec:
    """The CTranslate2 specification of a :class:`~cvmkd_nmt.model.transformer.CvmTransformer`
    with float weights; ``pieces`` is the tokenizer's vocabulary in id order."""
    config = model.config
    activation = common_spec.Activation.GELU if config.activation == "gelu" else common_spec.Activation.RELU
    spec = transformer_spec.TransformerSpec.from_config(
        (config.n_encoder_layers, config.n_decoder_layers),
        config.n_heads,
        pre_norm=True,
        activation=activation,
    )
    spec.config.layer_norm_epsilon = TORCH_LAYER_NORM_EPS
    # the cvm encoder reads every source with its end-of-sentence mark; users of the export
    # then pass plain SentencePiece pieces, as with any CTranslate2 model
    spec.config.add_source_eos = True
    # the model's own special pieces (a student of a Hugging Face teacher may start from eos)
    spec.config.bos_token = pieces[config.bos_id]
    spec.config.decoder_start_token = pieces[config.bos_id]
    spec.config.eos_token = pieces[config.eos_id]
    positions = _array(model.positions)

    encoder = spec.encoder
    encoder.embeddings[0].weight = _array(model.src_embed.weight)
    encoder.scale_embeddings = True
    encoder.position_encodings.encodings = positions
    _norm(encoder.layer_norm, model.encoder_norm)
    for layer_spec, layer in zip(encoder.layer, model.encoder_layers):
        attention = layer_spec.self_attention
        _norm(attention.layer_norm, layer.self_attn_norm)
        _fused(attention.linear[0], [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
        _linear(attention.linear[1], layer.self_attn.out_proj)
        _ffn(layer_spec.ffn, layer.ff_norm, layer.ff)

    decoder = spec.decoder
    decoder.embeddings.weight = _array(model.tgt_embed.weight)
    decoder.scale_embeddings = True
    decoder.position_encodings.encodings = positions
    _norm(decoder.layer_norm, model.decoder_norm)
    decoder.projection.weight = _array(model.output_proj.weight)
    for layer_spec, layer in zip(decoder.layer, model.decoder_layers):
        attention = layer_spec.self_attention
        _norm(attention.layer_norm, layer.self_attn_norm)
        _fused(attention.linear[0], [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
        _linear(attention.linear[1], layer.self_attn.out_proj)
        cross = layer_spec.attention
        _norm(cross.layer_norm, layer.cross_attn_norm)
        _linear(cross.linear[0], layer.cross_attn.q_proj)
        _fused(cross.linear[1], [layer.cross_attn.k_proj, layer.cross_attn.v_proj])
        _linear(cross.linear[2], layer.cross_attn.out_proj)
        _ffn(layer_spec.ffn, layer.ff_norm, layer.ff)

    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    return spec


class CvmConverter(Converter):  # type: ignore[misc]
    """CTranslate2's converter interface over a loaded cvm model and its vocabulary."""

    def __init__(self, model: Any, pieces: list[str]) -> None:
        self.model = model
        self.pieces = pieces

    def _load(self) -> transformer_spec.TransformerSpec:
        return cvm_spec(self.model, self.pieces)


def convert(model: Any, pieces: list[str], out: Path, quantization: str = "float32") -> Path:
    """Write the CTranslate2 model of ``model`` to ``out`` (which must not exist)."""
    CvmConverter(model, pieces).convert(str(out), quantization=quantization)
    return out
