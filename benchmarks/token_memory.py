"""The encoded training pairs in memory: Python lists against ``TokenRows``, side by side.

    .venv/bin/python benchmarks/token_memory.py [--pairs 1000000] [--json]

The French-English pairs of the embedded corpus, repeated to ``--pairs``, are encoded with the
shipped teacher's tokenizer by each arm in a process of its own: ``lists`` as cvmkd held them
before (one Python list of ints per sentence), ``flat`` as ``cvmkd_kd.data.prepare_data`` holds
them now (``TokenRows``, encoded 50,000 sentences at a time). Each arm reports how much its
resident memory grew while it encoded (peak, and what stayed), the seconds it took, and the
seconds of 2,000 training batches of 32 drawn from what it built (the batches of both arms are
checked equal). The texts themselves are read before measuring and are the same in both arms.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from itertools import islice
from typing import Any


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (``VmRSS``, ``VmHWM``), in MB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
        refs.write("5")  # resets VmHWM to the current RSS


def arm(kind: str, pairs: int) -> dict[str, Any]:
    import hashlib

    import torch

    from cvmkd_corpus_bible.bible import load_bible_pairs
    from cvmkd_nmt.data.batching import BatchStream
    from cvmkd_nmt.data.tokens import TokenRows
    from cvmkd_teacher_bible import PACKAGE

    torch.set_num_threads(1)
    from cvmkd_nmt.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(PACKAGE / "tokenizer.model")
    base = load_bible_pairs("fr-en")
    src = [base[i % len(base)][0] for i in range(pairs)]
    tgt = [base[i % len(base)][1] for i in range(pairs)]
    before = status_mb("VmRSS")
    reset_peak()
    started = time.perf_counter()
    if kind == "lists":
        src_ids: Any = tokenizer.encode(src)
        tgt_ids: Any = tokenizer.encode(tgt)
    else:
        src_ids, tgt_ids = TokenRows.encode(tokenizer.encode, src), TokenRows.encode(tokenizer.encode, tgt)
    seconds = time.perf_counter() - started
    grown, peak = status_mb("VmRSS") - before, status_mb("VmHWM") - before
    stream = BatchStream(src_ids, tgt_ids, 0, 1, 2, batch_size=32, max_len=256, seed=1)
    started = time.perf_counter()
    digest = hashlib.sha256()
    for batch in islice(stream, 2000):
        digest.update(batch.src.numpy().tobytes())
        digest.update(batch.tgt_out.numpy().tobytes())
    batch_seconds = time.perf_counter() - started
    return {
        "arm": kind,
        "pairs": pairs,
        "tokens": int(sum(map(len, src_ids)) + sum(map(len, tgt_ids))),
        "resident_mb": round(grown, 1),
        "peak_mb": round(peak, 1),
        "bytes_per_pair": round(grown * 2**20 / pairs),
        "encode_seconds": round(seconds, 2),
        "batches_seconds": round(batch_seconds, 2),
        "batches_sha256": digest.hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--arm", choices=["lists", "flat"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm, args.pairs)))
        return
    results = {}
    for kind in ("lists", "flat"):
        done = subprocess.run(
            [sys.executable, __file__, "--arm", kind, "--pairs", str(args.pairs)],
            capture_output=True,
            text=True,
            check=True,
        )
        results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    lists, flat = results["lists"], results["flat"]
    same = lists["batches_sha256"] == flat["batches_sha256"]
    report = {
        "machine": platform.processor() or platform.machine(),
        "pairs": args.pairs,
        "arms": results,
        "memory_ratio": round(lists["resident_mb"] / max(flat["resident_mb"], 1e-9), 1),
        "peak_ratio": round(lists["peak_mb"] / max(flat["peak_mb"], 1e-9), 1),
        "encode_ratio": round(flat["encode_seconds"] / lists["encode_seconds"], 2),
        "batches_ratio": round(flat["batches_seconds"] / lists["batches_seconds"], 2),
        "same_batches": same,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{args.pairs:,} pairs ({lists['tokens']:,} tokens), each arm in its own process")
    print("| arm | resident MB | peak MB while encoding | bytes a pair | encode s | 2,000 batches s |")
    print("|---|---|---|---|---|---|")
    for r in (lists, flat):
        print(
            f"| {r['arm']} | {r['resident_mb']} | {r['peak_mb']} | {r['bytes_per_pair']} | "
            f"{r['encode_seconds']} | {r['batches_seconds']} |"
        )
    print(
        f"lists / flat memory: {report['memory_ratio']}x (peak {report['peak_ratio']}x); "
        f"flat / lists time: encoding {report['encode_ratio']}x, batches {report['batches_ratio']}x; "
        f"same batches: {same}"
    )
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
