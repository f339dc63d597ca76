"""cvmkd's benchmark suite: training and decoding speed, every figure a ratio measured side by side
in one run on this machine (absolute numbers are context only).

    ./dev bench                                  # everything, about 5 minutes on 2 cores
    ./dev bench --only peak train                # some sections
    ./dev bench --out bench-results              # where the JSON goes (default: bench-results/)

Sections:

* ``peak``: the machine's matrix-product peak, bf16 and fp32 (GFLOP/s of large square products);
  the faster of the two is the yardstick for model FLOP utilisation (MFU). On a CPU without
  native bf16 (no AVX512-BF16 or AMX), bf16 is measured once on a small product: it runs through
  a generic path there, often 100x slower than fp32, and cvmkd trains in fp32.
* ``train``: a training step of the shipped teacher's architecture (6+6 layers, d=256, batches of
  about 8,000 tokens as ``recipes/teacher.toml``) and of the default student (``student-cpu``,
  32 sentence pairs) on real Bible batches: tokens/s, model FLOP/s and MFU against the peak;
  bf16 autocast against fp32 where the CPU has native bf16 (the arms alternate step by step); for
  the student also the default's step with top-16 KD at T=6 against cross-entropy alone, and with
  QAT, in the precision ``run.precision = "auto"`` picks here.
* ``loop``: cvmkd's training loop (``cvmkd run`` of a recipe, through every hook, logger and the
  step log) against a plain PyTorch loop with the same model, batches, optimizer, schedule and
  loss: the framework's overhead per step, between validations.
* ``quantize``: ``benchmarks/quantization.py`` on a finished run given by ``--run DIR`` (every
  quantization scheme against the run's fp32 student: size, speed at batch 32 and 1, BLEU and
  composite deltas); skipped without ``--run``.
* ``decode``: the shipped teacher decoding the test verses at batch 1 and 32: greedy with and
  without the key/value cache, beam 4, fp32 and dynamic int8; exactly 32 tokens per sentence for
  greedy (eos ignored), real outputs for beam.

Model FLOPs count the matrix products of the forward pass (2 per multiply-add, non-pad tokens
only, attention included) times 3 for forward + backward.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import cvmkd_nmt.hardware  # noqa: F401  (sets oneDNN's kernel cache before torch computes)
from cvmkd_nmt import kernels
from cvmkd_nmt.data.batching import Batch, BatchStream
from cvmkd_nmt.data.tokenizer import Tokenizer
from cvmkd_nmt.model.config import ModelConfig
from cvmkd_nmt.model.presets import preset
from cvmkd_nmt.model.transformer import CvmTransformer

SECTIONS = ("peak", "train", "loop", "ddp", "decode", "quantize")


def teacher_package() -> Path:
    from cvmkd_teacher_bible import PACKAGE

    return PACKAGE


def machine() -> dict[str, Any]:
    from cvmkd_nmt.hardware import cpu_has_fast_bf16

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": name,
        "threads": torch.get_num_threads(),
        "cpu_fast_bf16": cpu_has_fast_bf16(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


# --- peak ------------------------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype, n: int = 1536, repeats: int = 5) -> float:
    """GFLOP/s of (n x n) @ (n x n) products in ``dtype``: the median of ``repeats`` timings."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b)
        times.append((time.perf_counter() - started) / 4)
    return 2 * n**3 / statistics.median(times) / 1e9


def mixed_precision() -> str:
    """What ``run.precision = "auto"`` gives on this CPU: bf16 where it has native bf16 matrix
    instructions, else fp32 (bf16 products then run through a slow generic path)."""
    from cvmkd_nmt.hardware import resolve_precision

    return resolve_precision("auto", torch.device("cpu"))


def section_peak() -> dict[str, Any]:
    fp32 = statistics.median(matmul_peak(torch.float32) for _ in range(3))
    if mixed_precision() == "bf16":
        bf16 = statistics.median(matmul_peak(torch.bfloat16) for _ in range(3))
    else:  # without native bf16 a 1536-wide product takes seconds: one small measurement shows the ratio
        bf16 = matmul_peak(torch.bfloat16, n=256, repeats=1)
    best = max(bf16, fp32)
    return {
        "bf16_gflops": round(bf16, 1),
        "fp32_gflops": round(fp32, 1),
        "bf16_over_fp32": round(bf16 / fp32, 2),
        # the yardstick for MFU: the faster of the two, the precision cvmkd trains in here
        "peak_gflops": round(best, 1),
        "peak_precision": "bf16" if bf16 >= fp32 else "fp32",
    }


