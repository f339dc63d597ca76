"""Model packages: a folder holding weights (safetensors), config, tokenizer and metadata.

A package is written into a temporary sibling folder and renamed into place, so a reader never
sees half a package. Loading checks every piece and says which one is missing or damaged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from cvmkd_core.errors import ModelError
from cvmkd_core.files import sha256_file
from cvmkd_core.model.config import ModelConfig
from cvmkd_core.model.transformer import CvmTransformer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.model"
METADATA = "metadata.json"


def save_package(
    directory: str | Path,
    model: CvmTransformer,
    tokenizer: Any,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write ``model``, its config, ``tokenizer`` and ``metadata`` to ``directory``, replacing it."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        # save_model understands the tied embeddings that save_file would refuse
        save_model(model, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        tokenizer.save(tmp)
        meta = dict(metadata or {})
        meta.setdefault("format", "cvmkd-model/1")
        meta["weights_sha256"] = sha256_file(tmp / WEIGHTS)
        meta["tokenizer_sha256"] = tokenizer.sha256
        (tmp / METADATA).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        for path in tmp.iterdir():
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


def load_package(directory: str | Path, device: str | torch.device = "cpu") -> tuple[CvmTransformer, Any, dict[str, Any]]:
    """Load a package written by :func:`save_package`: (model in eval mode, tokenizer, metadata)."""
    from cvmkd_core.data.tokenizer import Tokenizer

    directory = Path(directory)
    if not directory.is_dir():
        raise ModelError(f"no model package at {directory}")
    for name in (WEIGHTS, CONFIG, TOKENIZER, METADATA):
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
    try:
        load_model(model, str(directory / WEIGHTS), device=str(device))
    except Exception as exc:
        raise ModelError(f"model package {directory}: {WEIGHTS} does not fit {CONFIG} ({exc})") from None
    tokenizer = Tokenizer.load(directory / TOKENIZER)
    if tokenizer.vocab_size != config.vocab_size:
        raise ModelError(
            f"model package {directory}: tokenizer has {tokenizer.vocab_size} pieces but the model "
            f"expects {config.vocab_size}"
        )
    model.to(device).eval()
    return model, tokenizer, metadata
