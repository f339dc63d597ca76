"""This tree's speed against an earlier revision of cvmkd, the two taking turns on this machine.

    .venv/bin/python benchmarks/against.py REV [--rounds 3] [--only decode step] [--steps 400]

The revision is checked out into a temporary git worktree and run with this tree's virtual
environment (its code first on ``PYTHONPATH``; plugins that it does not have are blocked with
``CVMKD_BLOCK_PLUGINS``). Each round runs the earlier revision and this tree one after the other,
the order alternating between rounds, because this machine's speed drifts within minutes; the
printed ratio is the median of this tree's figures over the revision's.

- **decode**: each tree's code decoding this tree's shipped teacher in float32, greedy, exactly 32
  tokens per sentence (``timed_decode``), at batch 1 (24 test verses) and batch 32 (128): tokens/s.
- **step**: ``cvmkd run recipes/default.toml`` of each tree (its own recipe, teacher and caches,
  kept under ``--work``), stopped after ``--steps`` iterations: seconds per iteration and tokens/s
  over iterations 100 to the end. The first run of a tree builds its teacher's translations and
  top-16 outputs (minutes; an earlier revision without the shipped translations takes about 15
  minutes more); later rounds and later calls with the same ``--work`` reuse them.

Figures go to ``--out`` as JSON. docs/performance.md has the measurements against the issue's day.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable

DECODE = r"""
import json, sys, torch
from cvmkd_nmt.model.package import load_package
from cvmkd_nmt.model.decoding import timed_decode
from cvmkd_nmt.model.translate import source_batches
from cvmkd_corpus_bible.bible import bible_splits
model, tokenizer, _ = load_package(sys.argv[1])
model = model.float().eval()
sources = [pair[0] for pair in bible_splits("fr-en", 1000, 1000)[2]]
out = {}
for size, n in ((1, 24), (32, 128)):
    data = source_batches(tokenizer, sources[:n], 256, size)
    timed_decode(model, data[0], 32)
    best = 0.0
    for _ in range(2):
        best = max(best, sum(b.size(0) for b in data) * 32 / sum(timed_decode(model, b, 32) for b in data))
    out[f"batch {size}"] = best
print(json.dumps(out))
"""


def _environment(tree: Path | None) -> dict[str, str]:
    """This process's environment, with ``tree``'s code first on the path (None: this tree)."""
    env = dict(os.environ)
    if tree is None:
        return env
    paths = sorted(str(p) for p in (tree / "plugins").iterdir() if p.is_dir()) + [str(tree)]
    env["PYTHONPATH"] = os.pathsep.join(paths + [env["PYTHONPATH"]] if env.get("PYTHONPATH") else paths)
    missing = []
    for point in entry_points(group="cvmkd"):
        package = point.value.split(":")[0].split(".")[0]
        if not any((p / package).is_dir() for p in (tree / "plugins").iterdir()) and not (tree / package).is_dir():
            missing.append(point.name)
    if missing:
        env["CVMKD_BLOCK_PLUGINS"] = ",".join(sorted(missing))
    return env


def _decode(tree: Path | None) -> dict[str, float]:
    teacher = ROOT / "plugins/cvmkd-teacher-bible/cvmkd_teacher_bible/bible-fr-en"
    done = subprocess.run(
        [PYTHON, "-c", DECODE, str(teacher)],
        env=_environment(tree),
        cwd=tree or ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"error: decoding with {tree or 'this tree'} failed: {done.stderr.strip().splitlines()[-1]}")
    return {k: float(v) for k, v in json.loads(done.stdout.strip().splitlines()[-1]).items()}


def _step(tree: Path | None, name: str, work: Path, steps: int) -> dict[str, float]:
    run_dir = work / "runs" / name
    subprocess.run(["rm", "-rf", str(run_dir)], check=True)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cache = work / ("cache-this" if tree is None else "cache-" + tree.name)
    command = [PYTHON, "-m", "cvmkd_core", "run", "recipes/default.toml", "--quiet", "--run-dir", str(run_dir)]
    command += ["--set", f"run.cache_dir={cache}"]
    log = (work / f"{name}.err").open("w")
    process = subprocess.Popen(
        command, env=_environment(tree), cwd=tree or ROOT, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
    )
    rows: list[dict[str, Any]] = []
    try:
        while not rows or rows[-1]["step"] < steps:
            time.sleep(2)
            if process.poll() is not None:
                raise SystemExit(f"error: the run of {tree or 'this tree'} ended early; see {work / (name + '.err')}")
            try:
                with (run_dir / "train.jsonl").open() as handle:
                    rows = [json.loads(line) for line in handle if line.startswith('{"step"')]
            except (FileNotFoundError, json.JSONDecodeError):
                rows = []
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.close()
    later = [r for r in rows if 100 <= r["step"] <= steps]
    seconds = later[-1]["time"] - later[0]["time"]
    return {
        "seconds_per_step": seconds / (later[-1]["step"] - later[0]["step"]),
        "tokens_per_s": sum(r["tokens"] for r in later[1:]) / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("revision", help="a git revision of this repository (a commit, tag or branch)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=("decode", "step"), default=["decode", "step"])
    parser.add_argument("--steps", type=int, default=400, help="iterations of each default run (step)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench-results" / "against", help="runs and caches")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 150:
        parser.error("--rounds must be at least 1 and --steps at least 150")
    resolved = subprocess.run(
        ["git", "rev-parse", "--verify", "--short", f"{args.revision}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if resolved.returncode != 0:
        print(f"error: {args.revision}: not a commit of this repository", file=sys.stderr)
        return 2
    commit = resolved.stdout.strip()
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"revision": commit, "rounds": args.rounds}
    with tempfile.TemporaryDirectory(prefix=f"cvmkd-{commit}-") as scratch:
        tree = Path(scratch) / commit
        subprocess.run(
            ["git", "worktree", "add", "--detach", str(tree), commit], cwd=ROOT, check=True, capture_output=True
        )
        try:
            for section in args.only:
                figures: dict[str, list[dict[str, float]]] = {"revision": [], "this tree": []}
                for round_ in range(args.rounds):
                    order = ["revision", "this tree"] if round_ % 2 == 0 else ["this tree", "revision"]
                    for who in order:
                        where = tree if who == "revision" else None
                        name = f"{'rev' if where else 'this'}{round_}"
                        got = _decode(where) if section == "decode" else _step(where, name, args.work, args.steps)
                        figures[who].append(got)
                        print(
                            f"{section} round {round_ + 1} {who}: " + ", ".join(f"{k} {v:.4g}" for k, v in got.items())
                        )
                keys = list(figures["revision"][0])
                summary = {}
                for key in keys:
                    before = statistics.median(f[key] for f in figures["revision"])
                    after = statistics.median(f[key] for f in figures["this tree"])
                    faster = before / after if key == "seconds_per_step" else after / before
                    summary[key] = {"revision": before, "this tree": after, "this_tree_faster": round(faster, 3)}
                results[section] = {"runs": figures, "medians": summary}
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    print(f"\n## this tree against {commit}, medians of {args.rounds} alternating rounds\n")
    print("| section | figure | " + commit + " | this tree | this tree faster |")
    print("|---|---|---|---|---|")
    for section in args.only:
        for key, row in results[section]["medians"].items():
            print(
                f"| {section} | {key} | {row['revision']:.4g} | {row['this tree']:.4g} | {row['this_tree_faster']}x |"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / f"against-{commit}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    target.write_text(json.dumps(results, indent=1))
    print(f"\nwritten {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