# --- data ------------------------------------------------------------------------------------------


def bible_ids(tokenizer: Tokenizer, pairs: int = 6000) -> tuple[list[list[int]], list[list[int]]]:
    from cvmkd_corpus_bible.bible import load_bible_pairs

    data = load_bible_pairs("fr-en")[:pairs]
    return tokenizer.encode([p[0] for p in data]), tokenizer.encode([p[1] for p in data])


def batches(tokenizer: Tokenizer, ids: Any, count: int, *, batch_size: int, max_tokens: int | None) -> list[Batch]:
    stream = BatchStream(
        ids[0],
        ids[1],
        pad_id=tokenizer.pad_id,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        batch_size=batch_size,
        max_tokens=max_tokens,
        max_len=256,
        seed=1,
    )
    return [next(stream) for _ in range(count)]


def forward_flops(config: ModelConfig, batch: Batch) -> float:
    """Matrix-product FLOPs of one teacher-forced forward pass over the batch's real tokens."""
    d, ff, v = config.d_model, config.d_ff, config.vocab_size
    src = batch.src.ne(config.pad_id).sum(1).double()
    tgt = batch.tgt_in.ne(config.pad_id).sum(1).double()
    s, t = float(src.sum()), float(tgt.sum())
    per_src = config.n_encoder_layers * (4 * d * d + 2 * d * ff)
    per_tgt = config.n_decoder_layers * (4 * d * d + 2 * d * d + 2 * d * ff) + d * v
    cross_kv = config.n_decoder_layers * 2 * d * d * s
    attention = (
        2
        * d
        * (
            config.n_encoder_layers * float((src * src).sum())
            + config.n_decoder_layers * (float((tgt * (tgt + 1) / 2).sum()) + float((tgt * src).sum()))
        )
    )
    return 2 * (per_src * s + per_tgt * t + cross_kv + attention)


# --- train -----------------------------------------------------------------------------------------


