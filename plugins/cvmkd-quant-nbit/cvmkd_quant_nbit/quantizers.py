"""The ``nbit``, ``progressive`` and ``target-ratio`` quantizers and their recipe settings."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import attrs
from torch import nn

from cvmkd_core.config import ConfigValueError, between, ge, one_of
from cvmkd_core.errors import ModelError
from cvmkd_nmt.contracts import QuantizationContext, QuantizationResult, within_budget
from cvmkd_nmt.quantized import model_nbytes
from cvmkd_quant_nbit.plans import (
    FP32,
    LayerInfo,
    Sizer,
    build,
    describe_plan,
    layer_infos,
    level_counts,
    level_name,
    next_level,
    ungroupable,
)
from cvmkd_quant_nbit.sensitivity import Sensitivity

log = logging.getLogger("cvmkd")

_HALVES = ("float16", "bfloat16")


# -- settings -----------------------------------------------------------------------------------


def _share(_instance: Any, _attribute: Any, value: Any) -> None:
    if value is not None and not 0.0 < value <= 1.0:
        raise ConfigValueError(f"must be in (0, 1], got {value!r}")


def _stages(_instance: Any, _attribute: Any, value: Any) -> None:
    if value is None:
        return
    if not value:
        raise ConfigValueError("must list at least one bit width")
    bad = [v for v in value if v not in (4, 8, 16)]
    if bad:
        raise ConfigValueError(f"bit widths must be 4, 8 or 16, got {bad[0]!r}")
    if any(a <= b for a, b in zip(value, value[1:])):
        raise ConfigValueError(f"must go down in precision (for example [16, 8, 4]), got {value!r}")


def _candidate_bits(_instance: Any, _attribute: Any, value: Any) -> None:
    if value is None:
        return
    if not value:
        raise ConfigValueError("must list at least one bit width")
    bad = [v for v in value if v not in (4, 8, 16, 32)]
    if bad:
        raise ConfigValueError(f"bit widths must be 4, 8, 16 or 32 (float32), got {bad[0]!r}")


def _no_group_at_16(config: Any, bits: list[int]) -> None:
    if config.group_size and not any(b in (4, 8) for b in bits):
        raise ValueError("group_size applies to 4 and 8 bits only; 16-bit weights have no scales")


@attrs.frozen
class NbitConfig:
    """``{name = "nbit", bits = 4, group_size = 32, fallback = "per-layer"}``."""

    bits: int = attrs.field(default=4, validator=one_of(4, 8, 16))
    """weight bits of every quantized layer: 4, 8 or 16 (16 = a float16/bfloat16 copy)"""
    group_size: int = attrs.field(default=0, validator=ge(0))
    """4 and 8 bits: one scale per this many input columns (0: one per output row); a layer
    whose width it does not divide gets one scale per row (listed in details)"""
    half: str = attrs.field(default="float16", validator=one_of(*_HALVES))
    """storage type of 16-bit weights"""
    embeddings: bool = True
    """quantize the embedding table (and a tied output projection) too"""
    fallback: str = attrs.field(default="per-layer", validator=one_of("per-layer", "reject"))
    """over the quality budget: raise the precision of the most sensitive layers ("per-layer"),
    or leave the model for the run to reject ("reject")"""
    fallback_share: float = attrs.field(default=0.1, validator=_share)
    """share of the quantized layers raised one step per fallback round"""
    max_rounds: int = attrs.field(default=6, validator=ge(1))
    """at most this many fallback rounds (each one full evaluation on the validation split)"""
    calibration_batches: int = attrs.field(default=2, validator=ge(1))
    """batches of 32 validation sources used to measure layer sensitivity"""
    max_bleu_loss: float = attrs.field(default=1.0, validator=ge(0))
    max_composite_loss: float = attrs.field(default=0.02, validator=between(0.0, 1.0))

    def __attrs_post_init__(self) -> None:
        _no_group_at_16(self, [self.bits])


@attrs.frozen
class ProgressiveConfig:
    """``{name = "progressive", stages = [16, 8, 4]}``."""

    stages: list[int] = attrs.field(factory=lambda: [16, 8, 4], validator=_stages)
    """bit widths tried in turn, each kept only while the model stays within the budget"""
    group_size: int = attrs.field(default=0, validator=ge(0))
    half: str = attrs.field(default="float16", validator=one_of(*_HALVES))
    embeddings: bool = True
    fallback: str = attrs.field(default="none", validator=one_of("none", "per-layer"))
    """at the first stage over the budget: stop there ("none"), or try the per-layer fallback
    on it and keep it if that brings it within the budget ("per-layer")"""
    fallback_share: float = attrs.field(default=0.1, validator=_share)
    max_rounds: int = attrs.field(default=6, validator=ge(1))
    calibration_batches: int = attrs.field(default=2, validator=ge(1))
    max_bleu_loss: float = attrs.field(default=1.0, validator=ge(0))
    max_composite_loss: float = attrs.field(default=0.02, validator=between(0.0, 1.0))

    def __attrs_post_init__(self) -> None:
        _no_group_at_16(self, list(self.stages))


@attrs.frozen
class TargetRatioConfig:
    """``{name = "target-ratio", ratio = 0.25, bits = [4, 8, 16]}``."""

    ratio: float = attrs.field(default=0.25, validator=_share)
    """target bytes of the quantized model's tensors relative to the fp32 model's"""
    bits: list[int] = attrs.field(factory=lambda: [4, 8, 16], validator=_candidate_bits)
    """bit widths a layer may get (32: the layer may stay float32)"""
    group_size: int = attrs.field(default=0, validator=ge(0))
    half: str = attrs.field(default="float16", validator=one_of(*_HALVES))
    embeddings: bool = True
    calibration_batches: int = attrs.field(default=2, validator=ge(1))
    max_bleu_loss: float = attrs.field(default=1.0, validator=ge(0))
    max_composite_loss: float = attrs.field(default=0.02, validator=between(0.0, 1.0))

    def __attrs_post_init__(self) -> None:
        _no_group_at_16(self, list(self.bits))


# -- shared pieces --------------------------------------------------------------------------------


def _selected(infos: dict[str, LayerInfo], embeddings: bool) -> list[str]:
    return [n for n, info in infos.items() if embeddings or not info.embedding]


def _round_scores(scores: dict[str, float]) -> dict[str, float]:
    return {k: round(float(v), 4) for k, v in scores.items()}


def _group_note(infos: dict[str, LayerInfo], names: list[str], group_size: int) -> list[str]:
    skipped = ungroupable(infos, names, group_size)
    if skipped:
        log.warning(
            "group_size %d does not divide the width of %d layer(s) (%s%s): one scale per row there",
            group_size,
            len(skipped),
            ", ".join(skipped[:3]),
            ", ..." if len(skipped) > 3 else "",
        )
    return skipped


class _Run:
    """One quantizer call: the fp32 model, its layers, sizes, and lazily its sensitivities."""

    def __init__(self, model: nn.Module, context: QuantizationContext, config: Any) -> None:
        self.fp32 = model.float().cpu().eval()
        self.context = context
        self.config = config
        self.infos = layer_infos(self.fp32)
        self.sizer = Sizer(self.fp32, self.infos, config.group_size)
        self.evaluations = 0
        self._sensitivity: Sensitivity | None = None

    @property
    def sensitivity(self) -> Sensitivity:
        if self._sensitivity is None:
            began = time.perf_counter()
            batches = self.context.calibration_batches(self.config.calibration_batches)
            self._sensitivity = Sensitivity(
                self.fp32, batches, self.infos, group_size=self.config.group_size, half=self.config.half
            )
            log.info("layer sensitivity: calibration targets decoded in %.1fs", time.perf_counter() - began)
        return self._sensitivity

    def build(self, plan: dict[str, int]) -> nn.Module:
        return build(self.fp32, plan, self.infos, self.config.group_size, self.config.half)

    def evaluate(self, model: nn.Module) -> tuple[dict[str, float], bool, dict[str, float]]:
        self.evaluations += 1
        scores = self.context.evaluate(model)
        ok, losses = within_budget(
            scores,
            self.context.reference_scores,
            max_bleu_loss=self.config.max_bleu_loss,
            max_composite_loss=self.config.max_composite_loss,
        )
        return scores, ok, losses

    def size(self, model: nn.Module) -> dict[str, Any]:
        nbytes = model_nbytes(model)
        return {"bytes": nbytes, "ratio": round(nbytes / self.sizer.fp32_bytes, 4)}

    def plan_details(self, plan: dict[str, int]) -> dict[str, Any]:
        return {"levels": level_counts(plan), "layers": describe_plan(plan, self.infos, self.config.group_size)}

    def fallback(
        self, plan: dict[str, int], model: nn.Module, scores: dict[str, float], ok: bool, losses: dict[str, float]
    ) -> dict[str, Any]:
        """Raise the precision of the most sensitive layers one step (4 -> 8 -> 16 -> fp32) per
        round, ``fallback_share`` of the quantized layers at a time, evaluating after each round,
        until within the budget, every layer is fp32, or ``max_rounds`` rounds are done."""
        plan = dict(plan)
        per_round = max(1, math.ceil(self.config.fallback_share * sum(b != FP32 for b in plan.values())))
        fallbacks: list[dict[str, Any]] = []
        rounds: list[dict[str, Any]] = []
        while not ok and len(rounds) < self.config.max_rounds:
            movable = [n for n, b in plan.items() if b != FP32]
            if not movable:
                break
            sens = self.sensitivity
            ranked = sorted(movable, key=lambda n: (-sens(n, plan[n]), n))
            moved = ranked[:per_round]
            steps: list[dict[str, Any]] = []
            for name in moved:
                before = plan[name]
                plan[name] = next_level(before)
                steps.append(
                    {
                        "layer": name,
                        "from": level_name(before),
                        "to": level_name(plan[name]),
                        "sensitivity": round(sens(name, before), 8),
                    }
                )
            model = self.build(plan)
            scores, ok, losses = self.evaluate(model)
            for step in steps:
                fallbacks.append({**step, "scores_after": _round_scores(scores)})
            rounds.append(
                {
                    "round": len(rounds) + 1,
                    "layers": [s["layer"] for s in steps],
                    "scores": _round_scores(scores),
                    "losses": _round_scores(losses),
                    "within_budget": ok,
                    **self.size(model),
                }
            )
            log.info(
                "fallback round %d: %d layer(s) up one step (%s%s); %s",
                len(rounds),
                len(steps),
                ", ".join(s["layer"] for s in steps[:3]),
                ", ..." if len(steps) > 3 else "",
                "within the budget" if ok else f"still over the budget ({_round_scores(losses)})",
            )
        return {
            "plan": plan,
            "model": model,
            "scores": scores,
            "ok": ok,
            "losses": losses,
            "fallbacks": fallbacks,
            "rounds": rounds,
        }

    def sensitivity_details(self) -> dict[str, Any]:
        if self._sensitivity is None:
            return {}
        return {"sensitivity": {**self._sensitivity.summary(), "table": self._sensitivity.table()}}


def _budget(config: Any) -> dict[str, float]:
    return {"max_bleu_loss": config.max_bleu_loss, "max_composite_loss": config.max_composite_loss}


def _label(bits: int, group: int, half: str) -> str:
    if bits == 16:
        return half
    return f"int{bits}" + (f"-g{group}" if group else "")


# -- nbit -------------------------------------------------------------------------------------------


class NbitQuantizer:
    """Weight-only 4/8/16-bit layers, with per-layer fallback to higher precision over budget."""

    def __init__(self, config: NbitConfig | None = None) -> None:
        self.config = config or NbitConfig()

    def quantize(self, model: nn.Module, context: QuantizationContext) -> QuantizationResult:
        cfg = self.config
        run = _Run(model, context, cfg)
        selected = _selected(run.infos, cfg.embeddings)
        skipped = _group_note(run.infos, selected, cfg.group_size) if cfg.bits != 16 else []
        plan = {n: (cfg.bits if n in selected else FP32) for n in run.infos}
        quantized = run.build(plan)
        scheme = f"nbit-{_label(cfg.bits, cfg.group_size, cfg.half)}"
        details: dict[str, Any] = {
            "bits": cfg.bits,
            "group_size": cfg.group_size,
            "half": cfg.half,
            "embeddings": cfg.embeddings,
            "per_row_scales": skipped,
            "fallback": cfg.fallback,
            "budget": _budget(cfg),
        }
        if cfg.fallback == "reject":
            # nothing to decide: the run scores the model and rejects it when over the budget
            details.update(run.size(quantized), **run.plan_details(plan), evaluations=0, fallbacks=[])
            return QuantizationResult(model=quantized, scheme=scheme, details=details)
        scores, ok, losses = run.evaluate(quantized)
        details["scores"] = _round_scores(scores)
        details["losses"] = _round_scores(losses)
        details["initial"] = {"within_budget": ok, **run.size(quantized)}
        outcome = run.fallback(plan, quantized, scores, ok, losses)
        if outcome["fallbacks"]:
            scheme += "-mixed"
        details.update(
            within_budget=outcome["ok"],
            scores_final=_round_scores(outcome["scores"]),
            losses_final=_round_scores(outcome["losses"]),
            fallbacks=outcome["fallbacks"],
            rounds=outcome["rounds"],
            evaluations=run.evaluations,
            **run.size(outcome["model"]),
            **run.plan_details(outcome["plan"]),
            **run.sensitivity_details(),
        )
        if not outcome["ok"]:
            log.warning("nbit: still over the quality budget after %d fallback round(s)", len(outcome["rounds"]))
        return QuantizationResult(model=outcome["model"], scheme=scheme, details=details)


# -- progressive ------------------------------------------------------------------------------------


class ProgressiveQuantizer:
    """Stages of decreasing precision (16 -> 8 -> 4 bits), each kept only within the budget."""

    def __init__(self, config: ProgressiveConfig | None = None) -> None:
        self.config = config or ProgressiveConfig()

    def quantize(self, model: nn.Module, context: QuantizationContext) -> QuantizationResult:
        cfg = self.config
        run = _Run(model, context, cfg)
        selected = _selected(run.infos, cfg.embeddings)
        skipped = _group_note(run.infos, selected, cfg.group_size) if any(b in (4, 8) for b in cfg.stages) else []
        stages: list[dict[str, Any]] = []
        kept: tuple[nn.Module, dict[str, int], str] | None = None
        # when no stage is within the budget: the most precise attempt, which the run rejects
        attempt: tuple[nn.Module, dict[str, int]] | None = None
        for index, bits in enumerate(cfg.stages):
            plan = {n: (bits if n in selected else FP32) for n in run.infos}
            candidate = run.build(plan)
            scores, ok, losses = run.evaluate(candidate)
            stage = {
                "bits": bits,
                "scores": _round_scores(scores),
                "losses": _round_scores(losses),
                **run.size(candidate),
                "verdict": "within budget" if ok else "over budget",
            }
            stages.append(stage)
            label = _label(bits, cfg.group_size, cfg.half)
            log.info("progressive: stage %s %s", label, stage["verdict"])
            if ok:
                kept = (candidate, plan, label)
                continue
            attempt = (candidate, plan)
            if cfg.fallback == "per-layer":
                outcome = run.fallback(plan, candidate, scores, ok, losses)
                stage["fallbacks"] = outcome["fallbacks"]
                stage["rounds"] = outcome["rounds"]
                if outcome["ok"]:
                    stage["verdict"] = "within budget after per-layer fallback"
                    kept = (outcome["model"], outcome["plan"], f"{label}-mixed")
                else:
                    stage["verdict"] = "over budget after per-layer fallback"
                    attempt = (outcome["model"], outcome["plan"])
            for later in cfg.stages[index + 1 :]:
                stages.append({"bits": later, "verdict": "not tried"})
            break
        kept_bits: int | None = None
        if kept is not None:
            result, plan, label = kept
            kept_bits = next(s["bits"] for s in reversed(stages) if s["verdict"].startswith("within"))
        else:
            assert attempt is not None
            (result, plan), label = attempt, "over-budget"
            log.warning("progressive: no stage is within the quality budget")
        details: dict[str, Any] = {
            "stages": stages,
            "kept_stage": kept_bits,
            "within_budget": kept is not None,
            "when": "after distillation, on the distilled student (each stage quantizes the fp32 weights)",
            "group_size": cfg.group_size,
            "half": cfg.half,
            "embeddings": cfg.embeddings,
            "per_row_scales": skipped,
            "fallback": cfg.fallback,
            "budget": _budget(cfg),
            "evaluations": run.evaluations,
            **run.size(result),
            **run.plan_details(plan),
            **run.sensitivity_details(),
        }
        return QuantizationResult(model=result, scheme=f"progressive-{label}", details=details)


# -- target ratio ---------------------------------------------------------------------------------


def choose_bits(
    names: list[str],
    levels: list[int],
    layer_bytes: Callable[[str, int], int],
    sensitivity: Callable[[str, int], float],
    budget: int,
    fixed: int,
) -> dict[str, int]:
    """Per-layer bits for ``names`` whose bytes (plus ``fixed``) stay within ``budget``, with
    the least total sensitivity, greedily: every layer starts at the largest level; while over
    the budget, the one-step lowering with the least sensitivity added per byte saved is made;
    then, while bytes are left, the one-step raise with the most sensitivity removed per byte
    added that still fits is made. The caller checks that the lowest level everywhere fits."""
    levels = sorted(levels)
    plan = {n: levels[-1] for n in names}
    total = fixed + sum(layer_bytes(n, b) for n, b in plan.items())

    def step(name: str, direction: int) -> int | None:
        i = levels.index(plan[name]) + direction
        return levels[i] if 0 <= i < len(levels) else None

    while total > budget:
        best: tuple[float, str, int, int] | None = None
        for name in names:
            lower = step(name, -1)
            if lower is None:
                continue
            saved = layer_bytes(name, plan[name]) - layer_bytes(name, lower)
            if saved <= 0:
                continue
            cost = (sensitivity(name, lower) - sensitivity(name, plan[name])) / saved
            if best is None or (cost, name) < (best[0], best[1]):
                best = (cost, name, lower, saved)
        if best is None:
            break
        _, name, lower, saved = best
        plan[name] = lower
        total -= saved
    while True:
        best_up: tuple[float, str, int, int] | None = None
        for name in names:
            higher = step(name, +1)
            if higher is None:
                continue
            added = layer_bytes(name, higher) - layer_bytes(name, plan[name])
            gain = sensitivity(name, plan[name]) - sensitivity(name, higher)
            if added <= 0 or gain <= 0 or total + added > budget:
                continue
            value = gain / added
            if best_up is None or (-value, name) < (-best_up[0], best_up[1]):
                best_up = (value, name, higher, added)
        if best_up is None:
            break
        _, name, higher, added = best_up
        plan[name] = higher
        total += added
    return plan


class TargetRatioQuantizer:
    """Per-layer 4/8/16 bits chosen by sensitivity to reach a target size."""

    def __init__(self, config: TargetRatioConfig | None = None) -> None:
        self.config = config or TargetRatioConfig()

    def quantize(self, model: nn.Module, context: QuantizationContext) -> QuantizationResult:
        cfg = self.config
        run = _Run(model, context, cfg)
        levels = sorted(set(cfg.bits))
        selected = _selected(run.infos, cfg.embeddings)
        skipped = _group_note(run.infos, selected, cfg.group_size) if any(b in (4, 8) for b in levels) else []
        fixed_plan = {n: FP32 for n in run.infos if n not in selected}
        budget = cfg.ratio * run.sizer.fp32_bytes
        lowest = run.sizer.ratio({**fixed_plan, **{n: levels[0] for n in selected}})
        if lowest > cfg.ratio * (1 + 1e-9):
            where = "every quantizable layer" if cfg.embeddings else "every layer but the embeddings"
            raise ModelError(
                f"target-ratio: ratio {cfg.ratio:g} cannot be reached: {level_name(levels[0])} bits on "
                f"{where} gives {lowest:.4f} of the fp32 bytes"
            )
        sens = run.sensitivity
        for name in selected:
            for bits in levels:
                sens(name, bits)
        fixed = run.sizer.bytes(fixed_plan)
        chosen = choose_bits(selected, levels, run.sizer.layer, sens, int(budget), fixed)
        plan = {n: chosen.get(n, FP32) for n in run.infos}
        quantized = run.build(plan)
        size = run.size(quantized)
        predicted = run.sizer.bytes(plan)
        if size["bytes"] != predicted:  # the byte model and the quantized modules disagree
            log.warning("target-ratio: planned %d bytes but the model holds %d", predicted, size["bytes"])
        achieved = size["bytes"] / run.sizer.fp32_bytes
        details = {
            "ratio": cfg.ratio,
            "achieved_ratio": round(achieved, 4),
            "ratio_of": "bytes of the model's tensors (model_nbytes, the payload of model.safetensors) "
            "over the fp32 model's",
            "bytes": size["bytes"],
            "fp32_bytes": run.sizer.fp32_bytes,
            "lowest_ratio": round(lowest, 4),
            "highest_ratio": round(run.sizer.ratio({**fixed_plan, **{n: levels[-1] for n in selected}}), 4),
            "bits": levels,
            "group_size": cfg.group_size,
            "half": cfg.half,
            "embeddings": cfg.embeddings,
            "per_row_scales": skipped,
            "total_sensitivity": round(sum(sens(n, b) for n, b in plan.items()), 8),
            **run.plan_details(plan),
            **run.sensitivity_details(),
        }
        log.info(
            "target-ratio: %.4f of the fp32 bytes (asked %.4f), levels %s", achieved, cfg.ratio, level_counts(plan)
        )
        return QuantizationResult(model=quantized, scheme=f"target-ratio-{cfg.ratio:g}", details=details)
