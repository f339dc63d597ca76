"""Loading the teacher's cached top-k outputs: read whole and hashed (before) against memory-mapped
shards checked once (now), side by side.

    .venv/bin/python benchmarks/teacher_cache.py [--pairs 200000] [--json]

A cache of ``--pairs`` synthetic pairs (34 target tokens each, top-16 of 128 pieces) is built
once with ``build_teacher_cache``. Then each arm, in a process of its own, starts as a run does
and serves 2,000 batches of 32 random pairs: ``read`` as cvmkd did before (every shard hashed
against its record, then read into memory with safetensors), ``mapped`` as it does now
(``TeacherCache.load``: the shards checked when written, memory-mapped). Each arm reports the
seconds to start, the memory of its own (anonymous: what a machine runs out of) the cache added
at start and after its batches, the pages of the mapped files it then held (the kernel drops
and rereads those at will), and the seconds of the batches; the outputs are checked equal.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TOKENS, K, VOCAB = 34, 16, 128


def rss_mb(kind: str = "RssAnon") -> float:
    """This process's resident memory of one kind: ``RssAnon`` (its own, what a machine runs out
    of) or ``RssFile`` (pages of mapped files, which the kernel drops and reads again at will)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(f"{kind}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def build(path: Path, pairs: int) -> None:
    import torch

    from cvmkd_kd.teacher_cache import build_teacher_cache

    class Batch:
        def __init__(self, indices: torch.Tensor) -> None:
            self.indices = indices
            self.src = indices[:, None].expand(-1, 4)
            self.tgt_in = torch.ones(len(indices), TOKENS, dtype=torch.long)
            self.tgt_out = torch.full((len(indices), TOKENS), 5, dtype=torch.long)

    def forward(src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(src[0, 0]))
        return torch.randn(src.shape[0], TOKENS, VOCAB, generator=generator)

    def batches(start: int, stop: int) -> Any:
        for at in range(start, stop, 512):
            yield Batch(torch.arange(at, min(at + 512, stop)))

    build_teacher_cache(forward, batches, pairs, K, path, fingerprint="benchmark")


def arm(kind: str, path: Path, pairs: int) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    from cvmkd_kd.teacher_cache import INDEX, TeacherCache
    from cvmkd_nmt.cache import verified_cache_file

    torch.set_num_threads(1)
    before, before_file = rss_mb(), rss_mb("RssFile")
    started = time.perf_counter()
    if kind == "read":
        index = json.loads((path / INDEX).read_text())
        shards = []
        for entry in index["shards"]:
            file = path / entry["file"]
            assert verified_cache_file(file, "cached teacher outputs")
            shards.append(load_file(str(file)))
        bases = [0]
        for shard in shards[:-1]:
            bases.append(bases[-1] + int(shard["offsets"][-1]))
        offsets = torch.cat([torch.zeros(1, dtype=torch.long)] + [s["offsets"][1:] + b for s, b in zip(shards, bases)])
        logprobs = torch.cat([s["logprobs"] for s in shards])
        ids = torch.cat([s["ids"] for s in shards])

        def rows(which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return logprobs[which], ids[which].long()

    else:
        cache = TeacherCache.load(path, "benchmark")
        offsets = cache.offsets

        def rows(which: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return cache._rows(which)

    start_seconds = time.perf_counter() - started
    at_start = rss_mb() - before
    generator = torch.Generator().manual_seed(0)
    digest = hashlib.sha256()
    started = time.perf_counter()
    for _ in range(2000):
        chosen = torch.randint(0, pairs, (32,), generator=generator)
        which = torch.cat([torch.arange(int(offsets[i]), int(offsets[i + 1])) for i in chosen])
        got_lp, got_ids = rows(which)
        digest.update(got_lp.numpy().tobytes())
        digest.update(got_ids.numpy().tobytes())
    return {
        "arm": kind,
        "start_seconds": round(start_seconds, 3),
        "resident_mb_at_start": round(at_start, 1),
        "resident_mb_after_batches": round(rss_mb() - before, 1),
        "file_pages_mb_after_batches": round(rss_mb("RssFile") - before_file, 1),
        "batches_seconds": round(time.perf_counter() - started, 2),
        "sha256": digest.hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=200_000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--arm", choices=["read", "mapped"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm, Path(args.cache), args.pairs)))
        return
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "cache"
        started = time.perf_counter()
        build(path, args.pairs)
        build_seconds = time.perf_counter() - started
        size = sum(f.stat().st_size for f in path.glob("shard-*.safetensors"))
        results = {}
        for kind in ("read", "mapped"):
            done = subprocess.run(
                [sys.executable, __file__, "--arm", kind, "--cache", str(path), "--pairs", str(args.pairs)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode:
                sys.exit(f"arm {kind} failed: {done.stderr.strip().splitlines()[-1:]}")
            results[kind] = json.loads(done.stdout.strip().splitlines()[-1])
    read, mapped = results["read"], results["mapped"]
    report = {
        "machine": platform.processor() or platform.machine(),
        "pairs": args.pairs,
        "positions": args.pairs * TOKENS,
        "shards": len(list(range(0, args.pairs, 65_536))),
        "cache_mb": round(size / 1e6, 1),
        "build_seconds": round(build_seconds, 1),
        "arms": results,
        "start_ratio": round(read["start_seconds"] / max(mapped["start_seconds"], 1e-9), 1),
        "same_outputs": read["sha256"] == mapped["sha256"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{args.pairs:,} pairs, {report['positions']:,} positions, top-{K}: {report['cache_mb']} MB in "
        f"{report['shards']} shards (built in {report['build_seconds']} s); each arm in its own process"
    )
    print("| arm | start s | own memory MB at start | after 2,000 batches | file pages MB then | 2,000 batches s |")
    print("|---|---|---|---|---|---|")
    for r in (read, mapped):
        print(
            f"| {r['arm']} | {r['start_seconds']} | {r['resident_mb_at_start']} | "
            f"{r['resident_mb_after_batches']} | {r['file_pages_mb_after_batches']} | {r['batches_seconds']} |"
        )
    print(f"start, read / mapped: {report['start_ratio']}x; same outputs: {report['same_outputs']}")
    if not report["same_outputs"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
