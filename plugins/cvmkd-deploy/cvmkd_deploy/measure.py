"""One model folder translating, measured in a process of its own:

    python -m cvmkd_deploy.measure --folder DIR --sources FILE --threads N --batch-size B --out FILE

A process of its own, so that its peak memory is the model's and the runtime's alone, and its
threads are set before torch or CTranslate2 start (``OMP_NUM_THREADS`` is set by the caller too).
The folder is what ``cvmkd translate`` reads: an export (CTranslate2...) on its own engine, or a
model package. It writes one JSON object: the time to load, the latency per sentence at batch 1
(the first ``--latency-sentences`` sources one by one, after a warm-up), the throughput at
``--batch-size`` over every source (sentences and target words per second), the process's peak
resident memory, and the translations of the throughput pass (greedy), for scoring.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any


def _rss_mb() -> float:
    """The process's resident memory now, in MB (10^6 bytes)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError, IndexError):  # not Linux: the peak so far stands in
        return _peak_mb()


def _peak_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1e3 if os.uname().sysname == "Linux" else peak / 1e6  # KB on Linux, bytes on macOS


def measure(folder: Path, sources: list[str], threads: int, batch_size: int, latency_sentences: int) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    baseline = _rss_mb()
    from cvmkd_core.plugins import build_plugins
    from cvmkd_nmt.model.translate import open_runtime

    registry = build_plugins().registry
    started = time.perf_counter()
    runtime, scheme = open_runtime(folder, registry, torch.device("cpu"))
    load_seconds = time.perf_counter() - started
    loaded = _rss_mb()
    runtime.translate(sources[:2], batch_size=2)  # warm-up: first-call costs are not translation
    timed = sources[:latency_sentences]
    started = time.perf_counter()
    for sentence in timed:
        runtime.translate([sentence], batch_size=1)
    latency = (time.perf_counter() - started) / max(len(timed), 1)
    started = time.perf_counter()
    hypotheses = runtime.translate(sources, batch_size=batch_size)
    seconds = max(time.perf_counter() - started, 1e-9)
    return {
        "scheme": scheme,
        "threads": threads,
        "batch_size": batch_size,
        "load_seconds": round(load_seconds, 3),
        "latency_ms": round(1000 * latency, 3),
        "latency_sentences": len(timed),
        "sentences_per_second": round(len(sources) / seconds, 2),
        "words_per_second": round(sum(len(h.split()) for h in hypotheses) / seconds, 1),
        "baseline_rss_mb": round(baseline, 1),
        "loaded_rss_mb": round(loaded, 1),
        "peak_rss_mb": round(_peak_mb(), 1),
        "hypotheses": hypotheses,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", required=True)
    parser.add_argument("--sources", required=True, help="one source sentence per line")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--latency-sentences", type=int, default=50)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    sources = Path(args.sources).read_text(encoding="utf-8").split("\n")[:-1]
    result = measure(Path(args.folder), sources, args.threads, args.batch_size, args.latency_sentences)
    Path(args.out).write_text(json.dumps(result), encoding="utf-8")
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a module by the deployment gate
    raise SystemExit(main())
