"""The fault-injection suite: a whole tiny distillation (the teacher's training, the tokenizer,
the teacher's translation pass, its top-k pass, training, validation, the test evaluation,
quantization, a CTranslate2 export and reports) is run once and every write it makes is traced;
then one fault is injected per case, at one of those writes (tests/fault_injector.py):

- **kill**: SIGKILL, after half of the write reached the disk;
- **full**: the write fails with ENOSPC after half of it, as on a full disk;
- **readonly**: the open, folder creation or rename fails with EROFS;
- **damaged**: one byte of a cached artefact (or of a checkpoint) is changed before a run.

Each case checks that nothing already written was lost (every JSON, JSONL and safetensors file
under the run and the cache still reads), that the failed run said why in one line with exit
status 2 (full, readonly), and that running again (``--resume`` where the run folder holds a
run) either ends exactly where the undisturbed run ended (the same weights, the same scores, the
same translations) or refuses in one line with exit status 2.

By default a sample runs (one kill per stage, a few of the other faults): about two minutes on
2 cores. ``CVMKD_FAULTS=long`` tries many more writes per stage; ``CVMKD_FAULTS=all`` every
write; ``CVMKD_FAULTS_SEED`` draws other writes; ``CVMKD_FAULTS_CASES=kill-35,full-1240`` runs
only those cases of the mode; ``CVMKD_FAULTS_REPORT=FILE`` writes the figures as JSON
(docs/reliability.md quotes them)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from cvmkd_testing import write_tiny_corpus

pytestmark = pytest.mark.slow

INJECTOR = Path(__file__).with_name("fault_injector.py")
MODE = os.environ.get("CVMKD_FAULTS", "sample")
SEED = int(os.environ.get("CVMKD_FAULTS_SEED", "0"))

RECIPE = """
[run]
name = "faults"
steps = 8
validate_every = 4
seed = 5
cache_dir = "cache"
keep_checkpoints = 2

[corpus]
name = "files"
train = "corpus.tsv"
valid_size = 8
test_size = 8

[tokenizer]
vocab_size = 40

[teacher]
steps = 6
validate_every = 6
batch_size = 16
learning_rate = 3e-3
warmup_steps = 2

[teacher.model]
name = "cvm"
preset = "tiny"

[student.model]
name = "cvm"
preset = "tiny"
d_model = 16
n_heads = 2

[distill]
name = "kd"
batch_size = 8
warmup_steps = 2
teacher_outputs = "cached"
topk = 4

[distill.sequence]
targets = "both"
chunk_size = 40

[distill.loss]
name = "kd"
temperature = 2.0

[validation]
metrics = ["bleu", "chrf"]
significance_samples = 20

[[quantize]]
name = "dynamic-int8"

[[exports]]
name = "ctranslate2"

[[reports]]
name = "markdown"

