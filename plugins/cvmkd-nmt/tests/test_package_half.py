"""A package stored in float16 (how a pre-trained teacher is shipped): half the file, loaded back
as a float32 model whose weights are the float16-rounded originals; the model saved from is
left as it was."""

from __future__ import annotations

from pathlib import Path

import torch

from cvmkd_nmt.model.package import WEIGHTS, load_package, read_metadata, save_package
from cvmkd_nmt.model.translate import translate


def test_half_storage_halves_the_file_and_loads_as_float32(tiny_teacher_package: Path, tmp_path: Path) -> None:
    model, tokenizer, _ = load_package(tiny_teacher_package)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    half = save_package(tmp_path / "half", model, tokenizer, {"role": "teacher"}, half=True)
    assert all(torch.equal(before[k], v) and v.dtype == torch.float32 for k, v in model.state_dict().items())

    full_bytes = (tiny_teacher_package / WEIGHTS).stat().st_size
    half_bytes = (half / WEIGHTS).stat().st_size
    assert half_bytes < 0.6 * full_bytes
    assert read_metadata(half)["stored_dtype"] == "float16"

    loaded, _, _ = load_package(half)
    for key, value in loaded.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, before[key].half().float()), key
    sources = ["le chat", "la maison"]
    assert len(translate(loaded, tokenizer, sources)) == 2
