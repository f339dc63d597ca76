"""Build the shipped teacher package from a finished ``recipes/teacher.toml`` run.

    python plugins/cvmkd-teacher-bible/build.py [EARLIER_RUN_DIR ...] RUN_DIR [--revision COMMIT]

Reads RUN_DIR/model (the run's exported teacher), re-saves it with float16 weights into
``cvmkd_teacher_bible/bible-fr-en/`` (half the file; loading gives float32 again) and adds to its
metadata what the run's own files say about its training: steps, wall time of each invocation,
the validation curve, the checkpoint average, and the test scores at each beam size.
A teacher trained in stages (``recipes/teacher.toml``, then ``recipes/teacher-continue.toml``
from its package) names every stage's run folder in order: each later stage must have started
from the weights the one before it exported, and ``training.stages`` records each of them.
``--revision`` names the cvmkd commit the run used when the run could not tell (an installed
wheel records no revision). Nothing in the metadata is typed in by hand.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEST = HERE / "cvmkd_teacher_bible" / "bible-fr-en"
LIMIT_BYTES = 40 * 1024 * 1024


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text("utf-8").splitlines() if line.strip()]


def invocations(train_log: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each ``cvmkd run`` of the run: from its run_start to its run_end (steps and seconds)."""
    found: list[dict[str, Any]] = []
    start: dict[str, Any] | None = None
    for record in train_log:
        if record.get("event") == "run_start":
            start = record
        elif record.get("event") == "run_end" and start is not None:
            found.append(
                {
                    "from_step": start["step"],
                    "to_step": record["step"],
                    "status": record["status"],
                    "seconds": round(record["time"] - start["time"], 1),
                }
            )
            start = None
    return found


def training_facts(run: Path) -> dict[str, Any]:
    summary = json.loads((run / "summary.json").read_text("utf-8"))
    evaluation = json.loads((run / "evaluation.json").read_text("utf-8"))
    log = read_jsonl(run / "train.jsonl")
    steps = [r for r in log if "event" not in r]
    validations = read_jsonl(run / "validation" / "history.jsonl")
    runs = invocations(log)
    test = {str(evaluation["beam_size"]): evaluation["teacher"]["scores"]}
    for beam, entry in evaluation["teacher"].get("by_beam_size", {}).items():
        test[str(beam)] = entry["scores"]
    return {
        "steps": summary["final_step"],
        "target_tokens": sum(r.get("tokens", 0) for r in steps),
        "invocations": runs,
        "training_seconds": round(sum(r["seconds"] for r in runs), 1),
        "last_invocation_seconds": summary["extra"].get("invocation_seconds", summary["wall_seconds"]),
        "hardware": summary["extra"]["trainer"]["hardware"],
        "precision": summary["extra"]["trainer"]["precision"],
        "validation": [
            {"step": v["step"], **{k: round(x, 2) for k, x in v["scores"].items()}, "seconds": v["seconds"]}
            for v in validations
        ],
        "averaging": summary["extra"].get("averaging"),
        "stop_reason": summary["extra"].get("stop_reason"),
        "test": {"split": evaluation["split"], "sentences": evaluation["sentences"], "by_beam_size": test},
    }


def stage_record(run: Path, metadata: dict[str, Any]) -> dict[str, Any]:
    """An earlier stage: its recipe, its weights and what its files say about its training."""
    return {
        "run": run.name,
        "recipe": metadata.get("recipe"),
        "weights_sha256": metadata.get("weights_sha256"),
        "initialised_from": metadata.get("initialised_from"),
        **training_facts(run),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("earlier", type=Path, nargs="*", help="the run folders of earlier stages, in order")
    parser.add_argument("run", type=Path, help="the folder of a finished recipes/teacher.toml run")
    parser.add_argument("--revision", help="the cvmkd commit the run used, when its metadata has none")
    parser.add_argument("--dest", type=Path, default=DEST, help=f"where to write the package (default {DEST})")
    args = parser.parse_args(argv)

    from cvmkd_nmt.model.package import WEIGHTS, load_package, save_package

    stages: list[dict[str, Any]] = []
    for run in [*args.earlier, args.run]:
        try:
            model, tokenizer, metadata = load_package(run / "model")
            facts = training_facts(run)
        except (OSError, KeyError, ValueError) as exc:
            print(f"error: {run}: not a finished teacher run ({exc})", file=sys.stderr)
            return 2
        except Exception as exc:  # cvmkd's own errors say what is wrong
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if metadata.get("role") != "teacher":
            print(f"error: {run / 'model'} is a {metadata.get('role')!r} package, not a teacher", file=sys.stderr)
            return 2
        if stages:
            started = (metadata.get("initialised_from") or {}).get("weights_sha256")
            if started != stages[-1]["weights_sha256"]:
                print(
                    f"error: {run}: did not start from the weights of the stage before it ({args.earlier[len(stages) - 1]})",
                    file=sys.stderr,
                )
                return 2
        stages.append(stage_record(run, metadata))
    if len(stages) > 1:
        facts["stages"] = stages[:-1]
        facts["total_steps"] = sum(s["steps"] for s in stages)
        facts["total_training_seconds"] = round(sum(s["training_seconds"] for s in stages), 1)
    if metadata.get("source_revision") is None and args.revision:
        metadata["source_revision"] = {"commit": args.revision, "dirty": False, "recorded_by": "build.py --revision"}
    metadata["test_scores"] = facts["test"]["by_beam_size"]["1"]
    metadata["training"] = facts
    save_package(args.dest, model, tokenizer, metadata, half=True)
    size = (args.dest / WEIGHTS).stat().st_size
    print(f"wrote {args.dest}: {size / 1e6:.1f} MB of float16 weights, {facts['steps']} steps")
    if size > LIMIT_BYTES:
        print(f"error: {args.dest / WEIGHTS} is larger than {LIMIT_BYTES // 2**20} MiB", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
