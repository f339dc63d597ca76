"""Model packages: a folder holding weights (safetensors), config, tokenizer and metadata.

A quantized model (any module from :mod:`cvmkd_nmt.quantized`) is stored as the tensors of
:func:`~cvmkd_nmt.quantized.quantized_state` in the same model.safetensors, plus
``quantization.json`` (the spec); see docs/quantization.md.

A package is written into a temporary sibling folder and renamed into place, so a reader never
sees half a package. Loading checks every piece and says which one is missing or damaged.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model, save_file, save_model

from cvmkd_core.errors import ModelError
from cvmkd_core.files import sha256_file
from cvmkd_nmt.model.config import ModelConfig
from cvmkd_nmt.model.transformer import CvmTransformer
from cvmkd_nmt.quantized import DynamicInt8Linear, StaticInt8Linear, is_quantized, load_quantized, quantized_state

log = logging.getLogger("cvmkd")

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
METADATA = "metadata.json"
QUANTIZATION = "quantization.json"
#: a Hugging Face tokenizer's own files, in place of tokenizer.model (students of such teachers)
HF_TOKENIZER = "tokenizer-hf"


def save_package(
    directory: str | Path,
    model: CvmTransformer,
    tokenizer: Any,
    metadata: dict[str, Any] | None = None,
    *,
    half: bool = False,
) -> Path:
    """Write ``model``, its config, ``tokenizer`` and ``metadata`` to ``directory``, replacing it.

    ``half``: store a float model's weights in float16 (half the file; how a pre-trained model is
    shipped). Loading gives a float32 model again, with those rounded values."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        own_format = getattr(model, "package_format", None)
        if own_format:  # a model of another library (a Hugging Face student), in its own format
            model.save_folder(tmp, half=half)  # type: ignore[attr-defined,operator]
        elif is_quantized(model):
            tensors, spec = quantized_state(model)
            # the header names the spec format, so the weights alone say they are quantized
            header = {"format": "pt", "quantization": spec["format"]}
            save_file(tensors, str(tmp / WEIGHTS), metadata=header)
            (tmp / QUANTIZATION).write_text(json.dumps(spec, indent=2) + "\n")
        else:
            # save_model understands the tied embeddings that save_file would refuse
            stored = copy.deepcopy(model).half() if half else model
            save_model(stored, str(tmp / WEIGHTS))
        if not own_format:
            (tmp / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
            tokenizer.save(tmp)
        meta = dict(metadata or {})
        meta.setdefault("format", own_format or "cvmkd-model/1")
        if half and not is_quantized(model):
            meta["stored_dtype"] = "float16"
        meta["weights_sha256"] = sha256_file(tmp / WEIGHTS)
        meta["tokenizer_sha256"] = tokenizer.sha256
        # every other file the model is rebuilt from, so that an edit cannot change it unseen
        meta["files_sha256"] = {
            name: sha256_file(tmp / name) for name in (CONFIG, TOKENIZER, QUANTIZATION) if (tmp / name).is_file()
        }
        if own_format:  # every file of the folder: weights, configurations, tokenizer
            meta["files_sha256"] = {
                p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file() and p.name != METADATA
            }
        if (tmp / HF_TOKENIZER).is_dir():
            for file in sorted((tmp / HF_TOKENIZER).iterdir()):
                meta["files_sha256"][f"{HF_TOKENIZER}/{file.name}"] = sha256_file(file)
        (tmp / METADATA).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            directory.rename(old)
            tmp.rename(directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_metadata(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / METADATA
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ModelError(f"model package {directory}: {METADATA} is missing") from None
    except ValueError as exc:
        raise ModelError(f"model package {directory}: {METADATA} is damaged ({exc})") from None


def resolve_package(reference: str | Path, registry: Any = None) -> Path:
    """The folder of a model package given as a path, or as the name a plugin registered it
    under (``register.package("bible-fr-en", folder)``).

    A bare word is a registered name first: a folder of that name in the working directory is
    used only when it is written as a path (``./bible-fr-en``), and a shadowed folder is warned
    about. A bare word no plugin registered is a folder."""
    path = Path(reference)
    text = str(reference)
    written_as_path = isinstance(reference, Path) or "/" in text or "\\" in text or len(path.parts) != 1
    names = registry.names("package") if registry is not None else []
    if not written_as_path and text in names:
        registered = Path(registry.get("package", text).factory())
        if path.exists() and path.resolve() != registered.resolve():
            log.warning(
                "%r names the registered model %s; the folder %s in the working directory is not used "
                "(write ./%s to use it)",
                text,
                registered,
                path.resolve(),
                text,
            )
        return registered
    if path.exists() or registry is None or written_as_path:
        return path
    known = ", ".join(names) or "none installed"
    raise ModelError(f"no model package at {reference}, and no registered model named {str(reference)!r} ({known})")


def load_model_folder(
    directory: str | Path, registry: Any = None, device: str | torch.device = "cpu", **options: str
) -> tuple[Any, Any, dict[str, Any]]:
    """A cvmkd model package, or a folder an installed loader recognises (a Hugging Face
    ``save_pretrained`` folder with cvmkd-hf): ``(model, tokenizer, metadata)``. ``options``
    (``source_lang``, ``target_lang``) go to the loader: a cvmkd package records its own."""
    directory = Path(directory)
    if registry is not None:
        for name in registry.names("loader"):
            loader = registry.get("loader", name).factory()
            if loader.recognizes(directory):
                return loader.load(directory, device, **options)  # type: ignore[no-any-return]
    if options:
        given = " and ".join(f"{k} = {v!r}" for k, v in options.items())
        raise ModelError(f"{directory}: {given} are for multilingual Hugging Face teachers, not cvmkd packages")
    if (directory / METADATA).is_file() and read_metadata(directory).get("format") == "huggingface":
        raise ModelError(
            f"{directory} is a student saved as a Hugging Face folder: install the plugin cvmkd-hf to load it "
            "(pip install -e plugins/cvmkd-hf)"
        )
    if registry is not None and not (directory / METADATA).is_file():
        if (directory / "config.json").is_file() and '"model_type"' in (directory / "config.json").read_text("utf-8"):
            raise ModelError(
                f"{directory} is a Hugging Face model folder: install the plugin cvmkd-hf to use it "
                "(pip install -e plugins/cvmkd-hf)"
            )
    return load_package(directory, device)


def tokenizer_format(name: str) -> Any:
    """The tokenizer class another distribution provides for a format of its own (the entry-point
    group ``cvmkd.tokenizers``: ``hf`` from cvmkd-hf), or None when none is installed."""
    import importlib.metadata

    for entry_point in importlib.metadata.entry_points(group="cvmkd.tokenizers", name=name):
        return entry_point.load()
    return None


def load_package(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[CvmTransformer, Any, dict[str, Any]]:
    """Load a package written by :func:`save_package`: (model in eval mode, tokenizer, metadata)."""
    from cvmkd_nmt.data.tokenizer import Tokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"no model package at {directory}")
    if (directory / METADATA).is_file() and read_metadata(directory).get("format") == "huggingface":
        raise ModelError(f"{directory} is a student saved as a Hugging Face folder, not a cvm model package")
    hf_tokenizer = (directory / HF_TOKENIZER).is_dir()
    for name in (WEIGHTS, CONFIG, METADATA) if hf_tokenizer else (WEIGHTS, CONFIG, TOKENIZER, METADATA):
        if not (directory / name).is_file():
            raise ModelError(f"model package {directory}: {name} is missing")
    metadata = read_metadata(directory)
    expected = metadata.get("weights_sha256")
    if expected and sha256_file(directory / WEIGHTS) != expected:
        raise ModelError(f"model package {directory}: {WEIGHTS} is damaged (sha256 mismatch)")
    try:
        config = ModelConfig.from_dict(json.loads((directory / CONFIG).read_text("utf-8")))
    except ValueError as exc:
        raise ModelError(f"model package {directory}: {CONFIG} is damaged ({exc})") from None
    model = CvmTransformer(config)
    if (directory / QUANTIZATION).is_file():
        _load_quantized(directory, model, device)
    else:
        try:
            load_model(model, str(directory / WEIGHTS), device=str(device))
        except SafetensorError as exc:  # not a safetensors file (a damaged header, say)
            raise ModelError(f"model package {directory}: {WEIGHTS} is damaged ({exc})") from None
        except Exception as exc:
            if _quantized_weights(directory / WEIGHTS):
                raise ModelError(
                    f"model package {directory}: {QUANTIZATION} is missing (the weights are quantized)"
                ) from None
            raise ModelError(f"model package {directory}: {WEIGHTS} does not fit {CONFIG} ({exc})") from None
    if hf_tokenizer:  # a student of a Hugging Face teacher speaks its tokenizer
        reader = tokenizer_format("hf")
        if reader is None:
            raise ModelError(
                f"model package {directory}: its tokenizer is a Hugging Face tokenizer: install the plugin cvmkd-hf"
            )
        tokenizer: Any = reader(directory / HF_TOKENIZER, vocab_size=config.vocab_size)
    else:
        tokenizer = Tokenizer.load(directory / TOKENIZER)
    if tokenizer.vocab_size != config.vocab_size:
        raise ModelError(
            f"model package {directory}: tokenizer has {tokenizer.vocab_size} pieces but the model "
            f"expects {config.vocab_size}"
        )
    verify_files(directory, metadata)
    model.to(device).eval()
    return model, tokenizer, metadata


def verify_files(directory: Path, metadata: dict[str, Any]) -> None:
    """Check config, tokenizer and quantization spec against the sha256 the package recorded
    when it was written (packages written before cvmkd recorded them are not checked)."""
    recorded = metadata.get("files_sha256") or {}
    for name in (CONFIG, TOKENIZER, QUANTIZATION, *(k for k in recorded if k.startswith(f"{HF_TOKENIZER}/"))):
        expected = recorded.get(name)
        if expected is None:
            if name == QUANTIZATION and recorded and (directory / name).is_file():
                raise ModelError(f"model package {directory}: {name} was added after the package was written")
            continue
        path = directory / name
        if not path.is_file():
            raise ModelError(f"model package {directory}: {name} is missing")
        if sha256_file(path) != expected:
            raise ModelError(
                f"model package {directory}: {name} does not match the sha256 recorded in {METADATA} (edited or damaged)"
            )


def _quantized_weights(path: Path) -> bool:
    """True when a safetensors file holds quantized tensors (header tag or ``*.qdata`` names)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            return "quantization" in meta or any(k.endswith(".qdata") for k in handle.keys())
    except Exception:
        return False


def _load_quantized(directory: Path, model: CvmTransformer, device: str | torch.device) -> None:
    """Rebuild the quantized modules of ``model`` from the package's spec and tensors."""
    try:
        spec = json.loads((directory / QUANTIZATION).read_text("utf-8"))
    except ValueError as exc:
        raise ModelError(f"model package {directory}: {QUANTIZATION} is damaged ({exc})") from None
    try:
        tensors = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"model package {directory}: {WEIGHTS} is damaged ({exc})") from None
    try:
        load_quantized(model, spec, tensors)
    except Exception as exc:  # ModelError names the bad entry; anything else is damage too
        raise ModelError(
            f"model package {directory}: {QUANTIZATION} or {WEIGHTS} is damaged: "
            + (str(exc).splitlines() or [type(exc).__name__])[0]
        ) from None
    if torch.device(device).type != "cpu" and any(
        isinstance(m, (DynamicInt8Linear, StaticInt8Linear)) for m in model.modules()
    ):
        raise ModelError(f"model package {directory}: its int8 layers run on the CPU only, cannot load it on {device}")
