"""The int8 quantizers in a real (tiny) distillation run: each variant is measured, packaged,
loads for translation, and is checked against the quality budget and by the retention gate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from cvmkd_core import hookimpl
from cvmkd_core.session import open_session, run_session
from cvmkd_nmt.contracts import within_budget
from cvmkd_nmt.model.package import load_package
from cvmkd_nmt.model.translate import translate
from cvmkd_nmt.quantized import DynamicInt8Linear, QuantEmbedding
from cvmkd_quant_torch import qat
from cvmkd_testing import TINY_KD_RECIPE, write_tiny_corpus

RECIPE = (
    TINY_KD_RECIPE
    + """
[[quantize]]
name = "dynamic-int8"
max_bleu_loss = 100.0
max_composite_loss = 1.0

[[quantize]]
name = "qat-int8"
start_step = 8
max_bleu_loss = 100.0
max_composite_loss = 1.0
"""
)


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_kd_cache: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    write_tiny_corpus(tmp_path)
    (tmp_path / "recipe.toml").write_text(RECIPE.replace('cache_dir = "cache"', f'cache_dir = "{tiny_kd_cache}"'))
    torch.set_num_threads(1)
    return tmp_path


class QatWatcher:
    """Records, after each student step, whether the student fake-quantizes."""

    def __init__(self) -> None:
        self.enabled: dict[int, bool] = {}

    @hookimpl
    def cvmkd_step_end(self, state: Any, result: Any) -> None:
        if state.recipe.distill.name == "kd":
            self.enabled[state.step] = qat.is_enabled(state.components["distill"].model)


def test_each_int8_variant_is_measured_packaged_and_loads(workdir: Path) -> None:
    session = open_session(workdir / "recipe.toml")
    watcher = QatWatcher()
    session.plugins.add_plugin(watcher, name="qat-watcher", source="test")
    summary, run_dir = run_session(session)
    assert summary.status == "completed"
    # fake quantization from step 8: the step that takes state.step from 8 to 9 is the first
    assert [s for s, on in watcher.enabled.items() if on] == [9, 10, 11, 12]

    report = json.loads((run_dir / "quantization.json").read_text())
    baseline = report["baseline"]
    assert baseline["file_bytes"] == (run_dir / "model" / "model.safetensors").stat().st_size
    names = [v["name"] for v in report["variants"]]
    assert names == ["dynamic-int8", "qat-int8"]
    tokenizer = None
    for variant in report["variants"]:
        assert variant["accepted"] is True
        package = Path(variant["package"])
        assert package == run_dir / f"model-{variant['name']}"
        assert variant["file_bytes"] == (package / "model.safetensors").stat().st_size
        assert variant["file_ratio"] == pytest.approx(variant["file_bytes"] / baseline["file_bytes"], abs=1e-4)
        assert variant["file_ratio"] < 0.6  # a 16-wide model is mostly LayerNorms and headers
        assert set(variant["scores"]) == {"bleu", "chrf", "composite"}
        assert variant["retention"]["chrf"] == pytest.approx(
            variant["scores"]["chrf"]
            / json.loads((run_dir / "evaluation.json").read_text())["teacher"]["scores"]["chrf"]
        )
        for speed in ("latency", "throughput"):
            assert variant[speed]["tokens_per_second"] > 0
        model, tokenizer, metadata = load_package(package)
        assert metadata["scheme"] == variant["scheme"] and metadata["role"] == "quantized-student"
        assert any(isinstance(m, DynamicInt8Linear) for m in model.modules())
        assert any(isinstance(m, QuantEmbedding) for m in model.modules())
        assert not qat.is_enabled(model)
        out = translate(model, tokenizer, ["le chat mange", "un petit oiseau"])
        assert len(out) == 2
    assert report["variants"][1]["details"]["qat_start_step"] == 8

    saved = json.loads((run_dir / "summary.json").read_text())
    assert [q["name"] for q in saved["quantized"] if q["accepted"]] == ["dynamic-int8", "qat-int8"]
    assert saved["outputs"]["model-qat-int8"] == str(run_dir / "model-qat-int8")
    # the fp32 package holds plain weights (the fake quantization is a way of computing)
    fp32, _, _ = load_package(run_dir / "model")
    assert not qat.is_enabled(fp32)


def test_the_quality_budget_counts_bleu_points_and_a_share_of_the_composite() -> None:
    reference = {"bleu": 20.0, "composite": 40.0}
    assert within_budget({"bleu": 19.2, "composite": 39.5}, reference, max_bleu_loss=1.0, max_composite_loss=0.02) == (
        True,
        {"bleu": pytest.approx(0.8), "composite_share": pytest.approx(0.0125)},
    )
    ok, losses = within_budget({"bleu": 18.5, "composite": 39.9}, reference, max_bleu_loss=1.0, max_composite_loss=0.02)
    assert not ok and losses["bleu"] == pytest.approx(1.5)
    ok, _ = within_budget({"bleu": 19.9, "composite": 38.0}, reference, max_bleu_loss=1.0, max_composite_loss=0.02)
    assert not ok  # 5% of the composite


class Breaker:
    """A quantizer that destroys the model: certainly over any quality budget."""

    def quantize(self, model: Any, context: Any) -> Any:
        from cvmkd_nmt.contracts import QuantizationResult

        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        return QuantizationResult(model=model, scheme="broken", details={})


class BreakerPlugin:
    @hookimpl
    def cvmkd_register(self, register: Any) -> None:
        register.quantizer("breaker", Breaker)


def test_a_variant_over_budget_is_kept_apart_and_not_gated(workdir: Path) -> None:
    (workdir / "recipe.toml").write_text(RECIPE + '\n[[quantize]]\nname = "breaker"\n')
    from cvmkd_core.plugins import build_plugins
    from cvmkd_core.recipe import load_recipe
    from cvmkd_core.session import Session

    plugins = build_plugins()
    plugins.add_plugin(BreakerPlugin(), name="breaker", source="test")
    recipe = load_recipe(workdir / "recipe.toml", registry=plugins.registry)
    summary, run_dir = run_session(Session(recipe=recipe, plugins=plugins, recipe_path=workdir / "recipe.toml"))
    report = json.loads((run_dir / "quantization.json").read_text())
    assert report["baseline"]["validation_scores"]["composite"] > 0
    broken = report["variants"][-1]
    assert broken["name"] == "breaker" and broken["accepted"] is False
    assert broken["budget"]["losses_on_validation"]["composite_share"] > 0.02
    assert (run_dir / "model-breaker-rejected").is_dir() and not (run_dir / "model-breaker").exists()
    saved = json.loads((run_dir / "summary.json").read_text())
    assert [q["name"] for q in saved["quantized"] if q["accepted"]] == ["dynamic-int8", "qat-int8"]
    assert [q["name"] for q in [q for q in saved["quantized"] if not q["accepted"]]] == ["breaker"]


class Crasher:
    def quantize(self, model: Any, context: Any) -> Any:
        raise RuntimeError("no kernel for this")


class CrasherPlugin:
    @hookimpl
    def cvmkd_register(self, register: Any) -> None:
        register.quantizer("crasher", Crasher)


def test_a_failing_quantizer_is_recorded_and_the_others_still_run(workdir: Path) -> None:
    from cvmkd_core.plugins import build_plugins
    from cvmkd_core.recipe import load_recipe
    from cvmkd_core.session import Session

    text = RECIPE.replace(
        '[[quantize]]\nname = "dynamic-int8"', '[[quantize]]\nname = "crasher"\n\n[[quantize]]\nname = "dynamic-int8"'
    )
    (workdir / "recipe.toml").write_text(text)
    plugins = build_plugins()
    plugins.add_plugin(CrasherPlugin(), name="crasher", source="test")
    recipe = load_recipe(workdir / "recipe.toml", registry=plugins.registry)
    summary, run_dir = run_session(Session(recipe=recipe, plugins=plugins, recipe_path=workdir / "recipe.toml"))
    assert summary.status == "completed"
    report = json.loads((run_dir / "quantization.json").read_text())
    assert [v["name"] for v in report["variants"]] == ["crasher", "dynamic-int8", "qat-int8"]
    assert report["variants"][0] == {
        "name": "crasher",
        "component": "quantize[0]",
        "scheme": None,
        "accepted": False,
        "error": "RuntimeError: no kernel for this",
    }
    saved = json.loads((run_dir / "summary.json").read_text())
    assert [q for q in saved["quantized"] if not q["accepted"]][0]["error"] == "RuntimeError: no kernel for this"
    assert [q["name"] for q in saved["quantized"] if q["accepted"]] == ["dynamic-int8", "qat-int8"]
