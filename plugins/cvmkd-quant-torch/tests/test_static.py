"""The static-int8 quantizer: its plan and calibration on a tiny model, and a real (tiny)
distillation run whose static-int8 variant is calibrated on the validation split, measured,
packaged, and loads for translation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cvmkd_core.config import ConfigValueError
from cvmkd_core.errors import ModelError
from cvmkd_core.session import open_session, run_session
from cvmkd_nmt.model import CvmTransformer, preset
from cvmkd_nmt.model.package import load_package, save_package
from cvmkd_nmt.model.translate import translate
from cvmkd_nmt.quantized import (
    DynamicInt8Linear,
    QuantEmbedding,
    StaticInt8Linear,
    quantizable_layers,
    uncalibrated_layers,
)
from cvmkd_quant_torch import StaticInt8, StaticInt8Config
from cvmkd_testing import TINY_KD_RECIPE, write_tiny_corpus

RECIPE = (
    TINY_KD_RECIPE
    + """
[[quantize]]
name = "static-int8"
observer = "percentile"
max_bleu_loss = 100.0
max_composite_loss = 1.0
"""
)


class FakeContext:
    """What the quantizer uses of a QuantizationContext: calibration batches of source ids."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches
        self.asked: list[int] = []

    def calibration_batches(self, count: int) -> list[torch.Tensor]:
        self.asked.append(count)
        return self.batches[:count]


def _model(tie: bool = True) -> CvmTransformer:
    torch.manual_seed(0)
    return CvmTransformer(preset("tiny", tie_embeddings=tie)).eval()


