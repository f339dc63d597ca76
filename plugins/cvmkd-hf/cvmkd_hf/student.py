"""Students of a Hugging Face teacher's own family: ``[student.model] name = "hf"`` builds a
smaller model from the teacher's configuration (or another folder's) with the sizes the recipe
overrides, randomly initialised or started from the teacher's weights (embeddings and evenly
spaced layers, "shrink and fine-tune"). The run saves it as a normal Hugging Face folder that
``transformers`` loads, plus cvmkd's ``metadata.json``."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import attrs
import torch

from cvmkd_core.config import ConfigValueError, ge, gt, one_of
from cvmkd_core.errors import ModelError

log = logging.getLogger("cvmkd")

#: the names of the sizes in the configurations of the two families cvmkd knows by name; any
#: other configuration key can be set through ``config = {key = value}``
_BART_STYLE: dict[str, tuple[str, ...]] = {  # Marian, BART, mBART, M2M100/NLLB, Pegasus
    "d_model": ("d_model",),
    "n_heads": ("encoder_attention_heads", "decoder_attention_heads"),
    "n_encoder_layers": ("encoder_layers",),
    "n_decoder_layers": ("decoder_layers",),
    "d_ff": ("encoder_ffn_dim", "decoder_ffn_dim"),
    "dropout": ("dropout",),
}
_T5_STYLE: dict[str, tuple[str, ...]] = {  # T5, mT5, UMT5
    "d_model": ("d_model",),
    "n_heads": ("num_heads",),
    "n_encoder_layers": ("num_layers",),
    "n_decoder_layers": ("num_decoder_layers",),
    "d_ff": ("d_ff",),
    "dropout": ("dropout_rate",),
}
SIZES = tuple(_BART_STYLE)


@attrs.frozen
class HfStudentSpec:
    """``[student.model] name = "hf"``: the teacher's architecture at the sizes given here.

    ``base``: a Hugging Face folder whose ``config.json`` the student starts from; empty: the
    teacher's (the teacher must then be a Hugging Face folder). ``config``: any other key of that
    configuration. ``init``: ``random``, or ``teacher`` to copy the teacher's embeddings and
    evenly spaced layers wherever the shapes match."""

    base: str = ""
    d_model: int | None = attrs.field(default=None, validator=gt(0))
    n_heads: int | None = attrs.field(default=None, validator=gt(0))
    n_encoder_layers: int | None = attrs.field(default=None, validator=gt(0))
    n_decoder_layers: int | None = attrs.field(default=None, validator=gt(0))
    d_ff: int | None = attrs.field(default=None, validator=gt(0))
    dropout: float | None = attrs.field(default=None, validator=ge(0))
    config: dict[str, Any] = attrs.field(factory=dict)
    init: str = attrs.field(default="random", validator=one_of("random", "teacher"))

    def __attrs_post_init__(self) -> None:
        if self.d_model is not None and self.n_heads is not None and self.d_model % self.n_heads:
            raise ConfigValueError(f"d_model ({self.d_model}) must be a multiple of n_heads ({self.n_heads})")


def family_keys(config: dict[str, Any]) -> dict[str, tuple[str, ...]] | None:
    """How the sizes are named in ``config``'s family, or None for a family cvmkd does not know."""
    if "encoder_layers" in config and "encoder_ffn_dim" in config:
        return _BART_STYLE
    if "num_layers" in config and "d_kv" in config:
        return _T5_STYLE
    return None


def student_config(base: dict[str, Any], spec: HfStudentSpec, vocab_size: int) -> dict[str, Any]:
    """The student's configuration: ``base`` with the spec's sizes and raw overrides."""
    config = dict(base)
    names = family_keys(config)
    given = {name: getattr(spec, name) for name in SIZES if getattr(spec, name) is not None}
    if given and names is None:
        raise ModelError(
            f"[student.model] {', '.join(given)}: cvmkd does not know how a {config.get('model_type')!r} "
            "configuration names its sizes; set them by their own names in config = {...}"
        )
    for name, value in given.items():
        for key in names[name]:  # type: ignore[index]
            config[key] = value
    if names is _T5_STYLE and ("d_model" in given or "n_heads" in given):
        config["d_kv"] = config["d_model"] // config["num_heads"]
    if names is _T5_STYLE and "n_encoder_layers" in given and "n_decoder_layers" not in given:
        config["num_decoder_layers"] = config["num_layers"]
    for key, value in spec.config.items():
        if key not in base:
            raise ModelError(f"[student.model] config: the {base.get('model_type')!r} configuration has no key {key!r}")
        config[key] = value
    config["vocab_size"] = vocab_size
    return config


