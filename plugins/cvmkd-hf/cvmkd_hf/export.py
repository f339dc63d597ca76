"""``cvmkd export MODEL --format huggingface --out DIR``: a cvm model package as a Hugging Face
folder (``PegasusForConditionalGeneration`` and a fast tokenizer) that ``transformers`` loads
offline, so that a cvmkd model (the shipped teacher, a student) can be served with transformers,
or be the Hugging Face teacher of another run.

Pegasus is the transformers architecture with the cvm model's shape: pre-norm layers with a final
layer norm on both stacks, embeddings scaled by sqrt(d_model) plus sinusoidal positions of the same
frequencies, no embedding layer norm, one embedding matrix shared by encoder, decoder and output.
Pegasus writes the sines in the first half of each position vector and the cosines in the second,
where cvm interleaves them, so the hidden dimensions are permuted: every weight's d_model axis
follows the same permutation, which leaves every logit unchanged (tests/test_hf_export.py checks
that the log-probabilities agree). The SentencePiece model becomes a ``tokenizer.json`` with the
same pieces and ids, adding the end-of-sentence mark as cvm models read it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from cvmkd_core.errors import ModelError

FORMAT = "huggingface"


def _permutation(d_model: int) -> torch.Tensor:
    """New dimension k holds old dimension perm[k]: the even (sine) dimensions, then the odd."""
    return torch.cat([torch.arange(0, d_model, 2), torch.arange(1, d_model, 2)])


def pegasus_state(model: Any) -> dict[str, torch.Tensor]:
    """The cvm model's weights under Pegasus's names, d_model axes permuted."""
    perm = _permutation(model.config.d_model)

    def rows(t: torch.Tensor) -> torch.Tensor:  # an output (or 1-D) axis of size d_model
        return t.detach().float()[perm].clone()

    def cols(t: torch.Tensor) -> torch.Tensor:  # an input axis of size d_model
        return t.detach().float()[:, perm].clone()

    state: dict[str, torch.Tensor] = {}

    def norm(name: str, module: torch.nn.LayerNorm) -> None:
        state[f"{name}.weight"], state[f"{name}.bias"] = rows(module.weight), rows(module.bias)

    def attention(name: str, module: Any) -> None:
        for proj in ("q_proj", "k_proj", "v_proj"):
            linear = getattr(module, proj)
            state[f"{name}.{proj}.weight"] = cols(linear.weight)
            state[f"{name}.{proj}.bias"] = linear.bias.detach().float().clone()
        state[f"{name}.out_proj.weight"] = rows(module.out_proj.weight)
        state[f"{name}.out_proj.bias"] = rows(module.out_proj.bias)

    def feed_forward(prefix: str, module: Any) -> None:
        state[f"{prefix}.fc1.weight"] = cols(module.fc1.weight)
        state[f"{prefix}.fc1.bias"] = module.fc1.bias.detach().float().clone()
        state[f"{prefix}.fc2.weight"] = rows(module.fc2.weight)
        state[f"{prefix}.fc2.bias"] = rows(module.fc2.bias)

    embeddings = cols(model.src_embed.weight)
    for name in ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
        state[name] = embeddings
    state["lm_head.weight"] = embeddings
    state["final_logits_bias"] = torch.zeros(1, model.config.vocab_size)
    for i, layer in enumerate(model.encoder_layers):
        p = f"model.encoder.layers.{i}"
        norm(f"{p}.self_attn_layer_norm", layer.self_attn_norm)
        attention(f"{p}.self_attn", layer.self_attn)
        norm(f"{p}.final_layer_norm", layer.ff_norm)
        feed_forward(p, layer.ff)
    norm("model.encoder.layer_norm", model.encoder_norm)
    for i, layer in enumerate(model.decoder_layers):
        p = f"model.decoder.layers.{i}"
        norm(f"{p}.self_attn_layer_norm", layer.self_attn_norm)
        attention(f"{p}.self_attn", layer.self_attn)
        norm(f"{p}.encoder_attn_layer_norm", layer.cross_attn_norm)
        attention(f"{p}.encoder_attn", layer.cross_attn)
        norm(f"{p}.final_layer_norm", layer.ff_norm)
        feed_forward(p, layer.ff)
    norm("model.decoder.layer_norm", model.decoder_norm)
    return state


def pegasus_config(config: Any) -> Any:
    from transformers import PegasusConfig

    return PegasusConfig(  # type: ignore[call-arg]  # bos_token_id: kept as an extra attribute
        vocab_size=config.vocab_size,
        d_model=config.d_model,
        encoder_layers=config.n_encoder_layers,
        decoder_layers=config.n_decoder_layers,
        encoder_attention_heads=config.n_heads,
        decoder_attention_heads=config.n_heads,
        encoder_ffn_dim=config.d_ff,
        decoder_ffn_dim=config.d_ff,
        activation_function="gelu" if config.activation == "gelu" else "relu",
        dropout=config.dropout,
        attention_dropout=0.0,
        activation_dropout=0.0,
        max_position_embeddings=config.max_len,
        scale_embedding=True,
        pad_token_id=config.pad_id,
        bos_token_id=config.bos_id,
        eos_token_id=config.eos_id,
        decoder_start_token_id=config.bos_id,
        forced_eos_token_id=None,
        tie_word_embeddings=True,
    )


def fast_tokenizer(spm_path: Path, pad: int, bos: int, eos: int) -> Any:
    """The SentencePiece model as a transformers fast tokenizer: the same pieces and ids, and
    the end-of-sentence mark after each text."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import SpmConverter

    class _Source:  # what SpmConverter reads of a slow tokenizer
        vocab_file = str(spm_path)

    try:
        backend = SpmConverter(_Source()).converted()
    except Exception as exc:  # protobuf missing, a damaged model...
        raise ModelError(f"{spm_path}: cannot convert the SentencePiece model ({exc})") from None
    piece = backend.id_to_token
    backend.post_processor = TemplateProcessing(
        single=f"$A {piece(eos)}", pair=f"$A {piece(eos)} $B {piece(eos)}", special_tokens=[(piece(eos), eos)]
    )
    unk = next((backend.id_to_token(i) for i in range(backend.get_vocab_size()) if piece(i) == "<unk>"), None)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=piece(pad), bos_token=piece(bos), eos_token=piece(eos), unk_token=unk
    )