def _sources(count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        src = torch.randint(4, 64, (4, 7), generator=g)
        src[:, -1] = 2
        src[0, 4:] = 0  # padded like the real batches
        batches.append(src)
    return batches


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_static_plan_calibration_and_details(tie: bool) -> None:
    torch.set_num_threads(1)
    model = _model(tie)
    fp32 = _model(tie)
    names = quantizable_layers(model)
    context = FakeContext(_sources())
    result = StaticInt8(StaticInt8Config(calibration_batches=2)).quantize(model, context)
    assert context.asked == [2]
    assert result.scheme == "static-int8" and result.model is model
    assert uncalibrated_layers(model) == []
    # every linear layer static but the output projection: dynamic, over the int8 table
    assert isinstance(model.src_embed, QuantEmbedding) and isinstance(model.tgt_embed, QuantEmbedding)
    assert isinstance(model.output_proj, DynamicInt8Linear)
    if tie:
        assert model.tgt_embed is model.src_embed and model.output_proj.tied_to is model.src_embed
    static = [n for n, m in model.named_modules() if isinstance(m, StaticInt8Linear)]
    assert len(static) == 2 * 6 + 2 * 10
    details = result.details
    assert details["calibration"] == {
        "split": "validation",
        "batches": 2,
        "sentences": 8,
        "source_tokens": sum(int(b.ne(0).sum()) for b in context.batches[:2]),
        "method": "greedy decoding of the source batches",
        "seconds": details["calibration"]["seconds"],
    }
    assert details["observer"] == "minmax" and details["reduce_range"] is True
    assert set(details["layers"]) == set(names)
    assert details["layers"]["decoder_layers.1.cross_attn.k_proj"]["kind"] == "static-int8"
    assert set(details["qparams"]) == set(static)
    for name in static:
        module = model.get_submodule(name)
        entry = details["qparams"][name]
        assert entry["input"]["scale"] == pytest.approx(float(module.act_scale[0]), rel=1e-5)
        assert entry["output"]["zero_point"] == int(module.act_zero_point[1])
        low, high = entry["input"]["range"]
        # 7-bit inputs: the range (widened to hold 0) over 127 steps
        assert entry["input"]["scale"] == pytest.approx((max(high, 0) - min(low, 0)) / 127, rel=1e-4)
        assert entry["input"]["zero_point"] <= 127
    json.dumps(details)  # goes into metadata.json and quantization.json
    # the quantized model is close to the fp32 one (an untrained tiny model: loose)
    src = context.batches[2]
    tgt = torch.cat([torch.ones(4, 1, dtype=torch.long), src[:, :5].clamp(min=4)], dim=1)
    with torch.no_grad():
        ref, out = fp32(src, tgt), model(src, tgt)
    assert float((out - ref).norm() / ref.norm()) < 0.1


def test_static_options_embeddings_observer_and_errors(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    model = _model(tie=False)
    config = StaticInt8Config(embeddings=False, observer="percentile", reduce_range=False)
    result = StaticInt8(config).quantize(model, FakeContext(_sources()))
    for name in ("src_embed", "tgt_embed", "output_proj"):
        assert type(model.get_submodule(name)) in (torch.nn.Embedding, torch.nn.Linear)
    assert result.details["embeddings"] == "fp32" and result.details["output_projection"] == "fp32"
    assert result.details["observer"] == "percentile"
    assert result.details["calibration"]["batches"] == 3  # fewer than asked: all there are
    for entry in result.details["qparams"].values():  # 8-bit inputs: 255 steps
        low, high = entry["input"]["range"]
        assert entry["input"]["scale"] == pytest.approx((max(high, 0) - min(low, 0)) / 255, rel=1e-4)
    with pytest.raises(ModelError, match="validation split is empty"):
        StaticInt8().quantize(_model(), FakeContext([]))
    with pytest.raises(ConfigValueError, match="must be >= 1"):
        StaticInt8Config(calibration_batches=0)
    with pytest.raises(ConfigValueError, match="must be one of 'minmax', 'percentile'"):
        StaticInt8Config(observer="histogram")


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_kd_cache: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    write_tiny_corpus(tmp_path)
    (tmp_path / "recipe.toml").write_text(RECIPE.replace('cache_dir = "cache"', f'cache_dir = "{tiny_kd_cache}"'))
    torch.set_num_threads(1)
    return tmp_path


def test_static_int8_variant_is_calibrated_measured_packaged_and_loads(workdir: Path) -> None:
    summary, run_dir = run_session(open_session(workdir / "recipe.toml"))
    assert summary.status == "completed"
    report = json.loads((run_dir / "quantization.json").read_text())
    (variant,) = report["variants"]
    assert variant["name"] == "static-int8" and variant["scheme"] == "static-int8"
    assert variant["accepted"] is True
    package = Path(variant["package"])
    assert package == run_dir / "model-static-int8"
    assert variant["file_bytes"] == (package / "model.safetensors").stat().st_size
    assert variant["file_ratio"] < 0.6  # measured 0.57: a 16-wide model is mostly LayerNorms and headers
    for speed in ("latency", "throughput"):
        assert variant[speed]["tokens_per_second"] > 0
    details = variant["details"]
    # valid_size 8: one batch of the 8 validation sources, though 8 batches were allowed
    assert details["calibration"]["split"] == "validation"
    assert (details["calibration"]["batches"], details["calibration"]["sentences"]) == (1, 8)
    assert details["observer"] == "percentile"

    model, tokenizer, metadata = load_package(package)
    assert metadata["scheme"] == "static-int8" and metadata["role"] == "quantized-student"
    assert metadata["quantization"]["calibration"] == details["calibration"]
    static = {n: m for n, m in model.named_modules() if isinstance(m, StaticInt8Linear)}
    assert len(static) == 2 * 6 + 2 * 10 and uncalibrated_layers(model) == []
    assert set(details["qparams"]) == set(static)
    for name, module in static.items():  # the saved parameters are the calibrated ones
        assert details["qparams"][name]["input"]["zero_point"] == int(module.act_zero_point[0])
        assert details["qparams"][name]["output"]["scale"] == pytest.approx(float(module.act_scale[1]), rel=1e-5)
    assert isinstance(model.src_embed, QuantEmbedding) and isinstance(model.output_proj, DynamicInt8Linear)
    spec = json.loads((package / "quantization.json").read_text())
    assert spec["layers"]["encoder_layers.0.ff.fc1"]["kind"] == "static-int8"
    out = translate(model, tokenizer, ["le chat mange", "un petit oiseau"])
    assert len(out) == 2
    # saving the loaded model again gives the same tensors, bit for bit
    again = save_package(workdir / "again", model, tokenizer)
    from safetensors.torch import load_file

    first, second = load_file(package / "model.safetensors"), load_file(again / "model.safetensors")
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    saved = json.loads((run_dir / "summary.json").read_text())
    assert [q["name"] for q in saved["quantized"] if q["accepted"]] == ["static-int8"]
