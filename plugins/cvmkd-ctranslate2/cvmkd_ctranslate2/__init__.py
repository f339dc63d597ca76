"""cvmkd plugin: students exported to CTranslate2, the inference engine translation teams run on
CPUs and GPUs, and translation with such exports.

- the exporter ``ctranslate2``: ``cvmkd export MODEL --format ctranslate2 --out DIR
  [--quantization int8]``, or ``[[exports]] name = "ctranslate2"`` in a recipe, so that a run
  ends with its student in CTranslate2's format (``RUN_DIR/model-ctranslate2``);
- ``cvmkd translate --model DIR`` recognises such a folder and translates with CTranslate2.

An export folder holds CTranslate2's files (``model.bin``, ``config.json``, the vocabulary), the
package's ``tokenizer.model`` and ``cvmkd.json``: the source package's metadata and the export's
own (format, quantization, CTranslate2 version, the sha256 of the weights it was made from).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

from cvmkd_core.config import ConfigValueError, inside_run_dir, one_of
from cvmkd_core.errors import ModelError
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.stash import StashKey
from cvmkd_ctranslate2.convert import QUANTIZATIONS

log = logging.getLogger("cvmkd")

#: ``summary.json`` ``extra.exports``: each export's folder, format and size, by its label
EXPORTS: StashKey[dict[str, Any]] = StashKey("exports", dict)

FORMAT = "ctranslate2"
METADATA = "cvmkd.json"


#: what a run directory holds of its own: an export never goes there
RUN_FOLDERS = ("checkpoints", "validation", "model", "reports", "teacher", "logs")


def _export_folder(instance: Any, attribute: Any, value: str) -> None:
    if not value:
        return
    inside_run_dir(instance, attribute, value)
    first = Path(value).parts[0] if Path(value).parts else ""
    if value in (".", "./") or not Path(value).name or first in RUN_FOLDERS:
        raise ConfigValueError(
            f"must name a new folder inside the run directory, not one of the run's own, got {value!r}"
        )


@attrs.frozen
class CTranslate2Config:
    """``[[exports]] name = "ctranslate2"``."""

    quantization: str = attrs.field(default="int8", validator=one_of(*QUANTIZATIONS))
    """CTranslate2's weight type: int8 (the CPU default), int8_float32, int16, float16, float32..."""
    folder: str = attrs.field(default="", validator=_export_folder)
    """where in the run directory (a new folder of its own); empty: ``model-<label>``, the label
    being ``ctranslate2``, or ``ctranslate2-<index>`` when several entries export"""


def is_export(folder: Path) -> bool:
    """Whether ``folder`` is a CTranslate2 export written by cvmkd."""
    meta = folder / METADATA
    if not (folder / "model.bin").is_file() or not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text("utf-8")).get("export", {}).get("format") == FORMAT
    except (OSError, ValueError):
        return False


