"""The bad-input catalogue: every bad input gets a clear one-line error naming the problem and
where, exit status 2, and nothing already written is lost or corrupted.

Each case runs the real command line (``cvmkd_core.cli.main``) in the test's own folder, which
already holds an earlier run's outputs (``runs/earlier/``, and for some cases a toy run in
``runs/toy/``). Before the command every file in the folder is hashed; afterwards each must still
exist with the same content (new files are allowed). docs/reliability.md lists the same cases;
``test_every_case_is_in_the_reliability_doc`` keeps the two in step.

Exit statuses: 2 for bad input, 1 for a plugin that raises (a bug, not bad input), 0 when the
run recovers by itself (a damaged last checkpoint).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import textwrap
from collections.abc import Callable
from pathlib import Path

import attrs
import pytest
import torch

from cvmkd_core import checkpoint as checkpoint_module
from cvmkd_core.checkpoint import CheckpointStore
from cvmkd_core.cli import main
from cvmkd_testing import TOY_HOOK_FILE, TOY_RECIPE

DOC = Path(__file__).resolve().parent.parent / "docs" / "reliability.md"

# --- the inputs the cases start from -----------------------------------------------------------

WORDS = {
    "le": "the",
    "chat": "cat",
    "chien": "dog",
    "mange": "eats",
    "voit": "sees",
    "petit": "small",
    "grand": "big",
    "oiseau": "bird",
    "poisson": "fish",
    "un": "a",
}

#: a distillation with the real ``kd`` trainer on ``corpus.tsv``; every kd case fails before training
KD_RECIPE = """
[run]
name = "kd"
steps = 2
validate_every = 2
cache_dir = "cache"

[corpus]
name = "files"
train = "corpus.tsv"
valid_size = 4
test_size = 4

[tokenizer]
vocab_size = 30

[teacher.model]
name = "cvm"
preset = "tiny"

[student.model]
name = "cvm"
preset = "tiny"

[distill]
name = "kd"
"""

#: what an earlier run left: none of it may change whatever a later command does
EARLIER = {
    "runs/earlier/recipe.toml": '[run]\nname = "earlier"\n',
    "runs/earlier/summary.json": '{"status": "completed", "final_step": 6}\n',
    "runs/earlier/train.jsonl": '{"step": 1, "loss": 2.5}\n{"step": 2, "loss": 2.25}\n',
    "runs/earlier/checkpoints/manifest.json": '{"checkpoints": [], "best": null}\n',
    "runs/earlier/model/config.json": '{"vocab_size": 30}\n',
    "notes/todo.txt": "a folder that holds no run\n",
}


def _corpus_lines(n: int = 60) -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        src = [rng.choice(list(WORDS)) for _ in range(rng.randint(2, 5))]
        lines.append(" ".join(src) + "\t" + " ".join(WORDS[w] for w in src))
    return lines


@pytest.fixture(scope="module")
def teacher_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small but real teacher package (weights, config, tokenizer, metadata) for the corpus,
    and next to it ``other.model``, a tokenizer with a smaller vocabulary."""
    from cvmkd_nmt.data.tokenizer import train_tokenizer
    from cvmkd_nmt.model.package import save_package
    from cvmkd_nmt.model.presets import preset
    from cvmkd_nmt.model.transformer import CvmTransformer

    root = tmp_path_factory.mktemp("teacher")
    pairs = [tuple(line.split("\t")) for line in _corpus_lines()]
    tokenizer = train_tokenizer(pairs, vocab_size=30, cache_dir=root / "tokenizers")
    torch.manual_seed(0)
    model = CvmTransformer(preset("tiny", vocab_size=tokenizer.vocab_size))
    save_package(root / "package", model, tokenizer, {"role": "teacher"})
    other = train_tokenizer(pairs, vocab_size=24, cache_dir=root / "tokenizers")
    shutil.copy(other.path, root / "other.model")
    return root


# --- the snapshot: every case checks that nothing already written changed ------------------------