class HuggingFaceExporter:
    """``cvmkd export MODEL --format huggingface``: a cvm package as a transformers folder."""

    format = FORMAT

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def export(self, package: Path, out: Path, quantization: str | None = None) -> dict[str, Any]:
        from cvmkd_hf.model import HfSeq2Seq, quiet_transformers
        from cvmkd_hf.tokenizer import HfTokenizer
        from cvmkd_nmt.model.package import HF_TOKENIZER, TOKENIZER, load_package, read_metadata, save_package
        from cvmkd_nmt.quantized import is_quantized

        if quantization:
            raise ModelError(
                "--quantization: a Hugging Face export keeps the float weights (quantize its CTranslate2 export)"
            )
        if (package / "metadata.json").is_file() and read_metadata(package).get("format") == FORMAT:
            raise ModelError(f"{package} is a Hugging Face folder already")
        model, tokenizer, metadata = load_package(package)
        if is_quantized(model):
            raise ModelError(f"{package} holds a quantized model: export the float package it was made from")
        if not model.config.tie_embeddings:
            raise ModelError(
                f"{package}: its embeddings are not tied, and Pegasus shares one matrix between encoder, "
                "decoder and output; only tied cvm models export to Hugging Face"
            )
        quiet_transformers()
        from transformers import PegasusForConditionalGeneration

        started = time.perf_counter()
        hf = PegasusForConditionalGeneration(pegasus_config(model.config))
        missing, unexpected = hf.load_state_dict(pegasus_state(model), strict=False)
        missing = [k for k in missing if "embed_positions" not in k]
        if missing or unexpected:
            raise ModelError(f"{package}: the Pegasus layout does not fit ({missing[:3]} {unexpected[:3]})")
        hf.eval()
        work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if out.parent.exists() else None))
        try:
            files = work / "tokenizer"
            files.mkdir()
            if (package / HF_TOKENIZER).is_dir():  # a student of a Hugging Face teacher: its tokenizer
                for file in (package / HF_TOKENIZER).iterdir():
                    shutil.copyfile(file, files / file.name)
            else:
                c = model.config
                fast_tokenizer(package / TOKENIZER, c.pad_id, c.bos_id, c.eos_id).save_pretrained(str(files))
            wrapped = HfSeq2Seq(hf, HfTokenizer(files, vocab_size=model.config.vocab_size))
            info = {
                "format": FORMAT,
                "architecture": "pegasus",
                "quantization": "float32",
                "source_package": str(package),
                "source_weights_sha256": metadata.get("weights_sha256"),
                "seconds": round(time.perf_counter() - started, 2),
            }
            meta = {k: v for k, v in metadata.items() if k not in ("format", "files_sha256", "weights_sha256")}
            save_package(out, wrapped, wrapped.tokenizer, {**meta, "export": info})  # type: ignore[arg-type]
        finally:
            shutil.rmtree(work, ignore_errors=True)
        info["size_bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
        return info

    @staticmethod
    def recognizes(folder: Path) -> bool:
        return False  # a Hugging Face folder is read by the loader "hf", not translated by an exporter