class CTranslate2Exporter:
    """Export a cvm model package to CTranslate2 (fp32, int8, int16, float16...)."""

    format = FORMAT

    def __init__(self, config: CTranslate2Config) -> None:
        self.config = config

    def export(self, package: Path, out: Path, quantization: str | None = None) -> dict[str, Any]:
        """Write the export of the model package ``package`` to ``out`` (replaced if it exists,
        only once the new export is complete); returns what ``cvmkd.json`` records of it."""
        from cvmkd_ctranslate2.convert import convert
        from cvmkd_nmt.model.package import HF_TOKENIZER, TOKENIZER, load_package, read_metadata
        from cvmkd_nmt.quantized import is_quantized

        quantization = quantization or self.config.quantization
        if quantization not in QUANTIZATIONS:
            raise ModelError(
                f"unknown CTranslate2 quantization {quantization!r}; use one of {', '.join(QUANTIZATIONS)}"
            )
        if (package / "metadata.json").is_file() and read_metadata(package).get("format") == "huggingface":
            return self._export_hf(package, out, quantization)
        model, tokenizer, metadata = load_package(package)
        if is_quantized(model):
            raise ModelError(
                f"{package} holds a quantized model: export the float package it was made from "
                f"(CTranslate2 quantizes by itself: --quantization {quantization})"
            )

        def make(target: Path) -> dict[str, Any]:
            pieces = [tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)]
            convert(model, pieces, target, quantization=quantization)
            if (package / HF_TOKENIZER).is_dir():  # a student of a Hugging Face teacher
                shutil.copytree(package / HF_TOKENIZER, target / HF_TOKENIZER)
            else:
                shutil.copyfile(package / TOKENIZER, target / TOKENIZER)
            return {}

        return _install(package, out, quantization, metadata, model.config.max_len, make)

    def _export_hf(self, package: Path, out: Path, quantization: str) -> dict[str, Any]:
        """A student saved as a Hugging Face folder, through CTranslate2's own converter, with
        the tokenizer's files in ``tokenizer-hf/``."""
        from cvmkd_hf.model import HfLoader, quiet_transformers

        quiet_transformers()
        model, tokenizer, metadata = HfLoader.load(package)  # checks every file's sha256

        def make(target: Path) -> dict[str, Any]:
            try:
                _Converter(str(package)).convert(str(target), quantization=quantization)
            except Exception as exc:  # an architecture or a version the converter does not know
                reason = (str(exc).splitlines() or [type(exc).__name__])[0]
                raise ModelError(f"{package}: CTranslate2 cannot convert this model ({reason})") from None
            if model.config.architecture == "pegasus":
                # CTranslate2 assumes Pegasus starts decoding from pad; a model that says otherwise
                # (a cvmkd export, or a student built from one) starts where it says
                config_path = target / "config.json"
                converted = json.loads(config_path.read_text("utf-8"))
                converted["decoder_start_token"] = tokenizer.id_to_piece(model.decoder_start)
                converted["bos_token"] = tokenizer.id_to_piece(model.decoder_start)
                config_path.write_text(json.dumps(converted, indent=2) + "\n", encoding="utf-8")
            tokenizer.save(target)
            return {"converter": "ctranslate2.converters.TransformersConverter"}

        return _install(package, out, quantization, metadata, model.config.max_len, make)

    @staticmethod
    def recognizes(folder: Path) -> bool:
        return is_export(folder)

    @staticmethod
    def translator(folder: Path, device: str = "cpu") -> Any:
        from cvmkd_ctranslate2.translate import CTranslate2Translator

        return CTranslate2Translator(folder, device)

    # --- as a recipe's [[exports]] entry: at the end of the run -------------------------------

    def _label(self, state: Any) -> str:
        return next((s.label for s in state.selected("exporter") if s.component is self), FORMAT)

    def _folder(self, state: Any) -> str:
        return self.config.folder or f"model-{self._label(state)}"

    @hookimpl
    def cvmkd_check(self, state: Any) -> None:
        from cvmkd_core.errors import CheckError

        folders = [
            s.component._folder(state) for s in state.selected("exporter") if isinstance(s.component, type(self))
        ]
        twice = sorted({f for f in folders if folders.count(f) > 1})
        if twice:
            raise CheckError(f"exports: two entries write the folder {twice[0]!r}; give each its own folder")

    @hookimpl(trylast=True)
    def cvmkd_finalize(self, state: Any, summary: Any) -> None:
        package = summary.outputs.get("model")
        if not package or summary.status not in ("completed", "stopped"):
            return
        label = self._label(state)
        out = state.run_dir / self._folder(state)
        info = self.export(Path(package), out)
        summary.outputs[f"model-{label}"] = str(out)
        summary.extra[EXPORTS][label] = info
        log.info(
            "exported the student to CTranslate2 (%s): %s, %.1f MB",
            info["quantization"],
            out,
            info["size_bytes"] / 1e6,
        )


def _install(
    package: Path, out: Path, quantization: str, metadata: dict[str, Any], max_len: int, make: Any
) -> dict[str, Any]:
    """Build an export in a temporary sibling of ``out`` (``make(folder)`` writes the model and
    returns what ``cvmkd.json`` adds about it), record it, and move it into place only once
    complete; returns the export's record."""
    import ctranslate2

    started = time.perf_counter()
    if out.exists() and not is_export(out) and (not out.is_dir() or any(out.iterdir())):
        # an earlier export is replaced; anything else is somebody's data
        raise ModelError(f"{out} exists and is not a CTranslate2 export: choose another folder (it is left as it is)")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        target = work / "model"
        extra = make(target)
        info = {
            "format": FORMAT,
            "quantization": quantization,
            "ctranslate2_version": ctranslate2.__version__,
            **extra,
            "source_package": str(package),
            "source_weights_sha256": metadata.get("weights_sha256"),
            "max_len": max_len,
            "seconds": round(time.perf_counter() - started, 2),
        }
        (target / METADATA).write_text(
            json.dumps({**metadata, "export": info}, indent=2, default=str) + "\n", encoding="utf-8"
        )
        if out.exists():
            out.rename(work / "old")
        target.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info["size_bytes"] = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    return info


def _converter_class() -> Any:
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):  # type: ignore[misc]
        """CTranslate2's converter, told what newer transformers configurations leave unsaid."""

        def load_model(self, model_class: Any, model_name_or_path: str, **kwargs: Any) -> Any:
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            if model.config.model_type == "pegasus":  # pre-norm, no embedding layer norm
                for key, value in (("normalize_before", True), ("normalize_embedding", False)):
                    if not hasattr(model.config, key):
                        setattr(model.config, key, value)
            return model

    return Converter


def _Converter(path: str) -> Any:  # noqa: N802 - reads as the class it makes
    return _converter_class()(path)


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.exporter(FORMAT, CTranslate2Exporter, config=CTranslate2Config)


__all__ = ["CTranslate2Config", "CTranslate2Exporter", "is_export"]