def snapshot(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_intact(root: Path, before: dict[str, str], may_change: tuple[str, ...] = ()) -> None:
    """Every file of ``before`` still exists with the same content, except those under a
    ``may_change`` prefix (the run a successful --resume continues, say). New files are allowed."""
    after = snapshot(root)
    damaged = [
        f"{path}: {'missing' if path not in after else 'changed'}"
        for path, digest in before.items()
        if after.get(path) != digest and not path.startswith(may_change)
    ]
    assert damaged == []


# --- set-up steps --------------------------------------------------------------------------------


def _write(path: str, text: str) -> Callable[[Path], None]:
    def step(root: Path) -> None:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(textwrap.dedent(text))

    return step


def _write_bytes(path: str, data: bytes) -> Callable[[Path], None]:
    def step(root: Path) -> None:
        (root / path).write_bytes(data)

    return step


def _toy_run(root: Path) -> None:
    """A completed toy run in runs/toy: checkpoints at steps 3 and 6."""
    assert main(["run", "r.toml", "--plugin", "toy_hooks.py", "--quiet"]) == 0


TWO_STEP_TEACHER = ("--set", "teacher.steps=2", "--set", "teacher.validate_every=2", "--set", "teacher.batch_size=8")


def _first_kd_run(root: Path) -> None:
    """A finished kd run (a two-step teacher, then the student): it leaves cache/ holding the
    tokenizer, the teacher, its top-k outputs and its translations of the validation verses."""
    argv = kd(*TWO_STEP_TEACHER, "--run-dir", "runs/first", "--quiet")
    assert main(argv) == 0


def _first_kd_run_with_pkg(root: Path) -> None:
    argv = kd(*TWO_STEP_TEACHER, "--set", "teacher.checkpoint=pkg", "--run-dir", "runs/first", "--quiet")
    assert main(argv) == 0


def _shrink_corpus(root: Path) -> None:
    lines = (root / "corpus.tsv").read_text().splitlines()
    (root / "corpus.tsv").write_text("\n".join(lines[:52]) + "\n")


def _flip_a_byte(pattern: str) -> Callable[[Path], None]:
    """Change one byte of the one cached file matching ``pattern``: same size, other content."""

    def step(root: Path) -> None:
        (path,) = root.glob(pattern)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x20
        path.write_bytes(bytes(data))

    return step


def _edit_config(package: Path) -> None:
    config = json.loads((package / "config.json").read_text())
    config["n_heads"] = 1  # still a model the weights fit, but another one
    (package / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def _drop_recipe_lines(*lines: str) -> Callable[[Path], None]:
    def step(root: Path) -> None:
        path = root / "runs/toy/recipe.toml"
        text = path.read_text()
        for line in lines:
            assert f"{line}\n" in text, line
            text = text.replace(f"{line}\n", "")
        path.write_text(text)

    return step


#: open lock files of the run directories a case pretends another process is writing
_HELD: list = []


def _held_by_another_process(root: Path) -> None:
    """runs/toy locked as a running ``cvmkd run`` would hold it (flock conflicts across open
    files even within one process)."""
    import fcntl

    handle = open(root / "runs/toy/.lock", "w", encoding="utf-8")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write("process 4242\n")
    handle.flush()
    _HELD.append(handle)


def _release_locks() -> None:
    while _HELD:
        _HELD.pop().close()


CKPT_3 = "runs/toy/checkpoints/step_00000003_it00000003.pt"
CKPT_6 = "runs/toy/checkpoints/step_00000006_it00000006.pt"


def _truncate(*paths: str) -> Callable[[Path], None]:
    def step(root: Path) -> None:
        for path in paths:
            data = (root / path).read_bytes()
            (root / path).write_bytes(data[: len(data) // 2])

    return step


class Planted:
    """A custom object whose unpickling would run code (it writes ``pwned``)."""

    def __reduce__(self) -> tuple:
        return (exec, ("open('pwned', 'w').close()",))


def _plant_pickles(root: Path) -> None:
    """Replace every checkpoint by a well-formed torch file holding a Planted object, with the
    manifest's sha256 updated to match: only weights_only loading stands in the way."""
    manifest_path = root / "runs/toy/checkpoints/manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["checkpoints"]:
        buffer = io.BytesIO()
        torch.save({"core": {"step": entry["step"]}, "planted": Planted()}, buffer)
        (manifest_path.parent / entry["file"]).write_bytes(buffer.getvalue())
        entry["sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")


def _package(name: str, damage: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    """Copy the teacher package to ``name`` (the teacher_package fixture's folder is passed in
    through ``root / ".teacher"``), then damage it."""

    def step(root: Path) -> None:
        shutil.copytree(root / ".teacher" / "package", root / name)
        if damage is not None:
            damage(root / name)

    return step


def _break_weights_header(package: Path) -> None:
    """A header that is not JSON, with the sha256 in metadata.json updated to match: only the
    safetensors parser sees the damage."""
    weights = package / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:10] = b"[["
    weights.write_bytes(bytes(data))
    meta = json.loads((package / "metadata.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (package / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")


def _retrain_pkg(root: Path) -> None:
    """The package ``pkg`` changed in place: another teacher, as sound as the first."""
    from safetensors.torch import load_file, save_file

    weights = root / "pkg" / "model.safetensors"
    tensors = load_file(weights)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name] + 0.01
    save_file(tensors, weights)
    meta = json.loads((root / "pkg" / "metadata.json").read_text())
    meta["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (root / "pkg" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")


def _truncate_weights(package: Path) -> None:
    weights = package / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])


def _absent(root: Path, name: str) -> None:
    assert not (root / name).exists(), f"{name} was written"
    assert not list(root.glob(f".{name}.*")), f"a temporary {name} was left"


def _remove_config(package: Path) -> None:
    (package / "config.json").unlink()


def _swap_tokenizer(package: Path) -> None:
    shutil.copy(package.parent / ".teacher" / "other.model", package / "tokenizer.model")


RAISER = """\
from cvmkd_core import hookimpl


@hookimpl
def {hook}({args}):
    raise ValueError("boom")
"""

HOOK_ARGS = {
    "cvmkd_register": "register",
    "cvmkd_configure": "recipe, pm",
    "cvmkd_run_start": "state",
    "cvmkd_step": "state, batch",
    "cvmkd_step_end": "state, result",
    "cvmkd_validate": "state",
    "cvmkd_analyze": "state, sample",
    "cvmkd_check_degradation": "state, record, history",
    "cvmkd_checkpoint": "state, record, payload",
    "cvmkd_event": "state, name, data",
    "cvmkd_finalize": "state, summary",
    "cvmkd_restore": "state, payload, reason",
}


def _raiser(hook: str) -> Callable[[Path], None]:
    return _write("raiser.py", RAISER.format(hook=hook, args=HOOK_ARGS[hook]))


#: fails the second checkpoint write with ENOSPC, as a full disk would
FULL_DISK_HOOKS = """\
import errno

from cvmkd_core import checkpoint, hookimpl

_original = checkpoint.atomic_write_bytes
_writes = []


def _full_disk(path, data):
    _writes.append(path)
    if len(_writes) == 2:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    _original(path, data)


@hookimpl
def cvmkd_run_start(state):
    checkpoint.atomic_write_bytes = _full_disk


@hookimpl
def cvmkd_finalize(state, summary):
    checkpoint.atomic_write_bytes = _original
"""


#: the disk fills up while the finished run writes evaluation.json (its test scores)
FULL_DISK_AT_FINALIZE = """\
import errno

from cvmkd_core import files, hookimpl

_original = files.atomic_write


def _atomic_write(path, write):
    def fill_up(handle):
        if str(path).endswith("evaluation.json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        write(handle)

    _original(path, fill_up)


@hookimpl(tryfirst=True)
def cvmkd_evaluate(state, summary):
    files.atomic_write = _atomic_write


@hookimpl
def cvmkd_report(state, summary):
    files.atomic_write = _original
"""


#: SIGTERM to the run itself after step 4, as `timeout`, Slurm or Kubernetes would send it
TERM_AT_STEP_4 = """\
import os
import signal

from cvmkd_core import hookimpl


@hookimpl
def cvmkd_step_end(state, result):
    if state.step == 4:
        os.kill(os.getpid(), signal.SIGTERM)
"""

#: a Ctrl-C once training is over
CTRL_C_AT_FINALIZE = """\
import os
import signal

from cvmkd_core import hookimpl


@hookimpl(tryfirst=True)
def cvmkd_finalize(state, summary):
    os.kill(os.getpid(), signal.SIGINT)
"""

#: a test evaluation in which the student keeps half of the teacher's composite score
HALF_AS_GOOD = """\
from cvmkd_core import hookimpl
from cvmkd_validation.records import EVALUATION, TestEvaluation


@hookimpl
def cvmkd_evaluate(summary):
    summary[EVALUATION] = TestEvaluation(
        split="test", sentences=1, beam_size=1, scores={}, retention={"composite": 0.5}
    )
"""

#: a plugin writing its own file at the end of the run finds the disk full
FULL_DISK_IN_A_PLUGIN = """\
import errno

from cvmkd_core import hookimpl


@hookimpl
def cvmkd_finalize(state, summary):
    raise OSError(errno.ENOSPC, "No space left on device", "runs/toy/export/model.bin")
"""

#: the cache's disk is full when the trained teacher is copied into it
FULL_CACHE_DISK = """\
import errno
import shutil

from cvmkd_core import hookimpl

_original = shutil.copytree


def _copytree(src, dst, *args, **kwargs):
    if "teachers" in str(dst):
        shutil.copytree = _original  # once: later cases in this process copy normally
        _original(src, dst, *args, **kwargs)  # half of it, say: then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")
    return _original(src, dst, *args, **kwargs)


@hookimpl
def cvmkd_configure(recipe, pm):
    shutil.copytree = _copytree
"""


def _no_temporary_teacher(root: Path) -> None:
    assert not list((root / "cache/teachers").glob(".*")), "a temporary teacher folder was left"
    assert (root / "runs/kd/teacher/model/model.safetensors").is_file()  # the trained teacher is kept


# --- checks after the command --------------------------------------------------------------------


def _summary(root: Path, run: str = "runs/toy") -> dict:
    return json.loads((root / run / "summary.json").read_text())


def _after_full_disk(root: Path) -> None:
    """The first checkpoint and the manifest are intact and loadable, and --resume continues."""
    store = CheckpointStore(root / "runs/toy/checkpoints")
    assert [e.file for e in store.entries()] == [Path(CKPT_3).name]
    entry, payload = store.load("last")
    assert (entry.step, payload["core"]["step"]) == (3, 3)
    assert sorted(p.name for p in store.directory.iterdir()) == ["manifest.json", Path(CKPT_3).name]
    assert _summary(root)["status"] == "failed"
    assert main(["run", "r.toml", "--plugin", "toy_hooks.py", "--resume", "--run-dir", "runs/toy", "--quiet"]) == 0
    assert (_summary(root)["status"], _summary(root)["final_step"]) == ("completed", 6)


def _after_fallback(root: Path) -> None:
    summary = _summary(root)
    assert (summary["status"], summary["final_step"], summary["iterations_executed"]) == ("completed", 6, 6)
    entry, _ = CheckpointStore(root / "runs/toy/checkpoints").load("last")
    assert entry.step == 6  # the damaged file was replaced by a good one


def _nothing_planted(root: Path) -> None:
    assert not (root / "pwned").exists()


def _summary_completed(root: Path) -> None:
    assert _summary(root)["status"] == "completed"


def _summary_failed(root: Path) -> None:
    assert _summary(root)["status"] == "failed"


def _summary_finalize_failed(root: Path) -> None:
    summary = _summary(root)
    assert summary["status"] == "failed" and summary["error"] == "finalize: ValueError: boom"
    assert summary["final_step"] == 6


def _finalize_failed_at_evaluation(root: Path) -> None:
    """summary.json says where the run failed; the package claims no test scores and no success."""
    summary = _summary(root, "runs/kd")
    assert (summary["status"], summary["extra"]["failed_in"]) == ("failed", "evaluate")
    meta = json.loads((root / "runs/kd/model/metadata.json").read_text())
    assert meta["status"] == "failed" and meta["failed_in"] == "evaluate"
    assert "test_scores" not in meta and "gate" not in meta
    assert not list((root / "runs/kd").glob(".evaluation.json.*"))  # no temporary file left


def _copies_corpus(root: Path) -> None:
    """corpus.tsv with ten of its lines' targets replaced by their sources (nine of them fall in
    the training split)."""
    lines = _corpus_lines()
    for i in range(0, 60, 6):
        src = lines[i].split("\t")[0]
        lines[i] = f"{src}\t{src}"
    (root / "copies.tsv").write_text("\n".join(lines) + "\n")


def _loss_temperature_is_one(root: Path) -> None:
    from cvmkd_core.session import open_session

    session = open_session(root / "kd.toml", ["distill.loss.temperature=1.0"])
    loss = session.recipe.distill.config.loss  # type: ignore[attr-defined]
    assert (loss.name, loss.config.temperature, loss.config.alpha) == ("kd", 1.0, 0.8)


def _report_says_summary_damaged(root: Path) -> None:
    report = json.loads((root / "out/report.json").read_text())
    assert "summary.json is damaged (unreadable): how the run ended is unknown" in json.dumps(report)


def _stopped_by_sigterm_at_step_4(root: Path) -> None:
    summary = _summary(root)
    assert (summary["status"], summary["final_step"], summary["extra"]["signal"]) == ("interrupted", 4, "SIGTERM")
    entry, _ = CheckpointStore(root / "runs/toy/checkpoints").load("last")
    assert entry.step == 4
    assert main(toy("--resume", "--run-dir", "runs/toy", "--quiet")) == 0
    assert (_summary(root)["status"], _summary(root)["final_step"]) == ("completed", 6)


def _interrupted_while_finalizing(root: Path) -> None:
    summary = _summary(root)
    assert (summary["status"], summary["final_step"], summary["extra"]["failed_in"]) == ("interrupted", 6, "finalize")
    assert main(toy("--resume", "--run-dir", "runs/toy", "--quiet")) == 0
    assert _summary(root)["status"] == "completed"


def _assert_text(path: Path, text: str) -> None:
    assert path.read_text() == text


def _assert_lines(path: Path, count: int) -> None:
    lines = path.read_text().splitlines()
    assert len(lines) == count and all(line.strip() for line in lines)


def _assert_mode(path: Path, mode: int) -> None:
    assert path.stat().st_mode & 0o777 == mode and path.read_text() != "old\n"


def _chmod(name: str, mode: int) -> Callable[[Path], None]:
    def step(root: Path) -> None:
        (root / name).chmod(mode)

    return step


def _no_summary(root: Path) -> None:
    assert not (root / "runs/toy/summary.json").exists()


def _gate_not_enforced(root: Path) -> None:
    gate = json.loads((root / "runs/toy/summary.json").read_text())["gate"]
    assert gate["passed"] is False and gate["enforced"] is False


# --- the catalogue -------------------------------------------------------------------------------


@attrs.frozen
class Case:
    id: str
    argv: list[str]
    #: the exact stderr, one line without "\n"; "{cwd}" stands for the test's folder; "" for none
    stderr: str
    status: int
    setup: tuple[Callable[[Path], None], ...] = ()
    kd: bool = False
    #: path prefixes a command may rewrite (only the run a --resume continues)
    may_change: tuple[str, ...] = ()
    check: Callable[[Path], None] | None = None
    #: a warning the command must log (log lines are not part of stderr in-process)
    warning: str | None = None
    stdout: str | None = None
    xfail: str | None = None
    #: entry-point plugins to load (CVMKD_PLUGINS); none by default, "kd" for the kd cases
    plugins: str | None = None
    #: bytes the command reads on its standard input
    stdin: bytes | None = None


def toy(*args: str) -> list[str]:
    return ["run", "r.toml", "--plugin", "toy_hooks.py", *args]


def check(*args: str) -> list[str]:
    return ["check", *args, "--plugin", "toy_hooks.py"]


def kd(*args: str) -> list[str]:
    return ["run", "kd.toml", *args]


def raising(hook: str, *, check: Callable[[Path], None] | None = _summary_failed) -> Case:
    return Case(
        f"hook-raises-in-{hook}",
        toy("--plugin", "raiser.py"),
        f"error: {hook} in {{cwd}}/raiser.py:6 raised ValueError: boom; rerun with --debug for the traceback",
        1,
        setup=(_raiser(hook),),
        check=check,
    )


RUN_KEYS = "cache_dir, device, hook_files, keep_checkpoints, log_every, name, output_dir, precision, seed, steps, validate_every"

CASES: list[Case] = [
    # --- recipes (tests/test_recipe.py holds the full catalogue of recipe mistakes) ---
    Case(
        "malformed-toml",
        check("bad.toml"),
        "error: {cwd}/bad.toml: invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 5)",
        2,
        setup=(_write("bad.toml", "[run\nsteps = 1\n"),),
    ),
    Case(
        "unknown-key",
        check("bad.toml"),
        f"error: bad.toml: run: unknown key 'stesp'; known keys: {RUN_KEYS}",
        2,
        setup=(_write("bad.toml", TOY_RECIPE.replace("steps = 6", "stesp = 6")),),
    ),
    Case(
        "wrong-type",
        check("bad.toml"),
        "error: bad.toml: run.steps: expected an integer, got string 'six'",
        2,
        setup=(_write("bad.toml", TOY_RECIPE.replace("steps = 6", 'steps = "six"')),),
    ),
    Case(
        "out-of-range",
        check("bad.toml"),
        "error: bad.toml: run.validate_every: must be > 0, got 0",
        2,
        setup=(_write("bad.toml", TOY_RECIPE.replace("validate_every = 3", "validate_every = 0")),),
    ),
    Case(
        "unknown-metric",
        toy("--set", 'validation.metrics=["exact", "blue"]'),
        "error: r.toml: validation.metrics[1]: unknown metric 'blue'; available: exact",
        2,
    ),
    Case(
        "unknown-trainer",
        toy("--set", "distill.name=toyy"),
        "error: r.toml: distill: unknown trainer 'toyy'; available: toy",
        2,
    ),
    Case(
        "unknown-composite-score",
        toy("--set", "validation.composite={bleu = 1.0}"),
        "error: r.toml: validation.composite: no selected metric returns 'bleu'; available scores: exact",
        2,
    ),
    Case(
        "logger-file-outside-the-run",
        toy("--set", 'loggers=[{name="jsonl", file="../../victim.txt"}]'),
        "error: r.toml: loggers[0].file: must be a relative path inside the run directory, got '../../victim.txt'",
        2,
    ),
    Case(
        # [distill.loss] is absent: the settings go to the loss the trainer uses by default (kd)
        "set-a-default-components-setting",
        ["check", "kd.toml", "--set", "distill.loss.temperature=1.0"],
        "",
        0,
        kd=True,
        stdout="ok: kd.toml: 6 components (distill=kd, distill.loss=kd, loggers[0]=jsonl, corpus=files, "
        "student.model=cvm, teacher.model=cvm)",
        check=_loss_temperature_is_one,
    ),
    Case("set-without-equals", toy("--set", "run.steps"), "error: --set 'run.steps': expected section.key=value", 2),
    Case(
        "set-unknown-path",
        toy("--set", "run.stepz=3"),
        f"error: r.toml: run: unknown key 'stepz'; known keys: {RUN_KEYS}",
        2,
    ),
    Case(
        "set-below-a-value",
        toy("--set", "run.steps.max=3"),
        "error: --set 'run.steps.max=3': run.steps is not a table",
        2,
    ),
    Case("missing-recipe", ["run", "nope.toml"], "error: no such recipe file: {cwd}/nope.toml", 2),
    Case(
        "extends-missing-file",
        check("child.toml"),
        "error: {cwd}/child.toml: extends: no such recipe file: {cwd}/base.toml",
        2,
        setup=(_write("child.toml", 'extends = "base.toml"\n[run]\nsteps = 2\n'),),
    ),
    Case(
        "extends-cycle",
        check("a.toml"),
        "error: {cwd}/b.toml: extends: cycle a.toml -> b.toml -> a.toml",
        2,
        setup=(_write("a.toml", 'extends = "b.toml"\n'), _write("b.toml", 'extends = "a.toml"\n')),
    ),
    # --- corpora (read at run start by the kd trainer) ---
    Case(
        "corpus-missing-file",
        kd("--set", "corpus.train=missing.tsv"),
        "error: no such corpus file: missing.tsv",
        2,
        kd=True,
    ),
    Case(
        "corpus-empty-file",
        kd("--set", "corpus.train=empty.tsv"),
        "error: empty.tsv: no sentence pairs (empty file)",
        2,
        kd=True,
        setup=(_write("empty.tsv", ""),),
    ),
    Case(
        "corpus-misaligned-parallel",
        kd("--set", "corpus.format=parallel", "--set", "corpus.train=par"),
        "error: par.src has 3 lines but par.tgt has 2",
        2,
        kd=True,
        setup=(_write("par.src", "le chat\nle chien\nun oiseau\n"), _write("par.tgt", "the cat\nthe dog\n")),
    ),
    Case(
        "corpus-tsv-line-without-tab",
        kd("--set", "corpus.train=notab.tsv"),
        "error: notab.tsv: line 2: expected 2 tab-separated fields, got 1",
        2,
        kd=True,
        setup=(_write("notab.tsv", "le chat\tthe cat\nle chien the dog\n"),),
    ),
    Case(
        "corpus-tsv-extra-field",
        kd("--set", "corpus.train=extra.tsv"),
        "error: extra.tsv: line 2: expected 2 tab-separated fields, got 3 (a tab inside a sentence?)",
        2,
        kd=True,
        setup=(_write("extra.tsv", "le chat\tthe cat\nle chien\tthe\tdog\n"),),
    ),
    Case(
        "corpus-length-filter-is-logged",
        kd(
            "--set", "teacher.checkpoint=pkg", "--set", "corpus.max_words=3", "--set", "distill.batch_size=8", "--quiet"
        ),
        "",
        0,
        kd=True,
        setup=(_package("pkg"),),
        warning="corpus.tsv: dropped 23 of 52 training pairs longer than max_words = 3 words or with a length "
        "ratio above max_ratio = 3",
    ),
    Case(
        "corpus-untranslated-copies-are-logged",
        kd("--set", "teacher.checkpoint=pkg", "--set", "corpus.train=copies.tsv", "--quiet"),
        "",
        0,
        kd=True,
        setup=(_package("pkg"), _copies_corpus),
        warning="copies.tsv: 9 of 52 training pairs have identical source and target (untranslated copies?)",
    ),
    Case(
        "corpus-not-utf8",
        kd("--set", "corpus.train=latin1.tsv"),
        "error: latin1.tsv: line 2: invalid UTF-8 (byte 0xe9 at column 4)",
        2,
        kd=True,
        setup=(_write_bytes("latin1.tsv", "le chat\tthe cat\ncaf\xe9\tcoffee\n".encode("latin-1")),),
    ),
    # --- teacher packages (teacher.checkpoint) ---
    Case(
        "teacher-package-missing",
        kd("--set", "teacher.checkpoint=nopkg"),
        "error: no model package at nopkg, and no registered model named 'nopkg' (none installed)",
        2,
        kd=True,
    ),
    Case(
        "teacher-weights-truncated",
        kd("--set", "teacher.checkpoint=pkg"),
        "error: model package pkg: model.safetensors is damaged (sha256 mismatch)",
        2,
        kd=True,
        setup=(_package("pkg", _truncate_weights),),
    ),
    Case(
        "teacher-weights-header-damaged",
        kd("--set", "teacher.checkpoint=pkg"),
        "error: model package pkg: model.safetensors is damaged (Error while deserializing header: invalid JSON "
        "in header: invalid type: sequence, expected struct HashMetadata at line 1 column 0)",
        2,
        kd=True,
        setup=(_package("pkg", _break_weights_header),),
    ),
    Case(
        "teacher-config-missing",
        kd("--set", "teacher.checkpoint=pkg"),
        "error: model package pkg: config.json is missing",
        2,
        kd=True,
        setup=(_package("pkg", _remove_config),),
    ),
    Case(
        "batch-larger-than-the-corpus",
        kd("--set", "teacher.steps=2"),
        "error: the training set has 52 pairs, fewer than one batch of the teacher's batch_size = 64: lower it, "
        "or give max_tokens instead",
        2,
        kd=True,
    ),
    Case(
        "disk-full-while-finalizing",
        kd("--set", "teacher.checkpoint=pkg", "--plugin", "full_disk.py", "--quiet"),
        "error: cannot write runs/kd/evaluation.json: No space left on device",
        2,
        kd=True,
        setup=(_package("pkg"), _write("full_disk.py", FULL_DISK_AT_FINALIZE)),
        check=_finalize_failed_at_evaluation,
    ),
    Case(
        "resume-after-the-corpus-changed",
        kd(*TWO_STEP_TEACHER, "--set", "teacher.checkpoint=pkg", "--resume", "--run-dir", "runs/first"),
        "error: cannot resume runs/first: the corpus changed since the run started (52 training pairs then, "
        "44 now); restore it, or start a new run",
        2,
        kd=True,
        setup=(_package("pkg"), _first_kd_run_with_pkg, _shrink_corpus),
        may_change=("runs/first/summary.json", "runs/first/train.jsonl"),
    ),
    Case(
        "resume-after-the-teacher-changed",
        kd(*TWO_STEP_TEACHER, "--set", "teacher.checkpoint=pkg", "--resume", "--run-dir", "runs/first"),
        "error: cannot resume runs/first: the teacher changed since the run started (pkg then, pkg now: other "
        "weights); restore that teacher, or start a new run",
        2,
        kd=True,
        setup=(_package("pkg"), _first_kd_run_with_pkg, _retrain_pkg),
        may_change=("runs/first/summary.json", "runs/first/train.jsonl"),
    ),
    Case(
        "cache-disk-full-while-caching-the-teacher",
        kd(*TWO_STEP_TEACHER, "--plugin", "full_cache.py"),
        "error: cannot cache the trained teacher in cache/teachers: No space left on device; it is kept in "
        "runs/kd/teacher, and --resume continues from there once there is room",
        2,
        kd=True,
        setup=(_write("full_cache.py", FULL_CACHE_DISK),),
        check=_no_temporary_teacher,
    ),
    Case(
        "teacher-config-edited",
        kd("--set", "teacher.checkpoint=pkg"),
        "error: model package pkg: config.json does not match the sha256 recorded in metadata.json (edited or damaged)",
        2,
        kd=True,
        setup=(_package("pkg", _edit_config),),
    ),
    Case(
        "cached-tokenizer-edited",
        kd(*TWO_STEP_TEACHER, "--run-dir", "runs/second"),
        "error: cached tokenizer {glob:cache/tokenizers/*.model} does not match the sha256 recorded when it was "
        "written (edited or damaged); delete it and it is rebuilt",
        2,
        kd=True,
        setup=(_first_kd_run, _flip_a_byte("cache/tokenizers/*.model")),
    ),
    Case(
        "cached-teacher-outputs-edited",
        kd(*TWO_STEP_TEACHER, "--run-dir", "runs/second"),
        "error: cached teacher outputs {glob:cache/teacher-outputs/*/shard-*.safetensors} does not match the sha256 "
        "recorded when it was written (edited or damaged); delete it and it is rebuilt",
        2,
        kd=True,
        setup=(_first_kd_run, _flip_a_byte("cache/teacher-outputs/*/shard-*.safetensors")),
    ),
    Case(
        "cached-teacher-translations-edited",
        kd(*TWO_STEP_TEACHER, "--run-dir", "runs/second"),
        "error: cached teacher translations {glob:cache/teacher-translations/*.txt} does not match the sha256 "
        "recorded when it was written (edited or damaged); delete it and it is rebuilt",
        2,
        kd=True,
        setup=(_first_kd_run, _flip_a_byte("cache/teacher-translations/*.txt")),
    ),
    Case(
        "teacher-vocabulary-mismatch",
        kd("--set", "teacher.checkpoint=pkg"),
        "error: model package pkg: tokenizer has 24 pieces but the model expects 30",
        2,
        kd=True,
        setup=(_package("pkg", _swap_tokenizer),),
    ),
    # --- cvmkd translate: model packages and options ---
    Case(
        "translate-package-missing",
        ["translate", "--model", "nopkg"],
        "error: no model package at nopkg, and no registered model named 'nopkg' (none installed)",
        2,
    ),
    Case(
        "translate-weights-truncated",
        ["translate", "--model", "pkg", "-i", "in.txt", "-o", "runs/earlier/train.jsonl"],
        "error: model package pkg: model.safetensors is damaged (sha256 mismatch)",
        2,
        kd=True,
        setup=(_package("pkg", _truncate_weights), _write("in.txt", "le chat\n")),
    ),
    Case(
        "translate-tokenizer-mismatch",
        ["translate", "--model", "pkg", "-i", "in.txt"],
        "error: model package pkg: tokenizer has 24 pieces but the model expects 30",
        2,
        kd=True,
        setup=(_package("pkg", _swap_tokenizer), _write("in.txt", "le chat\n")),
    ),
    Case(
        "translate-input-missing",
        ["translate", "--model", "pkg", "-i", "missing.txt"],
        "error: --input missing.txt: no such file",
        2,
        kd=True,
        setup=(_package("pkg"),),
    ),
    Case(
        "translate-input-not-utf8",
        ["translate", "--model", "pkg", "-i", "latin1.txt", "-o", "out.txt"],
        "error: --input latin1.txt: line 1: invalid UTF-8 (byte 0xe9 at column 4)",
        2,
        kd=True,
        setup=(_package("pkg"), _write_bytes("latin1.txt", "caf\xe9 noir\n".encode("latin-1"))),
        check=lambda root: _absent(root, "out.txt"),
    ),
    Case(
        "translate-stdin-not-utf8",
        ["translate", "--model", "pkg"],
        "error: --input stdin: line 2: invalid UTF-8 (byte 0xe9 at column 4)",
        2,
        kd=True,
        setup=(_package("pkg"),),
        stdin="le chat\ncaf\xe9 noir\n".encode("latin-1"),
    ),
    Case(
        "translate-input-is-a-folder",
        ["translate", "--model", "pkg", "-i", "notes"],
        "error: --input notes: is a directory",
        2,
        kd=True,
        setup=(_package("pkg"),),
    ),
    Case(
        "translate-input-dev-null",
        ["translate", "--model", "pkg", "-i", "/dev/null", "-o", "empty.txt"],
        "",
        0,
        kd=True,
        setup=(_package("pkg"),),
        check=lambda root: _assert_text(root / "empty.txt", ""),
    ),
    Case(
        # a folder that cannot be written (read-only, or a file in the way: root ignores modes)
        "translate-output-folder-unwritable",
        ["translate", "--model", "pkg", "-i", "in.txt", "-o", "blocker/out.txt"],
        "error: --output blocker/out.txt: cannot write it (File exists)",
        2,
        kd=True,
        setup=(_package("pkg"), _write("in.txt", "le chat\n"), _write("blocker", "a file\n")),
    ),
    Case(
        "translate-output-keeps-its-permissions",
        ["translate", "--model", "pkg", "-i", "in.txt", "-o", "shared.txt"],
        "",
        0,
        kd=True,
        setup=(
            _package("pkg"),
            _write("in.txt", "le chat\n"),
            _write("shared.txt", "old\n"),
            _chmod("shared.txt", 0o644),
        ),
        may_change=("shared.txt",),
        check=lambda root: _assert_mode(root / "shared.txt", 0o644),
    ),
    Case(
        "translate-long-line-is-not-cut",
        ["translate", "--model", "pkg", "-i", "long.txt", "-o", "long.out"],
        "",
        0,
        kd=True,
        setup=(_package("pkg"), _write("long.txt", "le chat mange. " * 150 + "\n")),
        warning="line 1: 1350 pieces, more than the model reads at once (63): translated as 22 segments",
        check=lambda root: _assert_lines(root / "long.out", 1),
    ),
    Case(
        "translate-beam-too-wide",
        ["translate", "--model", "pkg", "--beam-size", "100000"],
        "error: --beam-size must be at most 64 (got 100000)",
        2,
    ),
    Case(
        "translate-unknown-device",
        ["translate", "--model", "pkg", "--device", "tpu"],
        "error: --device: unknown device 'tpu'; use auto, cpu, cuda or cuda:N",
        2,
        kd=True,
        setup=(_package("pkg"),),
    ),
    Case(
        "translate-batch-size-zero",
        ["translate", "--model", "pkg", "--batch-size", "0"],
        "error: --batch-size must be at least 1 (got 0)",
        2,
    ),
    # --- cvmkd monitor and cvmkd report: run directories ---
    Case("monitor-missing-run-dir", ["monitor", "runs/gone"], "error: no run directory at runs/gone", 2),
    Case(
        "monitor-folder-without-run",
        ["monitor", "notes"],
        "error: notes is not a run directory: it holds no recipe.toml, train.jsonl or teacher/",
        2,
    ),
    Case("report-missing-run-dir", ["report", "runs/gone"], "error: no run directory at runs/gone", 2),
    Case(
        "report-folder-without-run",
        ["report", "notes"],
        "error: notes is not a run directory: it holds none of recipe.toml, summary.json, train.jsonl",
        2,
    ),
    Case(
        "report-recipe-damaged",
        ["report", "runs/earlier"],
        "error: runs/earlier/recipe.toml is unreadable, so the run's reports are unknown: name them with --format",
        2,
        plugins="reports",
        setup=(_write("runs/earlier/recipe.toml", "[run\nname = "),),
        check=lambda root: _absent(root, "runs/earlier/reports"),
    ),
    Case(
        "report-summary-damaged",
        ["report", "runs/earlier", "--format", "json", "--out", "out"],
        "",
        0,
        plugins="reports",
        setup=(_write("runs/earlier/summary.json", '{"status": "comp'),),
        check=_report_says_summary_damaged,
        stdout="out/report.json\nout/plots/loss.png",
    ),
    Case(
        "report-unknown-format",
        ["report", "runs/earlier", "--format", "pdf"],
        "error: unknown reporter 'pdf'; available: html, json, markdown",
        2,
        plugins="reports",
    ),
    # --- run directories ---
    Case(
        "run-dir-parent-is-a-file",
        toy("--set", "run.output_dir=blocker"),
        "error: cannot write run directory blocker/toy: Not a directory",
        2,
        setup=(_write("blocker", "a file where a folder should be\n"),),
    ),
    Case(
        "sigterm-stops-after-the-step",
        toy("--plugin", "term.py", "--quiet"),
        "interrupted at step 4; continue with: cvmkd run r.toml --plugin toy_hooks.py --plugin term.py "
        "--resume --run-dir runs/toy",
        143,
        setup=(_write("term.py", TERM_AT_STEP_4),),
        check=_stopped_by_sigterm_at_step_4,
    ),
    Case(
        "ctrl-c-while-finalizing",
        toy("--plugin", "late.py", "--quiet"),
        "error: interrupted; continue with: cvmkd run r.toml --plugin toy_hooks.py --plugin late.py "
        "--resume --run-dir runs/toy",
        130,
        setup=(_write("late.py", CTRL_C_AT_FINALIZE),),
        check=_interrupted_while_finalizing,
    ),
    Case(
        "retention-gate-fails",
        toy(
            "--plugin",
            "half.py",
            "--set",
            'guard={name = "guard", score = "composite", gate_scores = ["composite"]}',
            "--quiet",
        ),
        "retention gate failed: student composite 50.0% of the teacher, below the threshold 90% (runs/toy)",
        3,
        plugins="guard",
        setup=(_write("half.py", HALF_AS_GOOD),),
    ),
    Case(
        "retention-gate-warns",
        toy(
            "--plugin",
            "half.py",
            "--set",
            'guard={name = "guard", score = "composite", gate_scores = ["composite"], gate_action = "warn"}',
            "--quiet",
        ),
        "retention gate failed: student composite 50.0% of the teacher, below the threshold 90% "
        "(a warning only: the recipe does not enforce the gate) (runs/toy)",
        0,
        plugins="guard",
        setup=(_write("half.py", HALF_AS_GOOD),),
        stdout="completed: runs/toy",
        check=_gate_not_enforced,
    ),
    Case(
        "run-dir-exists",
        toy(),
        "error: run directory runs/toy exists already; choose another run.name or --run-dir, "
        "or pass --resume to continue that run",
        2,
        setup=(_toy_run,),
    ),
    Case(
        "resume-folder-without-run",
        toy("--resume", "--run-dir", "notes"),
        "error: cannot resume: notes holds no run (recipe.toml is missing)",
        2,
    ),
    Case(
        "resume-missing-folder",
        toy("--resume", "--run-dir", "runs/gone"),
        "error: cannot resume: no run directory runs/gone",
        2,
    ),
    Case(
        "resume-changed-recipe",
        toy("--resume", "--run-dir", "runs/toy", "--set", "run.seed=9", "--set", "run.validate_every=2"),
        "error: cannot resume runs/toy: the recipe differs from the run's recipe.toml in run.seed 0 -> 9, "
        "run.validate_every 3 -> 2; resume with the run's own recipe (cvmkd run runs/toy/recipe.toml --plugin "
        "toy_hooks.py --resume --run-dir runs/toy), start a new run, or change only run.steps or run.device on resume",
        2,
        setup=(_toy_run,),
    ),
    Case(
        # a run started by an older cvmkd: its recipe.toml lacks settings added since, at their defaults
        "resume-after-new-settings-appeared",
        toy("--resume", "--run-dir", "runs/toy", "--quiet"),
        "",
        0,
        setup=(_toy_run, _drop_recipe_lines("exports = []", "keep_checkpoints = 2")),
        may_change=("runs/toy/",),
        stdout="completed: runs/toy",
    ),
    Case(
        "run-dir-in-use",
        toy("--resume", "--run-dir", "runs/toy"),
        "error: run directory runs/toy is in use by process 4242: wait for that run to end or stop it "
        "(Ctrl-C or kill -TERM), then --resume",
        2,
        setup=(_toy_run, _held_by_another_process),
        may_change=("runs/toy/.lock",),
    ),
    # --- checkpoints ---
    Case(
        "disk-full-while-checkpointing",
        toy("--plugin", "full_disk.py"),
        f"error: cannot write checkpoint {CKPT_6}: No space left on device",
        2,
        setup=(_write("full_disk.py", FULL_DISK_HOOKS),),
        check=_after_full_disk,
    ),
    Case(
        # a plugin's own write (an export, a report) meets a full disk: the same one line
        "disk-full-in-a-plugin",
        toy("--plugin", "full_export.py"),
        "error: cannot write runs/toy/export/model.bin: No space left on device",
        2,
        setup=(_write("full_export.py", FULL_DISK_IN_A_PLUGIN),),
    ),
    Case(
        "resume-last-checkpoint-damaged",
        toy("--resume", "--run-dir", "runs/toy"),
        "",
        0,
        setup=(_toy_run, _truncate(CKPT_6)),
        may_change=("runs/toy/",),
        check=_after_fallback,
        warning=f"checkpoint {CKPT_6} is damaged (sha256 mismatch); trying an earlier checkpoint",
        stdout="completed: runs/toy",
    ),
    Case(
        "resume-every-checkpoint-damaged",
        toy("--resume", "--run-dir", "runs/toy"),
        f"error: no usable checkpoint: checkpoint {CKPT_6} is damaged (sha256 mismatch); "
        f"checkpoint {CKPT_3} is damaged (sha256 mismatch)",
        2,
        setup=(_toy_run, _truncate(CKPT_6, CKPT_3)),
    ),
    Case(
        "resume-manifest-damaged",
        toy("--resume", "--run-dir", "runs/toy"),
        "error: runs/toy/checkpoints/manifest.json: damaged checkpoint manifest "
        "(Expecting value: line 1 column 1 (char 0))",
        2,
        setup=(_toy_run, _write("runs/toy/checkpoints/manifest.json", "not json\n")),
    ),
    Case(
        "resume-pickled-object",
        toy("--resume", "--run-dir", "runs/toy"),
        f"error: no usable checkpoint: checkpoint {CKPT_6} refused: it would unpickle exec, but a "
        "checkpoint may hold only tensors and plain values (torch.load with weights_only=True); "
        f"checkpoint {CKPT_3} refused: it would unpickle exec, but a checkpoint may hold only "
        "tensors and plain values (torch.load with weights_only=True)",
        2,
        setup=(_toy_run, _plant_pickles),
        check=_nothing_planted,
    ),
    # --- plugins: hook files that fail to load, and hooks that raise ---
    Case("hook-file-missing", toy("--plugin", "nohooks.py"), "error: no such hook file: nohooks.py", 2),
    Case(
        "hook-file-does-not-import",
        toy("--plugin", "broken.py"),
        "error: hook file broken.py failed to import: SyntaxError: '(' was never closed (broken.py, line 1)",
        2,
        setup=(_write("broken.py", "def cvmkd_step_end(state, result:\n"),),
    ),
    Case(
        "hook-name-misspelt",
        toy("--plugin", "typo.py"),
        "error: plugin file:{cwd}/typo.py: unknown hook 'cvmkd_stepend' (a misspelt name?); "
        "hooks are listed in docs/hooks.md",
        2,
        setup=(
            _write(
                "typo.py",
                "from cvmkd_core import hookimpl\n\n\n@hookimpl\ndef cvmkd_stepend(state, result):\n    pass\n",
            ),
        ),
    ),
    # cvmkd_register runs while plugins load: a PluginLoadError, exit 2, nothing written
    Case(
        "hook-raises-in-cvmkd_register",
        toy("--plugin", "raiser.py"),
        "error: plugin file:{cwd}/raiser.py: cvmkd_register failed: ValueError: boom",
        2,
        setup=(_raiser("cvmkd_register"),),
    ),
    raising("cvmkd_configure", check=_summary_failed),
    raising("cvmkd_run_start"),
    raising("cvmkd_step"),
    raising("cvmkd_step_end"),
    raising("cvmkd_validate"),
    raising("cvmkd_analyze"),
    raising("cvmkd_check_degradation"),
    raising("cvmkd_checkpoint"),
    raising("cvmkd_event"),
    # training completed but finalizing did not: summary.json says failed, and why
    raising("cvmkd_finalize", check=_summary_finalize_failed),
    # a resume that fails in a plugin records the failure in the resumed run's summary.json and
    # train.jsonl (the loop's doing); its checkpoints, validations and model are untouched
    attrs.evolve(
        raising("cvmkd_restore"),
        argv=toy("--plugin", "raiser.py", "--resume", "--run-dir", "runs/toy"),
        setup=(_toy_run, _raiser("cvmkd_restore")),
        may_change=("runs/toy/summary.json", "runs/toy/train.jsonl"),
    ),
]


def _params() -> list:
    return [
        pytest.param(case, id=case.id, marks=[pytest.mark.xfail(strict=True, reason=case.xfail)] if case.xfail else [])
        for case in CASES
    ]


#: the plugins every case loads: the translation stack, and the commands translate, monitor, report
BASE_PLUGINS = "nmt,validation,analysis,evaluation,monitor,reports"


@pytest.fixture(autouse=True)
def _plugins_for_the_catalogue(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the core's plugins and the translation stack's (the kd cases add kd), whatever else
    is installed."""
    monkeypatch.setenv("CVMKD_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("CVMKD_PLUGINS", BASE_PLUGINS)
    monkeypatch.delenv("CVMKD_BLOCK_PLUGINS", raising=False)
    # a hook file that patches the checkpoint writer is undone even if the run does not get to it
    monkeypatch.setattr(checkpoint_module, "atomic_write_bytes", checkpoint_module.atomic_write_bytes)


@pytest.mark.parametrize("case", _params())
def test_bad_input(
    case: Case,
    tmp_path: Path,
    teacher_package: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    root = tmp_path  # the current directory (tests/conftest.py)
    for path, text in EARLIER.items():
        _write(path, text)(root)
    _write("toy_hooks.py", TOY_HOOK_FILE)(root)
    _write("r.toml", TOY_RECIPE)(root)
    if case.kd:
        monkeypatch.setenv("CVMKD_PLUGINS", f"{BASE_PLUGINS},kd,kd-quantize")
        _write("kd.toml", KD_RECIPE)(root)
        _write("corpus.tsv", "\n".join(_corpus_lines()) + "\n")(root)
        (root / ".teacher").symlink_to(teacher_package)
    if case.plugins:
        monkeypatch.setenv("CVMKD_PLUGINS", f"{os.environ['CVMKD_PLUGINS']},{case.plugins}")
    for step in case.setup:
        step(root)
    capsys.readouterr()
    before = snapshot(root)
    assert "runs/earlier/summary.json" in before

    if case.stdin is not None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(case.stdin)))
    caplog.clear()
    caplog.set_level(logging.INFO, logger="cvmkd")
    try:
        status = main(case.argv)
    finally:
        _release_locks()
    out, err = capsys.readouterr()

    expected = case.stderr.replace("{cwd}", str(root))
    for pattern in re.findall(r"\{glob:([^}]+)\}", expected):  # a cached file's name: a content hash
        (match,) = root.glob(pattern)
        expected = expected.replace(f"{{glob:{pattern}}}", str(match.relative_to(root)))
    assert err == (expected + "\n" if expected else "")
    assert status == case.status
    if case.stdout is not None:
        assert out.strip() == case.stdout
    if case.warning is not None:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [case.warning]
    assert_intact(root, before, case.may_change)
    if case.check is not None:
        case.check(root)


def test_the_catalogue_is_complete() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) >= 30
    assert {f"hook-raises-in-{hook}" for hook in HOOK_ARGS} <= set(ids)


def test_every_case_is_in_the_reliability_doc() -> None:
    text = DOC.read_text()
    missing = [case.id for case in CASES if f"`{case.id}`" not in text]
    assert missing == []


def test_snapshot_notices_a_changed_or_missing_file(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("1")
    (tmp_path / "b").write_text("2")
    before = snapshot(tmp_path)
    (tmp_path / "a").write_text("changed")
    (tmp_path / "b").unlink()
    (tmp_path / "new").write_text("new files are allowed")
    with pytest.raises(AssertionError, match=r"a: changed.*b: missing"):
        assert_intact(tmp_path, before)
    assert_intact(tmp_path, before, may_change=("a", "b"))


def test_a_failure_outside_any_hook_keeps_the_plain_form() -> None:
    from cvmkd_core.cli import describe_failure

    def helper() -> None:
        raise KeyError("missing")

    def cvmkd_step_end() -> None:  # a hook implementation calling a helper that raises
        helper()

    try:
        helper()
    except KeyError as exc:
        line = describe_failure(exc)
    assert line == f"KeyError: 'missing' (at {__file__}:{helper.__code__.co_firstlineno + 1})"
    try:
        cvmkd_step_end()
    except KeyError as exc:
        line = describe_failure(exc)
    # the hook is named, at the line of the hook that was running
    assert (
        line == f"cvmkd_step_end in {__file__}:{cvmkd_step_end.__code__.co_firstlineno + 1} raised KeyError: 'missing'"
    )
    assert describe_failure(ValueError("two\nlines")) == "ValueError: two lines"


def test_a_manifest_that_cannot_be_written_deletes_no_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The manifest is written before pruned checkpoints are deleted: when it fails, the previous
    manifest still lists only files that exist."""
    import errno

    store = CheckpointStore(tmp_path / "checkpoints", keep=1)
    first = store.save(1, 1, {"core": {"step": 1}}, score=None)
    before = snapshot(tmp_path)

    def full_disk(path: Path, obj: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint_module, "atomic_write_json", full_disk)
    with pytest.raises(checkpoint_module.CheckpointError) as info:
        store.save(2, 2, {"core": {"step": 2}}, score=None)
    assert (
        str(info.value)
        == f"cannot write checkpoint manifest {store.directory / 'manifest.json'}: No space left on device"
    )
    assert_intact(tmp_path, before)
    entry, payload = store.load("last")
    assert (entry, payload) == (first, {"core": {"step": 1}})