[[reports]]
name = "json"
"""

RUN = "runs/r"

#: the stage a write belongs to, by its path (leading dots of temporary names removed); the
#: first match wins, and what matches none is the training loop's own (checkpoints, logs)
STAGES = [
    ("tokenizer", r"cache/(tokenizers|token-ids)"),
    ("teacher training", r"cache/teachers|runs/r/teacher/"),
    ("teacher pass", r"cache/teacher-targets|runs/r/teacher-targets"),
    ("top-k pass", r"cache/teacher-outputs"),
    ("validation", r"cache/teacher-translations|runs/r/validation"),
    ("export", r"runs/r/model-ctranslate2"),
    ("quantization", r"runs/r/(model-dynamic-int8|quantization)"),
    ("test evaluation", r"runs/r/(test\.|evaluation|model)"),
    ("reports", r"runs/r/(reports|summary)"),
]


def stage_of(path: str) -> str:
    plain = "/".join(part.lstrip(".") for part in path.split("/"))
    for stage, pattern in STAGES:
        if re.match(pattern, plain):
            return stage
    return "training"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CVMKD_FAULT")}
    env.pop("CVMKD_DISABLE_PLUGIN_AUTOLOAD", None)
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", **extra)
    return env


def _cvmkd(case: Path, *args: str, **fault: str) -> subprocess.CompletedProcess[str]:
    env = _env(CVMKD_FAULT_ROOT=str(case), **fault) if fault else _env()
    return subprocess.run(
        [sys.executable, str(INJECTOR), "run", "recipe.toml", "--quiet", "--run-dir", RUN, *args],
        cwd=case,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _new_case(root: Path, name: str) -> Path:
    case = root / name
    case.mkdir(parents=True)
    write_tiny_corpus(case)
    (case / "recipe.toml").write_text(RECIPE)
    return case


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weights(path: Path) -> dict[str, str]:
    import torch
    from safetensors.torch import load_file

    return {
        name: _sha(t.contiguous().flatten().view(torch.uint8).numpy().tobytes())
        for name, t in sorted(load_file(path).items())
    }


def outcome(run: Path) -> dict[str, Any]:
    """What a finished run computed, without its timings."""
    summary = json.loads((run / "summary.json").read_text())
    evaluation = json.loads((run / "evaluation.json").read_text())
    quantization = json.loads((run / "quantization.json").read_text())
    history = [json.loads(line) for line in (run / "validation/history.jsonl").read_text().splitlines()]
    return {
        "summary": {k: summary[k] for k in ("status", "final_step", "iterations_executed", "rollbacks", "gate")},
        "outputs": sorted(summary["outputs"]),
        "model": _weights(run / "model/model.safetensors"),
        "int8": _weights(run / "model-dynamic-int8/model.safetensors"),
        "ctranslate2": _sha((run / "model-ctranslate2/model.bin").read_bytes()),
        "test": {who: evaluation[who]["scores"] for who in ("student", "teacher")},
        "hypotheses": (run / "test.student.hyp").read_text(),
        "validation": [(r["step"], r["scores"]) for r in history],
        "quantized": [(v["name"], v.get("scores"), v.get("validation_scores")) for v in quantization["variants"]],
        "reports": sorted(p.name for p in (run / "reports").glob("report.*")),
    }


def unreadable(case: Path, torn: bool = False, besides: str | None = None) -> list[str]:
    """Files under the case's run and cache folders that no longer read: nothing already
    written may be lost. Temporary files (a leading dot) are not results. With ``torn``, a JSONL
    file may end in a line without its newline: the record a killed process was writing, which
    the next writer cuts off (``open_jsonl``). ``besides``: a file the case damaged on purpose."""
    from safetensors.torch import load_file

    bad = []
    for path in sorted(case.rglob("*")):
        relative = path.relative_to(case)
        if not path.is_file() or any(part.startswith(".") for part in relative.parts) or str(relative) == besides:
            continue
        try:
            if path.suffix == ".json":
                json.loads(path.read_text())
            elif path.suffix == ".jsonl":
                text = path.read_text()
                lines = text.splitlines()
                if torn and text and not text.endswith("\n"):
                    lines = lines[:-1]
                for line in lines:
                    json.loads(line)
            elif path.suffix == ".safetensors":
                load_file(path)
        except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
            bad.append(f"{relative}: {type(exc).__name__}: {exc}")
    return bad


def one_line_error(result: subprocess.CompletedProcess[str]) -> str | None:
    """The one ``error:`` line of a refused or failed command, or None when it is not that."""
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if result.returncode != 2 or len(errors) != 1 or "Traceback" in result.stderr:
        return None
    return errors[0]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The undisturbed run, with the trace of its writes."""
    root = tmp_path_factory.mktemp("faults")
    case = _new_case(root, "base")
    trace = root / "trace.jsonl"
    result = _cvmkd(case, CVMKD_FAULT="trace", CVMKD_FAULT_TRACE=str(trace))
    assert result.returncode == 0, result.stderr
    writes = [json.loads(line) for line in trace.read_text().splitlines()]
    return {"root": root, "case": case, "writes": writes, "outcome": outcome(case / RUN)}


def _rerun(case: Path) -> subprocess.CompletedProcess[str]:
    resume = ("--resume",) if (case / RUN / "recipe.toml").is_file() else ()
    return _cvmkd(case, *resume)


def _damage(path: Path) -> int:
    """Changes one byte of ``path`` (seeded by its name), returns where."""
    data = bytearray(path.read_bytes())
    where = random.Random(f"{SEED}:{path.name}").randrange(len(data))
    data[where] ^= 0x20 if data[where] not in (0x0A, 0x09) else 0x01
    path.write_bytes(bytes(data))
    return where


def run_case(
    baseline: dict[str, Any], name: str, fault: str, write: dict[str, Any] | None, damage: str | None = None
) -> dict[str, Any]:
    """One case: the fault at ``write`` (the run stops there), or a damaged byte in ``damage``:
    a cached file (then a new run on that cache) or a checkpoint (of a run killed once training
    was over, then resumed). Returns the verdict (``survived``, ``refused`` or ``failed``) and
    the details."""
    case = _new_case(baseline["root"], name)
    record: dict[str, Any] = {"case": name, "fault": fault}
    if damage is not None and not damage.startswith(RUN):
        shutil.copytree(baseline["case"] / "cache", case / "cache")
    if write is not None:
        record.update(stage=stage_of(write["path"]), path=write["path"], op=write["op"])
        at = str(write["s"] if fault == "readonly" else write["n"])
        first = _cvmkd(
            case, CVMKD_FAULT="readonly" if fault == "readonly" else "kill" if damage else fault, CVMKD_FAULT_AT=at
        )
        record["first"] = first.returncode
        if fault in ("kill", "damaged") and first.returncode != -signal.SIGKILL:
            why = f"not killed (exit {first.returncode}): {first.stderr[-2000:]}"
            return {**record, "verdict": "failed", "why": why}
        if fault in ("full", "readonly") and one_line_error(first) is None:
            # a write the run can do without (a report, a plot, the outcome in a package's
            # metadata): the run goes on and says so in a warning; running again writes it
            warned = [line for line in first.stderr.splitlines() if " WARNING " in line and "cannot write" in line]
            if first.returncode != 0 or not warned or "Traceback" in first.stderr:
                why = f"neither one error line with exit 2 nor a warning (exit {first.returncode}): {first.stderr[-2000:]}"
                return {**record, "verdict": "failed", "why": why}
            record["warned"] = warned[0].split(" WARNING ", 1)[1]
    if damage is not None:
        record.update(stage=stage_of(damage), path=damage, byte=_damage(case / damage))
    lost = unreadable(case, torn=True, besides=damage)
    if lost:
        return {**record, "verdict": "failed", "why": "unreadable after the fault: " + "; ".join(lost)}
    again = _rerun(case)
    if again.returncode == 0:
        lost = unreadable(case)
        if lost:
            return {**record, "verdict": "failed", "why": "unreadable after running again: " + "; ".join(lost)}
        got = outcome(case / RUN)
        if got != baseline["outcome"]:
            diff = [k for k in got if got[k] != baseline["outcome"][k]]
            return {**record, "verdict": "failed", "why": f"ran again to other results: {diff}"}
        return {**record, "verdict": "survived"}
    refusal = one_line_error(again)
    if refusal is None:
        return {**record, "verdict": "failed", "why": f"ran again: exit {again.returncode}: {again.stderr[-2000:]}"}
    lost = unreadable(case, besides=damage)
    if lost:
        return {**record, "verdict": "failed", "why": "unreadable after the refusal: " + "; ".join(lost)}
    return {**record, "verdict": "refused", "why": refusal}