class Trainer:
    """One model, its optimizer and a training step as the ``kd``/``teacher`` trainers take it."""

    def __init__(
        self,
        config: ModelConfig,
        precision: str,
        kd: bool = False,
        seed: int = 0,
        qat: bool = False,
        compiled: bool = True,
        native_dropout: bool = True,
    ) -> None:
        from cvmkd_kd.loss import KDConfig, resolve_compile

        torch.manual_seed(seed)
        self.model = CvmTransformer(config).train()
        if qat:  # quantization-aware training's fake-quantized layers (the default's last 1,000 steps)
            from cvmkd_quant_torch import qat as fake_quant

            fake_quant.enable(self.model)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=True)
        self.precision = precision
        self.kd = kd
        # the loss's compiled vocabulary passes where a 10,000-step run takes them ("auto")
        self.compiled = compiled and resolve_compile("auto", device=torch.device("cpu"), steps=10_000)
        self.native_dropout = native_dropout  # cvmkd's C dropout kernel, or torch's operations
        self.config = (
            KDConfig(temperature=6.0, alpha=0.8, beta=0.2, label_smoothing=0.1)
            if kd
            else KDConfig(alpha=0.0, beta=1.0, label_smoothing=0.1)
        )

    def step(self, batch: Batch, topk: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
        from cvmkd_kd.loss import compiled_kernels, kd_loss
        from cvmkd_nmt.hardware import autocast

        kernels.enabled = self.native_dropout
        rows = batch.tgt_out.ne(0)
        started = time.perf_counter()
        with autocast(torch.device("cpu"), self.precision):
            logits = self.model(batch.src, batch.tgt_in, rows=rows)
        teacher = (topk[0][rows], topk[1][rows]) if topk is not None else None
        with compiled_kernels(self.compiled):
            out = kd_loss(logits, batch.tgt_out[rows], 0, teacher_topk=teacher, config=self.config)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started


def fake_topk(batch: Batch, vocab: int, k: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k teacher log-probabilities of the cache's shape (their values do not change the cost)."""
    g = torch.Generator().manual_seed(int(batch.tgt_out.sum()))
    lp = torch.log_softmax(torch.randn(*batch.tgt_out.shape, k, generator=g) * 3, -1).sort(-1, descending=True)[0]
    return lp - 0.1, torch.randint(3, vocab, (*batch.tgt_out.shape, k), generator=g)


def alternate(arms: dict[str, Callable[[Batch], float]], data: list[Batch]) -> dict[str, float]:
    """Seconds per step of each arm, the arms taking turns batch by batch (same machine state).
    Every batch is run once by every arm first: the first product of a new shape builds its
    kernel (see cvmkd_nmt.hardware), which training pays in its first epoch only. The order of
    the turns rotates from batch to batch: an arm that always ran after the same other arm (one
    that evicts the CPU's caches, say) would otherwise be measured slower or faster for it."""
    for batch in data:
        for run in arms.values():
            run(batch)
    names = list(arms)
    seconds = {name: 0.0 for name in arms}
    for i, batch in enumerate(data):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            seconds[name] += arms[name](batch)
    return {name: s / len(data) for name, s in seconds.items()}


def section_train(peak: dict[str, Any] | None, quick: bool) -> dict[str, Any]:
    tokenizer = Tokenizer.load(teacher_package() / "tokenizer.model")
    ids = bible_ids(tokenizer)
    teacher_config = ModelConfig.from_dict(json.loads((teacher_package() / "config.json").read_text()))
    student_config = preset("student-cpu", vocab_size=tokenizer.vocab_size)
    mixed = mixed_precision()  # bf16 where the CPU runs it natively, else fp32 (as cvmkd trains)
    out: dict[str, Any] = {}
    for name, config, kwargs, steps in (
        ("teacher", teacher_config, {"batch_size": 512, "max_tokens": 8000}, 4 if quick else 8),
        ("student", student_config, {"batch_size": 32, "max_tokens": None}, 12 if quick else 30),
    ):
        data = batches(tokenizer, ids, steps, **kwargs)
        arms: dict[str, Callable[[Batch], float]] = {}
        trainers = {"fp32": Trainer(config, "fp32")}
        if mixed == "bf16":
            trainers = {"bf16": Trainer(config, "bf16"), **trainers}
        arms.update({name: trainer.step for name, trainer in trainers.items()})
        if name == "student":
            kd = Trainer(config, mixed, kd=True)

            def kd_step(batch: Batch, kd: Trainer = kd, vocab: int = config.vocab_size) -> float:
                return kd.step(batch, fake_topk(batch, vocab))

            arms[f"{mixed} + top-16 KD"] = kd_step
            if kd.compiled:  # the same step with the loss's passes over the vocabulary eager
                eager = Trainer(config, mixed, kd=True, compiled=False)

                def eager_step(batch: Batch, eager: Trainer = eager, vocab: int = config.vocab_size) -> float:
                    return eager.step(batch, fake_topk(batch, vocab))

                arms[f"{mixed} + top-16 KD, eager loss"] = eager_step
            if kernels.dropout_kernel(torch.ones(1)) is not None:  # the same step with torch's dropout
                plain = Trainer(config, mixed, kd=True, native_dropout=False)

                def plain_step(batch: Batch, plain: Trainer = plain, vocab: int = config.vocab_size) -> float:
                    return plain.step(batch, fake_topk(batch, vocab))

                arms[f"{mixed} + top-16 KD, torch dropout"] = plain_step
            qat = Trainer(config, mixed, kd=True, qat=True)

            def qat_step(batch: Batch, qat: Trainer = qat, vocab: int = config.vocab_size) -> float:
                return qat.step(batch, fake_topk(batch, vocab))

            arms[f"{mixed} + top-16 KD + QAT"] = qat_step
        seconds = alternate(arms, data)
        flops = 3 * statistics.mean(forward_flops(config, b) for b in data)
        tokens = statistics.mean(int(b.src.ne(0).sum() + b.tgt_out.ne(0).sum()) for b in data)
        row: dict[str, Any] = {
            "parameters": sum(p.numel() for p in CvmTransformer(config).parameters()),
            "batch": f"{kwargs['max_tokens']} tokens" if kwargs["max_tokens"] else f"{kwargs['batch_size']} pairs",
            "tokens_per_step": round(tokens),
            "model_gflop_per_step": round(flops / 1e9, 2),
        }
        for arm, s in seconds.items():
            row[arm] = {
                "seconds_per_step": round(s, 4),
                "tokens_per_second": round(tokens / s),
                "model_gflops": round(flops / s / 1e9, 1),
            }
            if peak:
                row[arm]["mfu"] = round(flops / s / 1e9 / peak["peak_gflops"], 3)
        row["precision"] = mixed
        row["compiled_loss"] = next(iter(trainers.values())).compiled
        if f"{mixed} + top-16 KD, eager loss" in seconds:
            eager_loss = seconds[f"{mixed} + top-16 KD, eager loss"]
            row["compiled_loss_speedup"] = round(eager_loss / seconds[f"{mixed} + top-16 KD"], 2)
        if f"{mixed} + top-16 KD, torch dropout" in seconds:
            torch_dropout = seconds[f"{mixed} + top-16 KD, torch dropout"]
            row["dropout_kernel_speedup"] = round(torch_dropout / seconds[f"{mixed} + top-16 KD"], 2)
        if "bf16" in seconds:
            row["bf16_over_fp32"] = round(seconds["fp32"] / seconds["bf16"], 2)
        if f"{mixed} + top-16 KD" in seconds:
            row["kd_step_over_ce_step"] = round(seconds[f"{mixed} + top-16 KD"] / seconds[mixed], 2)
            row["qat_step_over_kd_step"] = round(
                seconds[f"{mixed} + top-16 KD + QAT"] / seconds[f"{mixed} + top-16 KD"], 2
            )
        out[name] = row
    return out


# --- loop ------------------------------------------------------------------------------------------

LOOP_RECIPE = """
[run]
name = "bench-loop"
steps = {steps}
validate_every = {steps}
seed = 1
keep_checkpoints = 1
cache_dir = "{cache}"

[corpus]
name = "bible"
direction = "fr-en"
valid_size = 20
test_size = 20

[tokenizer]
vocab_size = 6000

[distill]
name = "teacher"
batch_size = 32
learning_rate = 1e-3
warmup_steps = 100
label_smoothing = 0.1
test_beam_sizes = [1]

[distill.model]
name = "cvm"
preset = "student-cpu"

[validation]
metrics = ["bleu"]
"""


def cvmkd_loop(recipe: Path, run_dir: Path) -> tuple[float, float, Any]:
    """Seconds per step of ``cvmkd run`` (from its step log, the first steps left out), the
    trainer's own seconds per step within them, and the run's state."""
    from cvmkd_core.hookspecs import hookimpl
    from cvmkd_core.session import open_session, run_session

    session = open_session(recipe)
    captured: dict[str, Any] = {}

    class Capture:
        @hookimpl
        def cvmkd_setup(self, state: Any) -> None:
            captured["state"] = state

    session.plugins.pm.register(Capture())
    _, path = run_session(session, run_dir)
    log = [json.loads(line) for line in (path / "train.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r and "step" in r][2:]
    wall = (steps[-1]["time"] - steps[0]["time"]) / (len(steps) - 1)
    # the trainer's own time per step (model, loss, optimizer), measured inside the same steps
    inside = statistics.mean(r["seconds_per_step"] for r in steps[1:])
    return wall, inside, captured["state"]


def plain_loop(state: Any, steps: int) -> float:
    """The same training in a plain PyTorch loop: the run's data and stream seed, batch shapes,
    model config, optimizer, schedule, precision and loss, and nothing else. Seconds per step."""
    from cvmkd_kd.loss import KDConfig, kd_loss
    from cvmkd_kd.trainer import PAD_MULTIPLE, learning_rate_at, target_rows
    from cvmkd_nmt.hardware import autocast, resolve_precision

    data, seed = state.objects["data"], state.recipe.run.seed
    tokenizer, config = data.tokenizer, state.objects["model"].config
    torch.manual_seed(seed)
    model = CvmTransformer(config).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9, fused=True)
    stream = BatchStream(
        data.train_src,
        data.train_tgt,
        pad_id=tokenizer.pad_id,
        bos_id=tokenizer.bos_id,
        eos_id=tokenizer.eos_id,
        batch_size=32,
        max_len=min(128, config.max_len),
        seed=seed,
        pad_multiple=PAD_MULTIPLE,  # the trainer's batch shapes (see cvmkd_kd.trainer)
    )
    loss_config = KDConfig(alpha=0.0, beta=1.0, label_smoothing=0.1)
    cpu = torch.device("cpu")
    precision = resolve_precision(state.recipe.run.precision, cpu)
    stamps = []
    for step in range(steps):
        batch = next(stream)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, 1e-3, 100, "inverse_sqrt", steps)
        rows = target_rows(batch.tgt_out, tokenizer.pad_id)
        with autocast(cpu, precision):
            logits = model(batch.src, batch.tgt_in, rows=rows)
        out = kd_loss(logits, batch.tgt_out[rows], tokenizer.pad_id, config=loss_config)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(out.loss.detach())
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[2]) / (len(stamps) - 3)


def section_loop(quick: bool, cache: Path) -> dict[str, Any]:
    """cvmkd run of a cross-entropy recipe against a plain loop over the same batches. A first
    cvmkd run builds the kernels of every batch shape; then plain, cvmkd, plain are timed."""
    steps = 60 if quick else 150
    with tempfile.TemporaryDirectory(prefix="cvmkd-bench-") as tmp:
        recipe = Path(tmp) / "loop.toml"
        recipe.write_text(LOOP_RECIPE.format(steps=steps, cache=cache))
        _, _, state = cvmkd_loop(recipe, Path(tmp) / "warm-up")
        plain = [plain_loop(state, steps)]
        cvmkd_step, inside, _ = cvmkd_loop(recipe, Path(tmp) / "timed")
        plain.append(plain_loop(state, steps))
    plain_step = statistics.mean(plain)
    return {
        "steps": steps,
        "cvmkd_seconds_per_step": round(cvmkd_step, 4),
        "trainer_seconds_per_step": round(inside, 4),
        "plain_seconds_per_step": round(plain_step, 4),
        "plain_runs": [round(p, 4) for p in plain],
        # hooks, step log, progress, batching: the loop's time outside the trainer's step
        "overhead_in_run": round(cvmkd_step / inside - 1, 4),
        # against the separate plain loop: includes the trainer's bookkeeping, but also the
        # machine's drift between runs
        "overhead_vs_plain": round(cvmkd_step / plain_step - 1, 4),
    }


# --- ddp ---------------------------------------------------------------------------------------------


def _step_log(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "train.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r and "step" in r and "event" not in r]


def section_ddp(quick: bool, cache: Path) -> dict[str, Any]:
    """The same cross-entropy recipe (same global batches of 32) run by one process with every
    thread and by ``torchrun`` with two processes of half the threads each (gloo): seconds per
    step from each run's step log, the first steps (kernel builds) left out, and the largest
    difference between the two loss curves."""
    steps = 60 if quick else 150
    threads = torch.get_num_threads()
    half = max(threads // 2, 1)
    with tempfile.TemporaryDirectory(prefix="cvmkd-bench-") as tmp:
        recipe = Path(tmp) / "loop.toml"
        recipe.write_text(LOOP_RECIPE.format(steps=steps, cache=cache))
        env = {**os.environ, "PYTHONWARNINGS": "ignore", "CVMKD_DIST_BACKEND": "gloo"}
        runs = {
            f"1 process x {threads} threads": ([sys.executable, "-m", "cvmkd_core"], threads),
            f"2 processes x {half} threads": (
                [
                    sys.executable,
                    "-m",
                    "torch.distributed.run",
                    "--standalone",
                    "--nproc_per_node=2",
                    "-m",
                    "cvmkd_core",
                ],
                half,
            ),
        }
        out: dict[str, Any] = {"steps": steps}
        logs = {}
        for name, (command, count) in runs.items():
            run_dir = Path(tmp) / name.replace(" ", "-")
            done = subprocess.run(
                [*command, "run", str(recipe), "--quiet", "--run-dir", str(run_dir)],
                env={**env, "OMP_NUM_THREADS": str(count)},
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                raise RuntimeError(f"ddp: {name} failed: {done.stderr.strip().splitlines()[-1:]}")
            logs[name] = _step_log(run_dir)
            later = logs[name][steps // 3 :]
            out[name] = {
                "seconds_per_step": round((later[-1]["time"] - later[0]["time"]) / (len(later) - 1), 4),
            }
        one, two = logs.values()
        out["two_over_one_speed"] = round(
            out[next(iter(runs))]["seconds_per_step"] / out[list(runs)[1]]["seconds_per_step"], 3
        )
        out["largest_loss_difference"] = round(max(abs(a["loss"] - b["loss"]) for a, b in zip(one, two)), 5)
    return out


# --- decode ----------------------------------------------------------------------------------------


def section_decode(quick: bool) -> dict[str, Any]:
    from cvmkd_corpus_bible.bible import bible_splits
    from cvmkd_nmt.model.decoding import beam_search, greedy_decode, timed_decode
    from cvmkd_nmt.model.package import load_package
    from cvmkd_nmt.model.translate import source_batches
    from cvmkd_nmt.quantized import LayerChoice, apply_plan, quantizable_layers

    model, tokenizer, _ = load_package(teacher_package())
    fp32 = model.float().eval()
    int8 = copy.deepcopy(fp32)
    apply_plan(int8, {name: LayerChoice("dynamic-int8") for name in quantizable_layers(int8)})
    test = bible_splits("fr-en", 1000, 1000)[2]
    sources = [p[0] for p in test]
    n1, n32 = (16, 128) if quick else (40, 256)

    def greedy(m: Any, size: int, cache: bool) -> float:
        data = source_batches(tokenizer, sources[: n1 if size == 1 else n32], 256, size)
        if cache:
            seconds = sum(timed_decode(m, b, 32) for b in data)
        else:  # re-running the whole decoder each step: greedy_decode without the cache, 32 tokens
            seconds = 0.0
            for b in data:
                started = time.perf_counter()
                greedy_decode(m, b, max_len_a=0.0, max_len_b=32, use_cache=False)
                seconds += time.perf_counter() - started
        return sum(b.size(0) for b in data) * 32 / seconds

    def beam(m: Any, size: int) -> float:
        data = source_batches(tokenizer, sources[: (n1 if size == 1 else n32) // 2], 256, size)
        started, tokens = time.perf_counter(), 0
        for b in data:
            tokens += sum(len(h) + 1 for h in beam_search(m, b, beam_size=4))
        return tokens / (time.perf_counter() - started)

    def torch_products(size: int, m: Any = fp32) -> float:
        """Greedy decoding with every product through torch (no C row products for one sentence)."""
        kernels.enabled = False
        try:
            return greedy(m, size, True)
        finally:
            kernels.enabled = True

    out: dict[str, Any] = {}
    for size in (1, 32):
        greedy(fp32, size, True)  # warm-up
        # the two fp32 arms alternate, best of two each: this VM's speed drifts within minutes
        plain = torch_products(size)
        fast = greedy(fp32, size, True)
        plain = max(plain, torch_products(size))
        fast = max(fast, greedy(fp32, size, True))
        row = {
            "greedy fp32": fast,
            "greedy fp32, torch products": plain,
            "greedy int8": greedy(int8, size, True),
            "greedy int8, torch products": torch_products(size, int8),
            "greedy fp32, no cache": greedy(fp32, size, False),
            "beam 4 fp32": beam(fp32, size),
            "beam 4 int8": beam(int8, size),
        }
        out[f"batch {size}"] = {k: round(v, 1) for k, v in row.items()}
        out[f"batch {size}"]["int8_over_fp32"] = round(row["greedy int8"] / row["greedy fp32"], 2)
        out[f"batch {size}"]["cache_speedup"] = round(row["greedy fp32"] / row["greedy fp32, no cache"], 2)
        out[f"batch {size}"]["row_kernel_speedup"] = round(row["greedy fp32"] / row["greedy fp32, torch products"], 2)
    return out


# --- main ------------------------------------------------------------------------------------------


def print_table(results: dict[str, Any]) -> None:
    info = results["machine"]
    print(f"\n## cvmkd benchmarks: {info['cpu']}, {info['threads']} threads, torch {info['torch']}\n")
    if "peak" in results:
        p = results["peak"]
        print(
            f"matrix-product peak: bf16 {p['bf16_gflops']} GFLOP/s, fp32 {p['fp32_gflops']} GFLOP/s ({p['bf16_over_fp32']}x)"
            f"; MFU is measured against the {p['peak_precision']} peak\n"
        )
    if "train" in results:
        print("| model | batch | precision | s/step | tokens/s | model GFLOP/s | MFU |")
        print("|---|---|---|---|---|---|---|")
        for name, row in results["train"].items():
            for arm in row:
                if isinstance(row[arm], dict):
                    r = row[arm]
                    mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else "-"
                    print(
                        f"| {name} ({row['parameters'] / 1e6:.1f}M) | {row['batch']} | {arm} | {r['seconds_per_step']:.3f} "
                        f"| {r['tokens_per_second']} | {r['model_gflops']} | {mfu} |"
                    )
            extra = (
                f", KD step / CE step {row['kd_step_over_ce_step']}x, QAT step / KD step {row['qat_step_over_kd_step']}x"
                if "kd_step_over_ce_step" in row
                else ""
            )
            if "compiled_loss_speedup" in row:
                extra += (
                    f"; the KD step with the compiled loss is {row['compiled_loss_speedup']}x the eager loss's speed"
                )
            if "dropout_kernel_speedup" in row:
                extra += f", with the C dropout kernel {row['dropout_kernel_speedup']}x torch's dropout's"
            speed = (
                f"bf16 is {row['bf16_over_fp32']}x fp32"
                if "bf16_over_fp32" in row
                else "no native bf16 on this CPU: trained in fp32"
            )
            print(f"\n{name}: {speed}{extra}")
        print()
    if "loop" in results:
        r = results["loop"]
        print(
            f"training loop: cvmkd {r['cvmkd_seconds_per_step']:.4f} s/step, of which the trainer's step "
            f"{r['trainer_seconds_per_step']:.4f}: loop overhead {100 * r['overhead_in_run']:+.1f}%; "
            f"a plain PyTorch loop {r['plain_seconds_per_step']:.4f} s/step ({100 * r['overhead_vs_plain']:+.1f}%)\n"
        )
    if "ddp" in results:
        r = results["ddp"]
        names = [k for k in r if isinstance(r[k], dict)]
        print(
            "data-parallel (torchrun, same global batches): "
            + ", ".join(f"{n} {r[n]['seconds_per_step']:.4f} s/step" for n in names)
            + f": two processes run {r['two_over_one_speed']}x the speed of one; loss curves differ by at most "
            f"{r['largest_loss_difference']} (their dropout draws differ)\n"
        )
    if "decode" in results:
        rows = list(next(iter(results["decode"].values())))
        print("| tokens/s | " + " | ".join(rows) + " |")
        print("|---" * (len(rows) + 1) + "|")
        for size, row in results["decode"].items():
            print(f"| {size} | " + " | ".join(str(row[k]) for k in rows) + " |")
        print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--quick", action="store_true", help="fewer steps and sentences (a smoke test)")
    parser.add_argument("--run", type=Path, help="a finished run for the quantize section (e.g. runs/default)")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("CVMKD_BENCH_CACHE", ".cvmkd-cache")))
    args = parser.parse_args(argv)
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M")}
    if "peak" in args.only or "train" in args.only:
        results["peak"] = section_peak()
    if "train" in args.only:
        results["train"] = section_train(results.get("peak"), args.quick)
    if "loop" in args.only:
        results["loop"] = section_loop(args.quick, args.cache.resolve())
    if "ddp" in args.only:
        results["ddp"] = section_ddp(args.quick, args.cache.resolve())
    if "decode" in args.only:
        results["decode"] = section_decode(args.quick)
    if "quantize" in args.only:
        if args.run is None:
            print("quantize: skipped (give a finished run with --run DIR, e.g. --run runs/default)")
        else:
            import quantization

            quick = ["--test", "100", "--repeats", "1", "--only", "int8"] if args.quick else []
            results["quantize"] = quantization.measure([str(args.run), *quick])
            quantization.print_table(results["quantize"]["schemes"])
    results["seconds"] = round(time.perf_counter() - started, 1)
    print_table(results)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written {path} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
