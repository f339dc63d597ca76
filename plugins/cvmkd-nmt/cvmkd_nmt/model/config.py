"""Architecture hyper-parameters of the native "cvm" transformer: validated, saved as JSON."""

from __future__ import annotations

from typing import Any

import attrs

from cvmkd_core.errors import ModelError

_ACTIVATIONS = ("gelu", "relu")


def _int_at_least(minimum: int):  # noqa: ANN202 - attrs validator factory
    def check(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        # bool is an int subclass; True as a layer count is always a mistake in a config file.
        if isinstance(value, bool) or not isinstance(value, int):
            raise ModelError(f"ModelConfig.{attribute.name} must be an integer, got {value!r}")
        if value < minimum:
            op = "> 0" if minimum == 1 else f">= {minimum}"
            raise ModelError(f"ModelConfig.{attribute.name} must be {op}, got {value}")

    return check


def _dropout(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelError(f"ModelConfig.{attribute.name} must be a number, got {value!r}")
    if not 0.0 <= value < 1.0:
        raise ModelError(f"ModelConfig.{attribute.name} must be in [0, 1), got {value}")


def _bool(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        raise ModelError(f"ModelConfig.{attribute.name} must be true or false, got {value!r}")


def _activation(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value not in _ACTIVATIONS:
        raise ModelError(f"ModelConfig.{attribute.name} must be one of {', '.join(_ACTIVATIONS)}, got {value!r}")


def _to_float(value: Any) -> Any:
    # JSON tools may write 0.0 as 0: accept ints for the float field; the validator does the rest.
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


@attrs.frozen
class ModelConfig:
    """Shape of a :class:`~cvmkd_nmt.model.transformer.CvmTransformer`.

    ``tie_embeddings`` shares one matrix between the encoder embedding, the decoder embedding
    and the output projection, which requires one joint source/target vocabulary.
    Special ids follow the SentencePiece convention of the project: pad=0, bos=1, eos=2 (unk=3).
    """

    vocab_size: int = attrs.field(validator=_int_at_least(1))
    d_model: int = attrs.field(validator=_int_at_least(1))
    n_heads: int = attrs.field(validator=_int_at_least(1))
    n_encoder_layers: int = attrs.field(validator=_int_at_least(1))
    n_decoder_layers: int = attrs.field(validator=_int_at_least(1))
    d_ff: int = attrs.field(validator=_int_at_least(1))
    dropout: float = attrs.field(default=0.1, converter=_to_float, validator=_dropout)
    max_len: int = attrs.field(default=512, validator=_int_at_least(1))
    tie_embeddings: bool = attrs.field(default=True, validator=_bool)
    activation: str = attrs.field(default="gelu", validator=_activation)
    pad_id: int = attrs.field(default=0, validator=_int_at_least(0))
    bos_id: int = attrs.field(default=1, validator=_int_at_least(0))
    eos_id: int = attrs.field(default=2, validator=_int_at_least(0))

    def __attrs_post_init__(self) -> None:
        if self.d_model % self.n_heads != 0:
            raise ModelError(
                f"ModelConfig.d_model must be divisible by n_heads, got d_model={self.d_model}, n_heads={self.n_heads}"
            )
        specials = {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        for name, value in specials.items():
            if value >= self.vocab_size:
                raise ModelError(f"ModelConfig.{name} must be < vocab_size ({self.vocab_size}), got {value}")
        # bos may be eos (fairseq's convention, for vocabularies without a start token: Marian,
        # T5); padding must be neither, or the decoder's first position would be masked
        if self.pad_id in (self.bos_id, self.eos_id):
            raise ModelError(
                "ModelConfig.pad_id must differ from bos_id and eos_id, got "
                + ", ".join(f"{k}={v}" for k, v in specials.items())
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of JSON types, the inverse of :meth:`from_dict`."""
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build a config from :meth:`to_dict` output; unknown or missing keys raise ModelError."""
        if not isinstance(data, dict):
            raise ModelError(f"model config must be a mapping, got {type(data).__name__}")
        fields = attrs.fields_dict(cls)
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ModelError(f"unknown model config key(s): {', '.join(unknown)}; known keys: {', '.join(fields)}")
        missing = [name for name, field in fields.items() if field.default is attrs.NOTHING and name not in data]
        if missing:
            raise ModelError(f"model config is missing key(s): {', '.join(missing)}")
        return cls(**data)