def _pick(writes: list[dict[str, Any]], per_stage: int, rng: random.Random) -> list[dict[str, Any]]:
    by_stage: dict[str, list[dict[str, Any]]] = {}
    for write in writes:
        by_stage.setdefault(stage_of(write["path"]), []).append(write)
    chosen = []
    for stage in sorted(by_stage):
        pool = by_stage[stage]
        chosen.extend(pool if per_stage <= 0 else rng.sample(pool, min(per_stage, len(pool))))
    return chosen


def plan(baseline: dict[str, Any]) -> list[tuple[str, str, dict[str, Any] | None, str | None]]:
    rng = random.Random(SEED)
    writes = baseline["writes"]
    structural = [w for w in writes if w["op"] != "write"]
    per_stage = {"sample": (1, 0, 0), "long": (5, 2, 2), "all": (0, 0, 0)}[MODE]
    cases: list[tuple[str, str, dict[str, Any] | None, str | None]] = []
    for fault, pool, count in (
        ("kill", writes, per_stage[0]),
        ("full", writes, per_stage[1]),
        ("readonly", structural, per_stage[2]),
    ):
        if MODE == "sample" and fault != "kill":
            picks = rng.sample(pool, 2)  # two of each other fault, anywhere
        else:
            picks = _pick(pool, count, rng)
        cases += [(f"{fault}-{w['n']}", fault, w, None) for w in picks]
    base = baseline["case"]
    damageable = sorted(str(p.relative_to(base)) for p in (base / "cache").rglob("*") if p.is_file())
    if MODE == "sample":
        kinds: dict[str, str] = {}
        for path in damageable:
            kinds.setdefault(stage_of(path) + Path(path).suffix, path)
        damageable = sorted(kinds.values())
    cases += [(f"damaged-{i}", "damaged", None, path) for i, path in enumerate(damageable)]
    # a checkpoint damaged in a run killed once training was over, then resumed
    trained = max(w["n"] for w in writes if w["path"].startswith(f"{RUN}/checkpoints/"))
    over = next(w for w in writes if w["n"] > trained and stage_of(w["path"]) == "test evaluation")
    checkpoints = sorted(str(p.relative_to(base)) for p in (base / RUN / "checkpoints").iterdir())
    if MODE == "sample":
        checkpoints = [checkpoints[-1]]  # the last checkpoint: the one a resume loads
    cases += [(f"damaged-checkpoint-{i}", "damaged", over, path) for i, path in enumerate(checkpoints)]
    if os.environ.get("CVMKD_FAULTS_CASES"):  # only these, by name: a maintainer's re-run of some
        names = set(os.environ["CVMKD_FAULTS_CASES"].split(","))
        cases = [case for case in cases if case[0] in names]
    return cases


def test_every_fault_leaves_nothing_lost_and_a_rerun_ends_the_same_or_refuses(baseline: dict[str, Any]) -> None:
    cases = plan(baseline)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda c: run_case(baseline, *c), cases))
    figures = Counter((r["fault"], r["verdict"]) for r in results)
    lines = [
        f"{r['verdict']:8} {r['fault']:8} {r.get('stage', ''):16} {r['path']}  {r.get('why', '')[:300]}"
        for r in results
    ]
    print("\n".join(lines))
    print(dict(figures))
    if os.environ.get("CVMKD_FAULTS_REPORT"):
        Path(os.environ["CVMKD_FAULTS_REPORT"]).write_text(
            json.dumps({"mode": MODE, "seed": SEED, "writes": len(baseline["writes"]), "cases": results}, indent=1)
        )
    failed = [line for r, line in zip(results, lines) if r["verdict"] == "failed"]
    assert not failed, "\n".join(failed)
