"""Unit tests of the nbit quantizers on a tiny CvmTransformer with a fake QuantizationContext
whose scores follow the model's real output error, so every budget decision is deterministic."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
import torch.nn.functional as F

from cvmkd_core.config import structure
from cvmkd_core.errors import ModelError, RecipeError
from cvmkd_nmt.contracts import QuantizationContext
from cvmkd_nmt.model import CvmTransformer, preset
from cvmkd_nmt.model.package import load_package, save_package
from cvmkd_nmt.quantized import NbitLinear, QuantEmbedding, model_nbytes, quantized_state
from cvmkd_quant_nbit import (
    NbitConfig,
    NbitQuantizer,
    ProgressiveConfig,
    ProgressiveQuantizer,
    Sensitivity,
    TargetRatioConfig,
    TargetRatioQuantizer,
    choose_bits,
    within_budget,
)
from cvmkd_quant_nbit.plans import FP32, Sizer, build, layer_infos

SIZE = {"d_model": 64, "vocab_size": 512, "d_ff": 128}
#: the layer test_* damage with one huge weight per row (per-row 4-bit scales then zero the rest)
DAMAGED = "decoder_layers.1.ff.fc2"
REFERENCE = {"bleu": 30.0, "composite": 40.0}


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _model(damaged: bool = False, **overrides: Any) -> CvmTransformer:
    torch.manual_seed(0)
    model = CvmTransformer(preset("tiny", **{**SIZE, **overrides})).eval()
    if damaged:
        weight = model.get_submodule(DAMAGED).weight
        with torch.no_grad():
            weight[:, 0] = 30 * weight.abs().max()
    return model


class Fake:
    """A QuantizationContext whose ``evaluate`` scores a model by its mean KL divergence from the
    fp32 model on a fixed teacher-forced batch: bleu = 30 - 100 * kl, composite = 40 * (1 - kl)."""

    def __init__(self, fp32: CvmTransformer, penalty: float = 0.0) -> None:
        self.penalty = penalty  # BLEU lost whatever the model (a budget nothing meets)
        vocab = fp32.config.vocab_size
        g = torch.Generator().manual_seed(7)
        self.src = torch.randint(4, vocab, (8, 10), generator=g)
        self.tgt = torch.randint(4, vocab, (8, 9), generator=g)
        self.tgt[:, 0] = fp32.config.bos_id
        with torch.no_grad():
            self.reference = F.log_softmax(fp32(self.src, self.tgt), -1).flatten(0, 1)
        cal = torch.Generator().manual_seed(1)
        self.batches = [torch.randint(4, vocab, (16, 12), generator=cal) for _ in range(3)]
        self.batches[0][3, 7:] = fp32.config.pad_id  # a shorter sentence in a padded batch
        self.calls = 0

    def kl(self, model: torch.nn.Module) -> float:
        with torch.no_grad():
            logq = F.log_softmax(model(self.src, self.tgt), -1).flatten(0, 1)
        return float(F.kl_div(logq, self.reference, log_target=True, reduction="batchmean"))

    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        self.calls += 1
        kl = self.kl(model)
        return {"bleu": 30.0 - self.penalty - 100.0 * kl, "composite": 40.0 * (1.0 - kl)}

    def context(self) -> QuantizationContext:
        return QuantizationContext(
            tokenizer=None,
            sources=["x"] * 48,
            references=["y"] * 48,
            evaluate=self.evaluate,
            reference_scores=dict(REFERENCE),
            calibration_batches=lambda n: self.batches[:n],
        )


def _bits(model: torch.nn.Module) -> dict[str, Any]:
    """Bits of each quantized module by name (fp32 layers absent)."""
    return {n: m.bits for n, m in model.named_modules() if isinstance(m, (NbitLinear, QuantEmbedding))}


# -- settings and the budget rule -------------------------------------------------------------------


def test_budget_rule_is_the_orchestrators() -> None:
    import cvmkd_kd.quantize
    import cvmkd_nmt.contracts

    assert within_budget is cvmkd_nmt.contracts.within_budget is cvmkd_kd.quantize.within_budget


@pytest.mark.parametrize(
    ("cls", "data", "message"),
    [
        (NbitConfig, {"bits": 3}, "bits: must be one of 4, 8, 16, got 3"),
        (NbitConfig, {"bits": 16, "group_size": 32}, "group_size applies to 4 and 8 bits only"),
        (NbitConfig, {"fallback": "drop"}, "fallback: must be one of 'per-layer', 'reject'"),
        (NbitConfig, {"fallback_share": 0.0}, "fallback_share: must be in (0, 1]"),
        (ProgressiveConfig, {"stages": [8, 16]}, "stages: must go down in precision"),
        (ProgressiveConfig, {"stages": [16, 2]}, "stages: bit widths must be 4, 8 or 16, got 2"),
        (ProgressiveConfig, {"stages": []}, "stages: must list at least one bit width"),
        (TargetRatioConfig, {"ratio": 1.5}, "ratio: must be in (0, 1]"),
        (TargetRatioConfig, {"bits": [4, 12]}, "bits: bit widths must be 4, 8, 16 or 32"),
        (TargetRatioConfig, {"half": "float8"}, "half: must be one of 'float16', 'bfloat16'"),
    ],
)
def test_bad_settings_are_one_line_recipe_errors(cls: type, data: dict, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        structure(data, cls, "quantize[0]")
    assert len(info.value.problems) == 1 and message in info.value.problems[0]


def test_the_quantizers_are_registered() -> None:
    from cvmkd_core.plugins import build_plugins

    registry = build_plugins().registry
    for name, cls in (
        ("nbit", NbitQuantizer),
        ("progressive", ProgressiveQuantizer),
        ("target-ratio", TargetRatioQuantizer),
    ):
        component = registry.get("quantizer", name)
        assert component.factory is cls and component.plugin == "quant-nbit"


# -- sizes and round trips ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from cvmkd_nmt.data.tokenizer import train_tokenizer

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(40)]
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 8))) for _ in range(200)]
    return train_tokenizer(lines, vocab_size=48, cache_dir=tmp_path_factory.mktemp("tok"), hard_vocab_limit=False)


@pytest.mark.parametrize(
    "settings",
    [
        {"bits": 4},
        {"bits": 4, "group_size": 16},
        {"bits": 8},
        {"bits": 8, "group_size": 32},
        {"bits": 16},
        {"bits": 16, "half": "bfloat16"},
        {"bits": 4, "group_size": 16, "embeddings": False},
    ],
    ids=["int4", "int4-g16", "int8", "int8-g32", "fp16", "bf16", "int4-g16-no-embeddings"],
)
def test_each_setting_saves_and_loads_bit_identically(tmp_path: Path, tokenizer: Any, settings: dict) -> None:
    fp32 = _model(vocab_size=tokenizer.vocab_size)
    fake = Fake(fp32)
    result = NbitQuantizer(NbitConfig(**settings, fallback="reject")).quantize(fp32, fake.context())
    model = result.model
    assert fake.calls == 0  # reject mode leaves the judging to the run
    bits = _bits(model)
    assert set(bits.values()) == {settings["bits"]}
    assert ("src_embed" in bits) == settings.get("embeddings", True)
    if settings.get("group_size"):
        assert all(
            m.group_size == settings["group_size"]
            for m in model.modules()
            if isinstance(m, NbitLinear) and m.tied_to is None
        )
    tensors, _ = quantized_state(model)
    # the bytes reported are the tensors written to model.safetensors
    assert result.details["bytes"] == model_nbytes(model) == sum(t.numel() * t.element_size() for t in tensors.values())
    save_package(tmp_path / "pkg", model, tokenizer, {"quantization": result.details})
    loaded, _, _ = load_package(tmp_path / "pkg")
    assert _bits(loaded) == bits
    src, tgt = fake.src.clamp(max=tokenizer.vocab_size - 1), fake.tgt.clamp(max=tokenizer.vocab_size - 1)
    with torch.no_grad():
        assert torch.equal(loaded(src, tgt), model(src, tgt))


def test_a_group_size_that_does_not_divide_a_layer_gives_it_per_row_scales() -> None:
    fp32 = _model()  # d_model 64, d_ff 128: a group of 128 divides only the fc2 inputs
    result = NbitQuantizer(NbitConfig(bits=4, group_size=128, fallback="reject")).quantize(fp32, Fake(fp32).context())
    skipped = result.details["per_row_scales"]
    assert skipped and not any(name.endswith("fc2") for name in skipped) and "embeddings" in skipped
    groups = {
        n: m.group_size for n, m in result.model.named_modules() if isinstance(m, NbitLinear) and m.tied_to is None
    }
    assert {n for n, g in groups.items() if g == 128} == {n for n in groups if n.endswith("fc2")}
    assert result.details["layers"]["encoder_layers.0.ff.fc2"] == {"bits": 4, "group_size": 128}
    assert result.details["layers"]["encoder_layers.0.ff.fc1"] == {"bits": 4, "group_size": 0}


def test_the_byte_model_matches_the_built_model() -> None:
    fp32 = _model()
    infos = layer_infos(fp32)
    rng = random.Random(3)
    for group in (0, 16):
        sizer = Sizer(fp32, infos, group)
        plan = {n: rng.choice([4, 8, 16, FP32]) for n in infos}
        assert sizer.bytes(plan) == model_nbytes(build(fp32, plan, infos, group, "float16"))
        assert sizer.bytes({n: FP32 for n in infos}) == model_nbytes(fp32)


# -- sensitivity ------------------------------------------------------------------------------------


def test_sensitivity_ranks_the_damaged_layer_first() -> None:
    fp32 = _model(damaged=True)
    infos = layer_infos(fp32)
    before = [p.clone() for p in fp32.parameters()]
    sens = Sensitivity(fp32, Fake(fp32).batches[:2], infos)
    at4 = {name: sens(name, 4) for name in infos}
    ranked = sorted(at4, key=at4.get, reverse=True)
    assert ranked[0] == DAMAGED
    assert at4[DAMAGED] > 2 * at4[ranked[1]]
    # more bits, less damage; fp32 none; the model measured is left as it was
    assert sens(DAMAGED, 16) < sens(DAMAGED, 8) < sens(DAMAGED, 4) and sens(DAMAGED, FP32) == 0.0
    assert all(torch.equal(a, b) for a, b in zip(before, fp32.parameters()))
    assert sens.summary()["forward_passes"] == 2 * (len(infos) + 2)
    assert set(sens.table()[DAMAGED]) == {"4", "8", "16"}


def test_sensitivity_needs_calibration_sentences() -> None:
    fp32 = _model()
    with pytest.raises(ModelError, match="calibration sentences"):
        Sensitivity(fp32, [], layer_infos(fp32))


# -- nbit fallback ----------------------------------------------------------------------------------


def test_fallback_raises_the_most_sensitive_layers_first_and_stops_within_budget() -> None:
    fp32 = _model(damaged=True)
    fake = Fake(fp32)
    # all 4 bits loses ~6.3 BLEU; the damaged layer at 8 bits ~1.8; and the embeddings too ~0.8
    config = NbitConfig(bits=4, fallback_share=0.01, max_bleu_loss=1.0, max_composite_loss=1.0)
    result = NbitQuantizer(config).quantize(fp32, fake.context())
    details = result.details
    assert details["initial"]["within_budget"] is False and details["within_budget"] is True
    assert [(f["layer"], f["from"], f["to"]) for f in details["fallbacks"]] == [(DAMAGED, 4, 8), ("embeddings", 4, 8)]
    assert [r["within_budget"] for r in details["rounds"]] == [False, True]
    assert details["evaluations"] == fake.calls == 3
    assert details["fallbacks"][1]["scores_after"] == details["scores_final"]
    assert within_budget(fake.evaluate(result.model), REFERENCE, max_bleu_loss=1.0, max_composite_loss=1.0)[0]
    bits = _bits(result.model)
    assert bits[DAMAGED] == 8 and bits["src_embed"] == 8
    assert sum(b == 4 for b in bits.values()) == len(bits) - 3  # the table (src_embed, output_proj) and DAMAGED
    assert result.scheme == "nbit-int4-mixed"
    assert details["sensitivity"]["table"][DAMAGED]["4"] > 0
    # a looser budget stops after the first round
    fake = Fake(fp32)
    loose = NbitQuantizer(attrs.evolve(config, max_bleu_loss=2.0)).quantize(fp32, fake.context())
    assert [f["layer"] for f in loose.details["fallbacks"]] == [DAMAGED] and fake.calls == 2


def test_fallback_moves_a_share_per_round_and_gives_up_after_max_rounds() -> None:
    fp32 = _model(damaged=True)
    fake = Fake(fp32)
    config = NbitConfig(bits=4, fallback_share=0.1, max_rounds=2, max_bleu_loss=0.0, max_composite_loss=0.0)
    result = NbitQuantizer(config).quantize(fp32, fake.context())
    rounds = result.details["rounds"]
    assert len(rounds) == 2 and fake.calls == 3 and result.details["within_budget"] is False
    assert all(len(r["layers"]) == 4 for r in rounds)  # ceil(10% of 33 layers)
    table = result.details["sensitivity"]["table"]
    first = sorted(table, key=lambda n: table[n]["4"], reverse=True)[:4]
    assert rounds[0]["layers"] == first
    # every move is one step up, most sensitive first within a round
    for move in result.details["fallbacks"]:
        assert (move["from"], move["to"]) in ((4, 8), (8, 16), (16, "fp32"))
    values = [m["sensitivity"] for m in result.details["fallbacks"][:4]]
    assert values == sorted(values, reverse=True)


def test_fallback_can_bring_everything_back_to_fp32() -> None:
    fp32 = _model(n_encoder_layers=1, n_decoder_layers=1)
    fake = Fake(fp32, penalty=5.0)
    config = NbitConfig(bits=8, fallback_share=1.0, max_rounds=6)
    result = NbitQuantizer(config).quantize(fp32, fake.context())
    # 8 -> 16 -> fp32 for every layer, then nothing is left to raise: two rounds
    assert len(result.details["rounds"]) == 2 and _bits(result.model) == {} and fake.calls == 3
    assert result.details["within_budget"] is False
    assert result.details["levels"] == {"fp32": len(layer_infos(fp32))}


def test_reject_mode_returns_the_quantized_model_as_it_is() -> None:
    fp32 = _model(damaged=True)
    fake = Fake(fp32)
    result = NbitQuantizer(NbitConfig(bits=4, fallback="reject")).quantize(fp32, fake.context())
    assert fake.calls == 0 and result.details["fallbacks"] == [] and "sensitivity" not in result.details
    assert set(_bits(result.model).values()) == {4} and result.scheme == "nbit-int4"
    ok, losses = within_budget(fake.evaluate(result.model), REFERENCE, max_bleu_loss=1.0, max_composite_loss=0.02)
    assert not ok and losses["bleu"] > 5  # the run packages it as model-<name>-rejected


def test_a_model_within_budget_needs_no_sensitivity() -> None:
    fp32 = _model()
    fake = Fake(fp32)
    result = NbitQuantizer(NbitConfig(bits=8)).quantize(fp32, fake.context())
    assert result.details["within_budget"] is True and result.details["rounds"] == []
    assert fake.calls == 1 and "sensitivity" not in result.details and result.scheme == "nbit-int8"


# -- progressive ---------------------------------------------------------------------------------


def test_progressive_keeps_the_last_stage_within_budget() -> None:
    fp32 = _model(damaged=True)
    fake = Fake(fp32)
    # losses: 16 bits ~0, 8 bits ~0.07, 4 bits ~6.3 BLEU
    result = ProgressiveQuantizer(ProgressiveConfig(max_bleu_loss=1.0, max_composite_loss=1.0)).quantize(
        fp32, fake.context()
    )
    stages = result.details["stages"]
    assert [(s["bits"], s["verdict"]) for s in stages] == [
        (16, "within budget"),
        (8, "within budget"),
        (4, "over budget"),
    ]
    assert stages[0]["bytes"] > stages[1]["bytes"] > stages[2]["bytes"]
    assert result.details["kept_stage"] == 8 and result.scheme == "progressive-int8"
    assert set(_bits(result.model).values()) == {8} and fake.calls == 3
    assert result.details["bytes"] == stages[1]["bytes"]


def test_progressive_stops_at_the_first_stage_over_budget() -> None:
    fp32 = _model(damaged=True)
    fake = Fake(fp32)
    config = ProgressiveConfig(stages=[8, 4], max_bleu_loss=0.01, max_composite_loss=1.0)
    result = ProgressiveQuantizer(config).quantize(fp32, fake.context())
    assert [(s["bits"], s["verdict"]) for s in result.details["stages"]] == [(8, "over budget"), (4, "not tried")]
    assert result.details["within_budget"] is False and result.details["kept_stage"] is None
    assert set(_bits(result.model).values()) == {8} and fake.calls == 1


def test_progressive_with_fallback_at_the_final_stage() -> None:
    fp32 = _model(damaged=True)
    fake = Fake(fp32)
    config = ProgressiveConfig(
        stages=[8, 4], fallback="per-layer", fallback_share=0.01, max_bleu_loss=1.0, max_composite_loss=1.0
    )
    result = ProgressiveQuantizer(config).quantize(fp32, fake.context())
    final = result.details["stages"][-1]
    assert final["verdict"] == "within budget after per-layer fallback"
    assert [f["layer"] for f in final["fallbacks"]] == [DAMAGED, "embeddings"]
    assert result.details["kept_stage"] == 4 and result.scheme == "progressive-int4-mixed"
    bits = _bits(result.model)
    assert bits[DAMAGED] == 8 and sorted(set(bits.values())) == [4, 8]


# -- target ratio ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [0.22, 0.3, 0.4, 0.5])
def test_target_ratio_is_reached_within_five_percent(ratio: float) -> None:
    fp32 = _model(damaged=True)
    fp32_bytes = model_nbytes(fp32)
    config = TargetRatioConfig(ratio=ratio, calibration_batches=1)
    result = TargetRatioQuantizer(config).quantize(fp32, Fake(fp32).context())
    achieved = model_nbytes(result.model) / fp32_bytes
    assert result.details["achieved_ratio"] == pytest.approx(achieved, abs=1e-4)
    assert 0.95 * ratio <= achieved <= ratio
    layers = result.details["layers"]
    assert len(layers) == len(result.details["sensitivity"]["table"]) == 33
    assert {v["bits"] for v in layers.values()} <= {4, 8, 16}
    assert layers[DAMAGED]["bits"] >= 8  # the damaged layer is the last one lowered to 4 bits


def test_target_ratio_with_fp32_allowed_and_groups() -> None:
    fp32 = _model()
    config = TargetRatioConfig(ratio=0.7, bits=[4, 8, 16, 32], group_size=16, calibration_batches=1)
    result = TargetRatioQuantizer(config).quantize(fp32, Fake(fp32).context())
    achieved = model_nbytes(result.model) / model_nbytes(fp32)
    assert 0.95 * 0.7 <= achieved <= 0.7
    assert any(v["bits"] == "fp32" for v in result.details["layers"].values())


def test_an_unreachable_ratio_is_a_one_line_error() -> None:
    fp32 = _model()
    infos = layer_infos(fp32)
    lowest = Sizer(fp32, infos, 0).ratio({n: 4 for n in infos})  # ~0.156 with per-row scales
    fake = Fake(fp32)
    with pytest.raises(ModelError) as info:
        TargetRatioQuantizer(TargetRatioConfig(ratio=0.15)).quantize(fp32, fake.context())
    message = str(info.value)
    assert "\n" not in message and "ratio 0.15 cannot be reached" in message and f"{lowest:.4f}" in message
    # without the embeddings the floor is higher
    with pytest.raises(ModelError, match="every layer but the embeddings gives"):
        TargetRatioQuantizer(TargetRatioConfig(ratio=0.25, embeddings=False)).quantize(fp32, fake.context())
    assert fake.calls == 0


def test_choose_bits_trades_sensitivity_per_byte() -> None:
    sizes = {"a": 100, "b": 100, "c": 400}
    sens = {("a", 4): 1.0, ("a", 8): 0.1, ("b", 4): 0.01, ("b", 8): 0.001, ("c", 4): 0.5, ("c", 8): 0.05}

    def layer_bytes(name: str, bits: int) -> int:
        return sizes[name] * bits // 8

    def sensitivity(name: str, bits: int) -> float:
        return sens.get((name, bits), 0.0)

    # from all 16 bits (1200 bytes) down to 700: b 16->8 (least per byte), then c 16->8
    plan = choose_bits(list(sizes), [4, 8, 16], layer_bytes, sensitivity, budget=700, fixed=0)
    assert plan == {"a": 16, "b": 8, "c": 8}
    # with 100 bytes more the raise that fits (b back to 16) is made afterwards
    assert choose_bits(list(sizes), [4, 8, 16], layer_bytes, sensitivity, budget=800, fixed=0) == {
        "a": 16,
        "b": 16,
        "c": 8,
    }
    # fixed bytes count against the budget
    assert choose_bits(list(sizes), [4, 8, 16], layer_bytes, sensitivity, budget=800, fixed=100) == plan
