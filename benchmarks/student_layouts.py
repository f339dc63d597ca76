"""Student layouts at one parameter budget: decoding speed, side by side.

    .venv/bin/python benchmarks/student_layouts.py [--sentences 40] [--rounds 3]

Each layout is ``student-cpu`` (d_model 160, 4 heads) with its layers moved between encoder and
decoder and its feed-forward width chosen so that the student stays within 3.4M parameters. A
translation pays for the encoder once per sentence and for every decoder layer once per output
token, so a deep encoder with a shallow decoder decodes faster at the same size. This measures how
much faster: greedy decoding of test verses of the embedded corpus, 32 tokens a sentence, at batch
1 (a sentence at a time, as a user translates) and batch 32, in fp32, the arms alternating round by
round (best of ``--rounds`` each: a shared machine's speed drifts within minutes). Quality is the
recipes' business: see docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import platform
from typing import Any

import torch

#: (name, encoder layers, decoder layers, feed-forward width): each within 3.4M parameters
LAYOUTS = (
    ("3+3 (student-cpu)", 3, 3, 768),
    ("6+2", 6, 2, 544),
    ("8+1", 8, 1, 480),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=40, help="test verses decoded at batch 1 (8x at batch 32)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from cvmkd_corpus_bible.bible import bible_splits
    from cvmkd_nmt.model.decoding import timed_decode
    from cvmkd_nmt.model.package import load_package
    from cvmkd_nmt.model.presets import count_parameters, preset
    from cvmkd_nmt.model.transformer import CvmTransformer
    from cvmkd_nmt.model.translate import source_batches
    from cvmkd_teacher_bible import PACKAGE

    _, tokenizer, _ = load_package(PACKAGE)  # the students speak the shipped teacher's vocabulary
    sources = [pair[0] for pair in bible_splits("fr-en", 1000, 1000)[2]]
    models: dict[str, Any] = {}
    for name, enc, dec, ff in LAYOUTS:
        torch.manual_seed(0)
        config = preset(
            "student-cpu",
            vocab_size=tokenizer.vocab_size,
            n_encoder_layers=enc,
            n_decoder_layers=dec,
            d_ff=ff,
        )
        models[name] = CvmTransformer(config).eval()

    def tokens_per_second(model: Any, size: int) -> float:
        count = args.sentences if size == 1 else args.sentences * 8
        data = source_batches(tokenizer, sources[:count], 256, size)
        seconds = sum(timed_decode(model, batch, 32) for batch in data)
        return sum(batch.size(0) for batch in data) * 32 / seconds

    results: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "layouts": {},
    }
    for size in (1, 32):
        best = {name: 0.0 for name in models}
        for model in models.values():
            tokens_per_second(model, size)  # warm-up
        for _ in range(args.rounds):
            for name, model in models.items():
                best[name] = max(best[name], tokens_per_second(model, size))
        base = best[LAYOUTS[0][0]]
        for name, enc, dec, ff in LAYOUTS:
            row = results["layouts"].setdefault(
                name,
                {"encoder": enc, "decoder": dec, "d_ff": ff, "parameters": count_parameters(models[name])},
            )
            row[f"batch {size} tokens/s"] = round(best[name], 1)
            row[f"batch {size} speed vs 3+3"] = round(best[name] / base, 2)
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"\n## Student layouts, greedy fp32 decoding, {results['machine']['threads']} threads\n")
    print("| layout | parameters | batch 1 tokens/s | vs 3+3 | batch 32 tokens/s | vs 3+3 |")
    print("|---|---|---|---|---|---|")
    for name, row in results["layouts"].items():
        print(
            f"| {name} | {row['parameters']:,} | {row['batch 1 tokens/s']} | {row['batch 1 speed vs 3+3']}x "
            f"| {row['batch 32 tokens/s']} | {row['batch 32 speed vs 3+3']}x |"
        )


if __name__ == "__main__":
    main()