def spread(teacher_layers: int, student_layers: int) -> list[int]:
    """Which teacher layer each student layer starts from: evenly spaced, first and last kept."""
    if student_layers == 1 or teacher_layers == 1:
        return [0] * student_layers
    return [round(i * (teacher_layers - 1) / (student_layers - 1)) for i in range(student_layers)]


_LAYER = re.compile(r"^(.*?(encoder|decoder)\.(?:layers|block)\.)(\d+)(\..*)$")


def copy_from_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> dict[str, Any]:
    """Copy the teacher's tensors into the student where names (after mapping each student layer
    to its teacher layer) and shapes match; returns what was copied."""
    theirs = teacher.state_dict()
    counts: dict[str, int] = {}
    for name in theirs:
        found = _LAYER.match(name)
        if found:
            counts[found.group(2)] = max(counts.get(found.group(2), 0), int(found.group(3)) + 1)
    mine = student.state_dict()
    ours: dict[str, int] = {}
    for name in mine:
        found = _LAYER.match(name)
        if found:
            ours[found.group(2)] = max(ours.get(found.group(2), 0), int(found.group(3)) + 1)
    layers = {side: spread(counts.get(side, 1), n) for side, n in ours.items()}
    copied, skipped = 0, 0
    with torch.no_grad():
        for name, tensor in mine.items():
            found = _LAYER.match(name)
            source = name
            if found:
                source = f"{found.group(1)}{layers[found.group(2)][int(found.group(3))]}{found.group(4)}"
            value = theirs.get(source)
            if value is not None and value.shape == tensor.shape:
                tensor.copy_(value.to(tensor.dtype))
                copied += 1
            else:
                skipped += 1
    return {"tensors_copied": copied, "tensors_initialised": skipped, "layers": layers}


class HfStudent:
    """The ``hf`` model component: builds the student from a configuration and the teacher."""

    #: [[quantize]] works on cvm models; this student is quantized by its CTranslate2 export
    quantizable = False
    family = "Hugging Face"

    def __init__(self, spec: HfStudentSpec) -> None:
        self.spec = spec

    def build(self, vocab_size: int, special_ids: dict[str, int] | None = None, teacher: Any = None) -> torch.nn.Module:
        from transformers import AutoConfig, AutoModelForSeq2SeqLM

        from cvmkd_hf.model import HfSeq2Seq, quiet_transformers

        quiet_transformers()
        tokenizer = getattr(teacher, "tokenizer", None)
        if not isinstance(teacher, HfSeq2Seq) or tokenizer is None:
            raise ModelError(
                '[student.model] name = "hf" builds a student of the teacher\'s own family: the teacher '
                'must be a Hugging Face folder ([teacher] checkpoint = <folder>); use name = "cvm" otherwise'
            )
        if vocab_size != tokenizer.vocab_size:
            raise ModelError(
                '[student.model] name = "hf" speaks its teacher\'s tokenizer; a student with a tokenizer '
                'of its own ([student] tokenizer = "own") is name = "cvm"'
            )
        if self.spec.base:
            path = Path(self.spec.base) / "config.json"
            try:
                base = json.loads(path.read_text("utf-8"))
            except (OSError, ValueError) as exc:
                raise ModelError(f"[student.model] base: cannot read {path} ({exc})") from None
        else:
            base = teacher.model.config.to_dict()
        for key in ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype"):
            base.pop(key, None)
        wanted = student_config(base, self.spec, vocab_size)
        try:
            config = AutoConfig.for_model(**wanted)
            model = AutoModelForSeq2SeqLM.from_config(config)
        except (ValueError, TypeError, KeyError) as exc:
            raise ModelError(f"[student.model]: cannot build the student ({exc})") from None
        model = model.float()
        student = HfSeq2Seq(model, tokenizer)
        if self.spec.init == "teacher":
            copied = copy_from_teacher(model, teacher.model)
            log.info(
                "student: %d tensors copied from the teacher (layers %s), %d initialised",
                copied["tensors_copied"],
                copied["layers"],
                copied["tensors_initialised"],
            )
            student.initialised = copied
        return student
