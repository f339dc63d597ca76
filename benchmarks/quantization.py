"""Quantization benchmark: the fp32 student against each quantization scheme, side by side.

    .venv/bin/python benchmarks/quantization.py runs/default            # a finished run
    .venv/bin/python benchmarks/quantization.py runs/quick --test 300 --repeats 3

For every scheme it prints, against the fp32 student of the run: the size ratio of the model
file, the parameter-memory ratio, the translation-throughput ratio at batch 32 and at batch 1
(decoding exactly 32 tokens per sentence, so that output length does not matter; each scheme is
timed in turn with the fp32 model, ``--repeats`` times, and the median ratio of the paired
timings is reported, so both see the same machine load), and the
BLEU and composite deltas on the run's test split (the metrics and composite weights of the
run's recipe). The QAT student of the run (``model-qat-int8/``) is included when present;
torchao's int8 (``Int8DynamicActivationInt8WeightConfig``) when torchao is importable; and the
quantizer components static-int8, progressive and target-ratio, run as a recipe would run them,
with calibration, budget and sensitivity on ``--valid`` validation sentences.

Targets it checks (issue: quantization backends): int8 file ≤ 30% of fp32, ≥ 1.5× fp32 tokens/s,
BLEU loss ≤ 0.5; int4 weight-only file ≤ 18% of fp32; target-ratio within 5% of the ratio asked.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cvmkd_core.session import open_session
from cvmkd_core.state import RunState
from cvmkd_kd.quantize import measure_speed
from cvmkd_nmt.model.package import WEIGHTS, load_package, save_package
from cvmkd_nmt.model.translate import source_batches, translate
from cvmkd_nmt.quantized import LayerChoice, apply_plan, model_nbytes, quantizable_layers
from cvmkd_validation.validation import score_all


def plan_all(model: Any, choice: LayerChoice) -> Any:
    apply_plan(model, {name: choice for name in quantizable_layers(model)})
    return model


def schemes(run_dir: Path) -> dict[str, Callable[[Any], Any]]:
    found: dict[str, Callable[[Any], Any]] = {
        "fp16 weight-only": lambda m: plan_all(m, LayerChoice("nbit", bits=16)),
        "dynamic int8 (torch.ao)": lambda m: plan_all(m, LayerChoice("dynamic-int8")),
        "int8 weight-only": lambda m: plan_all(m, LayerChoice("nbit", bits=8)),
        "int4 weight-only, per channel": lambda m: plan_all(m, LayerChoice("nbit", bits=4)),
        "int4 weight-only, group 32": lambda m: plan_all(m, LayerChoice("nbit", bits=4, group_size=32)),
    }
    if (run_dir / "model-qat-int8").is_dir():
        found["QAT int8 (this run)"] = lambda m: load_package(run_dir / "model-qat-int8")[0]
    try:
        import torchao.quantization as tq  # noqa: F401

        def torchao_int8(model: Any) -> Any:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            quantize_(model, Int8DynamicActivationInt8WeightConfig())
            return model

        found["dynamic int8 (torchao)"] = torchao_int8
    except Exception:
        pass
    return found


#: quantizer components run as a recipe's [[quantize]] would run them: (label, name, options)
COMPONENTS = [
    ("static int8 (torch.ao, calibrated)", "static-int8", {}),
    ("progressive 16→8→4", "progressive", {}),
    ("target ratio 0.20", "target-ratio", {"ratio": 0.20}),
    ("target ratio 0.15", "target-ratio", {"ratio": 0.15}),
]


def component_schemes(
    registry: Any, state: RunState, valid: list[tuple[str, str]], tokenizer: Any, seed: int, max_len: int
) -> dict[str, Callable[[Any], Any]]:
    """Quantizer components with a QuantizationContext on ``valid``, as the orchestrator builds
    it (cvmkd_kd.quantize): the budget, calibration and sensitivity all see these sentences."""
    from cvmkd_nmt.contracts import QuantizationContext

    sources, references = [p[0] for p in valid], [p[1] for p in valid]

    def evaluate(model: Any) -> dict[str, float]:
        return score_all(
            state, translate(model, tokenizer, sources, device="cpu", precision="fp32"), references, sources
        )

    def calibration_batches(count: int) -> list[torch.Tensor]:
        return source_batches(tokenizer, sources, max_len, 32, count)

    reference: dict[str, dict[str, float]] = {}

    def make(name: str, options: dict[str, Any]) -> Callable[[Any], Any]:
        def run(model: Any) -> Any:
            if "scores" not in reference:
                reference["scores"] = evaluate(model)
            component = registry.get("quantizer", name)
            quantizer = component.factory(component.make_config(options))
            context = QuantizationContext(
                tokenizer=tokenizer,
                sources=sources,
                references=references,
                evaluate=evaluate,
                reference_scores=reference["scores"],
                calibration_batches=calibration_batches,
                seed=seed,
            )
            result = quantizer.quantize(model, context)
            summary = {
                k: v
                for k, v in result.details.items()
                if k in ("bits", "kept_stage", "ratio", "target_ratio", "achieved_ratio", "within_budget", "levels")
            }
            print(f"# {name} {options}: {json.dumps(summary, default=str)}", flush=True)
            return result.model

        return run

    found: dict[str, Callable[[Any], Any]] = {}
    for label, name, options in COMPONENTS:
        try:
            registry.get("quantizer", name)
        except Exception:
            continue  # its plugin is not installed
        found[label] = make(name, options)
    return found


def file_bytes(model: Any, tokenizer: Any) -> int | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            save_package(Path(tmp) / "m", model, tokenizer, {})
        except Exception:
            return None  # a model cvmkd cannot package (torchao's tensor subclasses)
        return (Path(tmp) / "m" / WEIGHTS).stat().st_size


def measure(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (``argv``: this script's command line); returns the fp32 baseline and a
    row per scheme, printing each row as it is measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--test", type=int, default=0, help="score only the first N test sentences (0: all)")
    parser.add_argument("--speed-sentences", type=int, default=128)
    parser.add_argument("--latency-sentences", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", default="", help="run only the schemes whose name contains this text")
    parser.add_argument(
        "--valid",
        type=int,
        default=300,
        help="validation sentences the quantizer components calibrate and judge the budget on",
    )
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    session = open_session(args.run_dir / "recipe.toml")
    recipe = session.recipe
    registry = session.plugins.registry
    components = {}
    for path, ref in recipe.component_refs():
        if path.startswith("validation.metrics["):
            component = registry.get(ref.kind, ref.name)
            components[path] = component.factory(ref.config) if component.config is not None else component.factory()
    state = RunState(
        recipe=recipe, pm=session.plugins.pm, registry=registry, run_dir=args.run_dir, components=components
    )
    corpus_ref = recipe.corpus
    corpus = registry.get("corpus", corpus_ref.name).factory(corpus_ref.config)
    test = corpus.load().test
    if args.test:
        test = test[: args.test]
    sources, references = [p[0] for p in test], [p[1] for p in test]
    fp32, tokenizer, _ = load_package(args.run_dir / "model")
    fp32 = fp32.float().eval()
    base_file = (args.run_dir / "model" / WEIGHTS).stat().st_size
    base_memory = model_nbytes(fp32)
    base_scores = score_all(
        state, translate(fp32, tokenizer, sources, device="cpu", precision="fp32"), references, sources
    )
    speed = sources[: args.speed_sentences]
    latency = sources[: args.latency_sentences]
    print(
        f"# {args.run_dir}: fp32 student, {sum(p.numel() for p in fp32.parameters()):,} parameters, "
        f"file {base_file / 1e6:.2f} MB; test BLEU {base_scores['bleu']:.2f}, composite {base_scores.get('composite', float('nan')):.2f} "
        f"({len(sources)} sentences); torch {torch.__version__}, {torch.get_num_threads()} threads",
        flush=True,
    )
    rows = []
    all_schemes = schemes(args.run_dir)
    all_schemes.update(
        component_schemes(
            registry, state, corpus.load().valid[: args.valid], tokenizer, recipe.run.seed, fp32.config.max_len
        )
    )
    for name, make in all_schemes.items():
        if args.only and args.only not in name:
            continue
        try:
            model = make(copy.deepcopy(fp32)).eval()
        except Exception as exc:
            print(f"{name}: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        ratios: dict[str, list[float]] = {"32": [], "1": []}
        for _ in range(args.repeats):
            for batch, texts in (("32", speed), ("1", latency)):
                base = measure_speed(fp32, tokenizer, texts, batch_size=int(batch))
                this = measure_speed(model, tokenizer, texts, batch_size=int(batch))
                ratios[batch].append(this["tokens_per_second"] / base["tokens_per_second"])
        scores = score_all(
            state, translate(model, tokenizer, sources, device="cpu", precision="fp32"), references, sources
        )
        size = file_bytes(model, tokenizer)
        row = {
            "scheme": name,
            "file_ratio": round(size / base_file, 3) if size else None,
            "memory_ratio": round(model_nbytes(model) / base_memory, 3),
            "tokens_per_s_ratio_batch32": round(statistics.median(ratios["32"]), 2),
            "tokens_per_s_ratio_batch1": round(statistics.median(ratios["1"]), 2),
            "bleu_delta": round(scores["bleu"] - base_scores["bleu"], 2),
            "composite_delta": round(
                scores.get("composite", float("nan")) - base_scores.get("composite", float("nan")), 2
            ),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {
        "run": str(args.run_dir),
        "test_sentences": len(sources),
        "fp32": {"file_bytes": base_file, "bleu": base_scores["bleu"], "composite": base_scores.get("composite")},
        "schemes": rows,
    }


def print_table(rows: list[dict[str, Any]]) -> None:
    print()
    print(
        "| scheme | file / fp32 | memory / fp32 | tokens/s ×, batch 32 | tokens/s ×, batch 1 | Δ BLEU | Δ composite |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        file_ratio = f"{100 * r['file_ratio']:.1f}%" if r["file_ratio"] else "n/a"
        print(
            f"| {r['scheme']} | {file_ratio} | {100 * r['memory_ratio']:.1f}% | {r['tokens_per_s_ratio_batch32']:.2f} | "
            f"{r['tokens_per_s_ratio_batch1']:.2f} | {r['bleu_delta']:+.2f} | {r['composite_delta']:+.2f} |"
        )


def main(argv: list[str] | None = None) -> int:
    print_table(measure(argv)["schemes"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
