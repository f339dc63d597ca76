"""CTranslate2 benchmark: a run's student exported to CTranslate2 (float32, int8) against cvmkd's
own fp32 decoding, side by side in one run.

    .venv/bin/python benchmarks/export_ctranslate2.py runs/default
    .venv/bin/python benchmarks/export_ctranslate2.py runs/default --test 300 --repeats 3

For each export it prints: the test BLEU and chrF of its greedy translations of the run's test
split next to cvmkd's (the difference is what the export changes), the file size against the
package's, and the decoding throughput ratio against cvmkd fp32 at batch 32 and at batch 1. Every
sentence decodes exactly 32 tokens in the throughput runs (end of sentence ignored: CTranslate2's
``min_decoding_length`` and ``max_decoding_length``, cvmkd's ``timed_decode``), so output length
does not count; cvmkd and the export are timed in turn, ``--repeats`` times, and the median of the
paired ratios is reported, so both see the same machine load. Both use the same number of threads.

Targets (issue: bring your own teacher / CTranslate2): BLEU within 0.3 of cvmkd's own decoding
for float32 and int8; the published benchmark has CTranslate2 at about 3× a PyTorch runtime.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import sacrebleu
import torch

from cvmkd_core.session import open_session
from cvmkd_ctranslate2 import CTranslate2Config, CTranslate2Exporter
from cvmkd_ctranslate2.translate import CTranslate2Translator
from cvmkd_kd.quantize import measure_speed
from cvmkd_nmt.model.package import WEIGHTS, load_package
from cvmkd_nmt.model.translate import translate

STEPS = 32


def ct2_speed(runtime: CTranslate2Translator, sources: list[str], batch_size: int) -> float:
    """Tokens per second decoding exactly STEPS tokens for each source, in batches."""
    tokenizer = runtime.tokenizer
    pieces = [[tokenizer.id_to_piece(i) for i in ids] for ids in tokenizer.encode(sources)]
    batches = [pieces[i : i + batch_size] for i in range(0, len(pieces), batch_size)]

    def run(batch: list[list[str]]) -> None:
        runtime.translator.translate_batch(
            batch, beam_size=1, max_batch_size=batch_size, min_decoding_length=STEPS, max_decoding_length=STEPS
        )

    run(batches[0])  # warm-up
    started = time.perf_counter()
    for batch in batches:
        run(batch)
    return len(sources) * STEPS / (time.perf_counter() - started)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name == "model.bin")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--test", type=int, default=0, help="score only the first N test sentences (0: all)")
    parser.add_argument("--speed-sentences", type=int, default=128)
    parser.add_argument("--latency-sentences", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)

    session = open_session(args.run_dir / "recipe.toml")
    recipe, registry = session.recipe, session.plugins.registry
    corpus = registry.get("corpus", recipe.corpus.name).factory(recipe.corpus.config)
    test = corpus.load().test
    if args.test:
        test = test[: args.test]
    sources, references = [p[0] for p in test], [p[1] for p in test]
    package = args.run_dir / "model"
    fp32, tokenizer, _ = load_package(package)
    fp32 = fp32.float().eval()
    threads = torch.get_num_threads()

    def scores(hypotheses: list[str]) -> tuple[float, float]:
        return (
            sacrebleu.corpus_bleu(hypotheses, [references]).score,
            sacrebleu.corpus_chrf(hypotheses, [references]).score,
        )

    ours = translate(fp32, tokenizer, sources, device="cpu", precision="fp32")
    base_bleu, base_chrf = scores(ours)
    print(
        f"# {args.run_dir}: fp32 student, {sum(p.numel() for p in fp32.parameters()):,} parameters; "
        f"cvmkd greedy test BLEU {base_bleu:.2f}, chrF {base_chrf:.2f} ({len(sources)} sentences); "
        f"torch {torch.__version__}, {threads} threads",
        flush=True,
    )
    speed, latency = sources[: args.speed_sentences], sources[: args.latency_sentences]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for quantization in ("float32", "int8"):
            out = Path(tmp) / quantization
            CTranslate2Exporter(CTranslate2Config(quantization=quantization)).export(package, out)
            runtime = CTranslate2Translator(out, intra_threads=threads)
            bleu, chrf = scores(runtime.translate(sources, batch_size=32))
            ratios: dict[str, list[float]] = {"32": [], "1": []}
            absolute: dict[str, list[float]] = {"32": [], "1": []}
            for _ in range(args.repeats):
                for batch, texts in (("32", speed), ("1", latency)):
                    base = measure_speed(fp32, tokenizer, texts, batch_size=int(batch), steps=STEPS)[
                        "tokens_per_second"
                    ]
                    this = ct2_speed(runtime, texts, int(batch))
                    ratios[batch].append(this / base)
                    absolute[batch].append(this)
            row = {
                "export": f"CTranslate2 {quantization}",
                "bleu": round(bleu, 2),
                "delta_bleu": round(bleu - base_bleu, 2),
                "chrf": round(chrf, 2),
                "delta_chrf": round(chrf - base_chrf, 2),
                "file_ratio": round(folder_bytes(out) / (package / WEIGHTS).stat().st_size, 3),
                "speed_ratio_batch32": round(statistics.median(ratios["32"]), 2),
                "speed_ratio_batch1": round(statistics.median(ratios["1"]), 2),
                "tokens_per_second_batch32": round(statistics.median(absolute["32"]), 1),
                "tokens_per_second_batch1": round(statistics.median(absolute["1"]), 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print(
        "| export | test BLEU (Δ vs cvmkd) | chrF (Δ) | file / package | tokens/s ×, batch 32 | tokens/s ×, batch 1 |"
    )
    print("|---|---|---|---|---|---|")
    print(f"| cvmkd fp32 (PyTorch) | {base_bleu:.2f} | {base_chrf:.2f} | 100% | 1.00 | 1.00 |")
    for r in rows:
        print(
            f"| {r['export']} | {r['bleu']:.2f} ({r['delta_bleu']:+.2f}) | {r['chrf']:.2f} ({r['delta_chrf']:+.2f}) "
            f"| {100 * r['file_ratio']:.1f}% | {r['speed_ratio_batch32']:.2f} | {r['speed_ratio_batch1']:.2f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"cvmkd": {"bleu": base_bleu, "chrf": base_chrf}, "exports": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
