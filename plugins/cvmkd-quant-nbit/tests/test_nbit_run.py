"""The nbit quantizers in a real (tiny) distillation run: each variant is measured, packaged,
loads for translation, and records its details."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cvmkd_core.session import open_session, run_session
from cvmkd_nmt.model.package import load_package
from cvmkd_nmt.model.translate import translate
from cvmkd_nmt.quantized import NbitLinear, QuantEmbedding
from cvmkd_testing import TINY_KD_RECIPE, write_tiny_corpus

RECIPE = (
    TINY_KD_RECIPE
    + """
[[quantize]]
name = "nbit"
bits = 4
group_size = 16
max_bleu_loss = 100.0
max_composite_loss = 1.0

[[quantize]]
name = "progressive"
max_bleu_loss = 100.0
max_composite_loss = 1.0

[[quantize]]
name = "target-ratio"
ratio = 0.3
max_bleu_loss = 100.0
max_composite_loss = 1.0

[[quantize]]
name = "nbit"
bits = 4
fallback_share = 0.5
max_rounds = 2
"""
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_kd_cache: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    write_tiny_corpus(tmp_path)
    (tmp_path / "recipe.toml").write_text(RECIPE.replace('cache_dir = "cache"', f'cache_dir = "{tiny_kd_cache}"'))
    torch.set_num_threads(1)
    return tmp_path


def test_nbit_progressive_and_target_ratio_in_a_run(workdir: Path) -> None:
    summary, run_dir = run_session(open_session(workdir / "recipe.toml"))
    assert summary.status == "completed"
    report = json.loads((run_dir / "quantization.json").read_text())
    variants = {v["name"]: v for v in report["variants"]}
    assert list(variants) == ["nbit-0", "progressive", "target-ratio", "nbit-3"]

    nbit = variants["nbit-0"]
    assert nbit["scheme"] == "nbit-int4-g16" and nbit["accepted"] is True
    assert nbit["details"]["group_size"] == 16 and nbit["details"]["per_row_scales"] == []
    assert nbit["details"]["levels"] == {"4": len(nbit["details"]["layers"])}

    progressive = variants["progressive"]
    assert [s["bits"] for s in progressive["details"]["stages"]] == [16, 8, 4]
    assert all(s["verdict"] == "within budget" for s in progressive["details"]["stages"])
    assert progressive["details"]["kept_stage"] == 4 and progressive["scheme"] == "progressive-int4"

    target = variants["target-ratio"]
    details = target["details"]
    assert 0.95 * 0.3 <= details["achieved_ratio"] <= 0.3
    # the achieved ratio is the run's own parameter ratio
    assert target["parameter_ratio"] == pytest.approx(details["achieved_ratio"], abs=1e-4)
    assert details["sensitivity"]["sentences"] == 8 and details["sensitivity"]["positions"] > 0
    assert set(details["sensitivity"]["table"]) == set(details["layers"])

    # the default budget: the quantizer's own verdict is the run's
    judged = variants["nbit-3"]
    assert judged["accepted"] is judged["details"]["within_budget"]
    assert judged["details"]["evaluations"] == 1 + len(judged["details"]["rounds"])

    for variant in variants.values():
        package = Path(variant["package"])
        model, tokenizer, metadata = load_package(package)
        assert metadata["scheme"] == variant["scheme"]
        assert metadata["quantization"] == {"scheme": variant["scheme"], **variant["details"]}
        assert any(isinstance(m, NbitLinear) for m in model.modules())
        assert any(isinstance(m, QuantEmbedding) for m in model.modules())
        assert len(translate(model, tokenizer, ["le chat mange", "un petit oiseau"])) == 2
