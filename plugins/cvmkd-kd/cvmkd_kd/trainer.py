"""The sequence-to-sequence trainers: ``teacher`` (label-smoothed cross-entropy) and ``kd`` (the
student, distilled with the recipe's loss from a teacher that is loaded, reused or trained first).
"""

from __future__ import annotations

import inspect
import logging
import math
import random
import time
from pathlib import Path
from typing import Any

import attrs
import torch

from cvmkd_core.config import ge, gt, one_of
from cvmkd_core.errors import ModelError
from cvmkd_core.hookspecs import hookimpl
from cvmkd_core.recipe import component_ref
from cvmkd_core.stash import NamedStash, StashKey
from cvmkd_core.state import RunState, RunSummary, StepResult
from cvmkd_kd.config import TeacherConfig
from cvmkd_kd.data import RunData, prepare_data
from cvmkd_kd.loss import compiled_kernels, resolve_compile
from cvmkd_kd.sequence import SequenceKDConfig
from cvmkd_nmt.data.batching import Batch, BatchStream, padded_width
from cvmkd_nmt.errors import CorpusError
from cvmkd_nmt.hardware import autocast, describe_hardware, resolve_device, resolve_precision
from cvmkd_nmt.model.presets import count_parameters
from cvmkd_nmt.model.translate import translate
from cvmkd_validation.contract import TranslationTrainer

LossRef = component_ref("loss")

log = logging.getLogger("cvmkd")

#: the trainer's part of a checkpoint: model, optimizer, data position and what the data was
TRAINER_STATE: StashKey[dict[str, Any]] = StashKey("trainer")
#: ``summary.json`` ``extra.trainer``: the models, the teacher, the hardware, the data
TRAINER_INFO: StashKey[dict[str, Any]] = StashKey("trainer")
#: ``extra.averaging``: the checkpoints the final weights average, or why none
AVERAGING: StashKey[dict[str, Any]] = StashKey("averaging")


@attrs.frozen
class KDTrainerConfig:
    """``[distill]`` with ``name = "kd"``: how the student is trained."""

    batch_size: int = attrs.field(default=32, validator=gt(0))
    max_tokens: int = attrs.field(default=0, validator=ge(0))
    learning_rate: float = attrs.field(default=1e-3, validator=gt(0))
    warmup_steps: int = attrs.field(default=1000, validator=ge(0))
    schedule: str = attrs.field(default="inverse_sqrt", validator=one_of("inverse_sqrt", "linear", "constant"))
    weight_decay: float = attrs.field(default=0.0, validator=ge(0))
    clip_norm: float = attrs.field(default=1.0, validator=ge(0))
    max_len: int = attrs.field(default=128, validator=gt(0))
    loss: LossRef = attrs.field(factory=lambda: LossRef(name="kd"))  # type: ignore[valid-type]
    teacher_outputs: str = attrs.field(default="cached", validator=one_of("cached", "live"))
    """cached: run the teacher once over the training set and keep its top-k; live: every step"""
    topk: int = attrs.field(default=16, validator=gt(0))
    sequence: SequenceKDConfig = attrs.field(factory=SequenceKDConfig)
    """sequence-level KD: train on the teacher's translations (``[distill.sequence]``)"""
    compile: str = attrs.field(default="auto", validator=one_of("auto", "on", "off"))
    """compile the loss's passes over the vocabulary (torch.compile, CPU): auto: on for CPU runs
    of at least 1,000 steps where a C++ compiler is found"""


#: training batches are padded to a width that is a multiple of this, and the target positions
#: projected onto the vocabulary are rounded up to a multiple of ROWS_MULTIPLE with padding
#: positions (the loss ignores them): the CPU builds a matrix-product kernel for each new shape
#: and keeps it, so exact widths and counts (a new shape at almost every step) made the kernel
#: cache, and the memory holding it, grow all run long (measured: 9 GB resident at step 1,800 of
#: the default recipe; with the rounding, flat at 1.4 GB after 100 steps of the same batches)
PAD_MULTIPLE = 8
ROWS_MULTIPLE = 64


def target_rows(tgt_out: torch.Tensor, pad_id: int, multiple: int = ROWS_MULTIPLE) -> torch.Tensor:
    """The (B, T) mask of the positions whose logits the loss needs: every non-pad target, and
    as many padding positions as round their count up to a multiple of ``multiple`` (while there
    are padding positions to take), so that the projection onto the vocabulary repeats shapes."""
    rows = tgt_out.ne(pad_id)
    short = -int(rows.sum()) % multiple
    if short:
        spare = (~rows).flatten().nonzero().flatten()[:short]
        rows = rows.flatten().index_fill(0, spare, True).view(rows.shape)
    return rows


def learning_rate_at(step: int, base: float, warmup: int, schedule: str, total: int) -> float:
    """Linear warmup over ``warmup`` steps, then the schedule's decay."""
    s = step + 1
    if warmup and s <= warmup:
        return base * s / warmup
    if schedule == "inverse_sqrt":
        return base * math.sqrt(max(warmup, 1) / s)
    if schedule == "linear":
        return base * max(0.0, (total - step) / max(total - warmup, 1))
    return base


class Seq2SeqTrainer(TranslationTrainer):
    """Trains a cvm model on the corpus; validation and test scoring translate with it."""

    role = "student"
    #: under torchrun, every rank trains (cvmkd_core.distributed)
    cvmkd_all_ranks = True

    def __init__(self, config: Any) -> None:
        self.config = config
        self.model: Any = None
        #: the model wrapped in DistributedDataParallel when several processes train it
        self.ddp: Any = None
        self.teacher: Any = None
        self.teacher_tokenizer: Any = None
        self.data: RunData | None = None
        self.stream: BatchStream | None = None
        self.cache: Any = None
        self.teacher_info: dict[str, Any] = {}
        #: what the summary records of this trainer (``extra.trainer``): model, device, hardware...
        self.run_info: dict[str, Any] = {}
        #: what the weights started from (``init_from``'s package, or the teacher's layers), when
        #: not the model's own initialisation
        self.initialised_from: dict[str, Any] = {}
        self.scaler: Any = None
        self._ce_config: Any = None
        self._rows: bool | None = None
        self.compiled = False

    # --- set-up ---------------------------------------------------------------------------------

    def _model_component(self, state: RunState) -> Any:
        return state.components[f"{self.role}.model"]

    def _prepare(self, state: RunState) -> None:
        """Models, tokenizer and data; subclasses add the teacher."""
        self.data = prepare_data(state)

    @hookimpl
    def cvmkd_setup(self, state: RunState) -> None:
        recipe = state.recipe
        world = state.world
        self.device = resolve_device(recipe.run.device)
        if world.size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", world.local_rank)  # one GPU per process
        if world.size > 1 and self.config.batch_size < world.size and not self.config.max_tokens:
            raise CorpusError(
                f"distill.batch_size = {self.config.batch_size} is the global batch, shared by "
                f"{world.size} processes: it must be at least {world.size}"
            )
        self.precision = resolve_precision(recipe.run.precision, self.device)
        self.compiled = resolve_compile(self.config.compile, device=self.device, steps=recipe.run.steps)
        self._prepare(state)
        assert self.data is not None
        # seeded after preparing: training a teacher first must not change the student's start
        torch.manual_seed(recipe.run.seed)
        random.seed(recipe.run.seed)
        tokenizer = self.data.tokenizer
        component = self._model_component(state)
        special = {"pad_id": tokenizer.pad_id, "bos_id": tokenizer.bos_id, "eos_id": tokenizer.eos_id}
        accepts = inspect.signature(component.build).parameters
        options: dict[str, Any] = {}
        if special != {"pad_id": 0, "bos_id": 1, "eos_id": 2} and "special_ids" in accepts:
            options["special_ids"] = special
        if "teacher" in accepts:  # a student built from its teacher (its family, its weights)
            options["teacher"] = self.teacher
        self.model = component.build(tokenizer.vocab_size, **options)
        self._initial_weights(state)
        self.model = self.model.to(self.device)
        self._model_ready(state)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=self.config.learning_rate,
            betas=(0.9, 0.98),
            eps=1e-9,
            weight_decay=self.config.weight_decay,
            fused=True,  # one kernel for all parameters, on CPU and CUDA alike
        )
        if self.precision == "fp16":
            self.scaler = torch.amp.GradScaler("cuda")
        pairs = len(self.data.train_src)
        if not self.config.max_tokens and pairs < self.config.batch_size:
            raise CorpusError(
                f"the training set has {pairs} pairs, fewer than one batch of the {self.role}'s "
                f"batch_size = {self.config.batch_size}: lower it, or give max_tokens instead"
            )
        self.stream = BatchStream(
            self.data.train_src,
            self.data.train_tgt,
            pad_id=tokenizer.pad_id,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
            batch_size=self.config.batch_size,
            max_tokens=self.config.max_tokens or None,
            max_len=self._max_len(),
            seed=recipe.run.seed,
            pad_multiple=PAD_MULTIPLE,
        )
        state.batches = self.stream
        state.objects.update(model=self.model, tokenizer=tokenizer, data=self.data, role=self.role)
        parameters = count_parameters(self.model)
        self.run_info = {
            "role": self.role,
            "parameters": parameters,
            "device": str(self.device),
            "precision": self.precision,
            "compiled_loss": self.compiled,
            "hardware": describe_hardware(self.device),
            "model_config": self.model.config.to_dict(),
            **({"teacher": self.teacher_info} if self.teacher_info else {}),
            **({"initialised_from": self.initialised_from} if self.initialised_from else {}),
            **({"initialised": init} if (init := getattr(self.model, "initialised", None)) else {}),
            **({"distributed": self._distributed_info(world)} if world.size > 1 else {}),
        }
        log.info(
            "%s: %s parameters, %s on %s, %d steps of %s",
            self.role,
            f"{parameters:,}",
            self.precision,
            self.device,
            recipe.run.steps,
            f"{self.config.batch_size} sentences"
            if not self.config.max_tokens
            else f"≤{self.config.max_tokens} tokens",
        )

    def _initial_weights(self, state: RunState) -> None:
        """Load the weights training starts from (the model's own initialisation by default)."""

    # --- several processes (torchrun) -----------------------------------------------------------

    def _distribute(self, state: RunState) -> None:
        """Wrap the model for data-parallel training: every rank holds the same weights (rank 0's,
        broadcast here), computes gradients on its share of each global batch, and the gradients
        are averaged before the optimizer steps, so the ranks' weights stay equal. Done at the
        first step, which every rank reaches together (rank 0 sets up before the others)."""
        from torch.nn.parallel import DistributedDataParallel

        from cvmkd_core.distributed import rank_seed

        world = state.world
        cuda = self.device.type == "cuda"
        self.ddp = DistributedDataParallel(
            self.model,
            device_ids=[self.device.index] if cuda else None,
            # no buffer changes in training (torch 2.13's name; broadcast_buffers is deprecated)
            forward_sync_buffers=False,
        )
        torch.manual_seed(rank_seed(state.recipe.run.seed, world.rank, state.step))  # each rank its own dropout

    def _distributed_info(self, world: Any) -> dict[str, Any]:
        size = self.config.batch_size
        return {
            "world_size": world.size,
            "backend": world.backend,
            "global_batch": f"{self.config.max_tokens} tokens" if self.config.max_tokens else size,
            "per_rank": "its share of each global batch"
            if self.config.max_tokens
            else f"{size // world.size}-{-(-size // world.size)} sentences",
        }

    def _shard(self, batch: Batch, rank: int, size: int) -> tuple[Batch, bool]:
        """This rank's rows of the global batch (every rank draws the same global batches), with
        the columns only padding trimmed. A rank left without rows takes the first one, weighted
        zero: it must still take part in the gradient average. Returns (shard, has_rows)."""
        pad = self.data.tokenizer.pad_id  # type: ignore[union-attr]
        picked = list(range(rank, batch.size, size))
        owned = bool(picked)
        index = torch.tensor(picked or [0])

        def take(t: torch.Tensor) -> torch.Tensor:
            t = t.index_select(0, index)
            width = int(t.ne(pad).sum(dim=1).max()) if t.numel() else 0
            return t[:, : padded_width(max(width, 1), PAD_MULTIPLE, t.shape[1])]

        src, tgt_in, tgt_out = take(batch.src), take(batch.tgt_in), take(batch.tgt_out)
        tgt_in = tgt_in[:, : tgt_out.shape[1]]
        shard = Batch(
            src=src,
            tgt_in=tgt_in,
            tgt_out=tgt_out,
            n_tokens=int(tgt_out.ne(pad).sum()) if owned else 0,
            indices=batch.indices.index_select(0, index) if batch.indices is not None else None,
        )
        return shard, owned

    @hookimpl
    def cvmkd_check(self, state: RunState) -> None:
        component = state.components.get(f"{self.role}.model")
        if state.recipe.section("quantize") and component is not None and not getattr(component, "quantizable", True):
            raise ModelError(
                f"[[quantize]] works on cvm students; a {getattr(component, 'family', 'non-cvm')} student is "
                'quantized when exported: [[exports]] name = "ctranslate2", quantization = "int8" (docs/export.md)'
            )

    # --- the step -------------------------------------------------------------------------------

    def _takes_rows(self) -> bool:
        """Whether the model can project only the target positions and the loss take them
        alone: ``rows=`` in the model's forward, ``accepts_rows`` on the loss."""
        if self._rows is None:
            forward = inspect.signature(self.model.forward).parameters
            self._rows = "rows" in forward and self._loss_accepts_rows()
        return self._rows

    def _loss_accepts_rows(self) -> bool:
        return True  # the trainer's own cross-entropy: kd_loss takes rows

    def _loss(self, state: RunState, batch: Batch, logits: torch.Tensor, rows: torch.Tensor | None = None) -> Any:
        from cvmkd_kd.loss import KDConfig, kd_loss

        if self._ce_config is None:
            self._ce_config = KDConfig(alpha=0.0, beta=1.0, label_smoothing=self.config.label_smoothing)
        targets = batch.tgt_out if rows is None else batch.tgt_out[rows]
        return kd_loss(logits, targets, self.data.tokenizer.pad_id, config=self._ce_config)  # type: ignore[union-attr]

    @hookimpl(trylast=True)
    def cvmkd_step(self, state: RunState, batch: Batch) -> StepResult:
        started = time.perf_counter()
        lr = (
            learning_rate_at(
                state.step, self.config.learning_rate, self.config.warmup_steps, self.config.schedule, state.total_steps
            )
            * state.lr_scale
        )
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        world = state.world
        if world.size > 1 and self.ddp is None:
            self._distribute(state)
        global_tokens, owned = batch.n_tokens, True
        if world.size > 1:
            batch, owned = self._shard(batch, world.rank, world.size)
        on_device = batch.to(self.device)
        # the logits of the target positions alone: padding costs no product with the vocabulary
        rows = target_rows(on_device.tgt_out, self.data.tokenizer.pad_id) if self._takes_rows() else None  # type: ignore[union-attr]
        extra = {"rows": rows} if rows is not None else {}
        with autocast(self.device, self.precision):
            logits = (self.ddp or self.model)(on_device.src, on_device.tgt_in, **extra)
        with compiled_kernels(self.compiled):
            out = self._loss(state, on_device, logits, rows)
        loss = out.loss
        if world.size > 1:
            # each rank's loss is its tokens' mean and the gradients are averaged over ranks:
            # weighting by the rank's share of the tokens gives the global batch's mean
            loss = loss * ((batch.n_tokens if owned else 0) * world.size / max(global_tokens, 1))
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        clip = self.config.clip_norm if self.config.clip_norm > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        values = {"loss": float(out.loss.detach()), "ce": float(out.ce), "token_accuracy": float(out.token_accuracy)}
        if self.role == "student":
            values["kd"] = float(out.kd)
            if out.teacher_agreement is not None:
                values["teacher_agreement"] = float(out.teacher_agreement)
        if world.size > 1:  # the global batch's figures: token-weighted means over the ranks
            values = _global_means(values, batch.n_tokens if owned else 0, self.device)
        seconds = time.perf_counter() - started
        tokens = global_tokens if world.size > 1 else out.n_tokens
        metrics = {
            "ce": values["ce"],
            "token_accuracy": values["token_accuracy"],
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
            "seconds_per_step": seconds,
            "epoch": self.stream.epoch if self.stream is not None else 0,
        }
        metrics.update({k: v for k, v in values.items() if k in ("kd", "teacher_agreement")})
        return StepResult(loss=values["loss"], metrics=metrics)

    # --- checkpoints ----------------------------------------------------------------------------

    @hookimpl
    def cvmkd_checkpoint(self, state: RunState, record: Any, payload: NamedStash) -> None:
        payload[TRAINER_STATE] = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "batches": self.stream.state_dict() if self.stream is not None else {},
            # what the data position means: resuming on other data would read it wrongly
            "data": self._data_identity(),
            **({"scaler": self.scaler.state_dict()} if self.scaler is not None else {}),
        }

    def _max_len(self) -> int:
        """Where training pairs are cut: the recipe's ``max_len`` or the model's, the shorter."""
        return min(self.config.max_len, self.model.config.max_len)

    def _model_ready(self, state: RunState) -> None:
        """Called once the model is built, before the batches are made."""

    def _data_identity(self) -> dict[str, Any]:
        assert self.data is not None
        return {
            "corpus": self.data.fingerprint,
            "tokenizer": self.data.tokenizer.sha256,
            "train_pairs": len(self.data.train_src),
        }

    @hookimpl
    def cvmkd_restore(self, state: RunState, payload: NamedStash, reason: str) -> None:
        saved = payload[TRAINER_STATE]
        before, now = saved.get("data"), self._data_identity()
        then, current = (before or {}).get("teacher"), now.get("teacher") or {}
        if then is not None and then.get("weights_sha256") != current.get("weights_sha256"):
            raise ModelError(
                f"cannot resume {state.run_dir}: the teacher changed since the run started ({then.get('path')} "
                f"then, {current.get('path')} now: other weights); restore that teacher, or start a new run"
            )
        before = {k: v for k, v in (before or {}).items() if k != "teacher"} or None
        now = {k: v for k, v in now.items() if k != "teacher"}
        if before is not None and before != now:
            what = "corpus" if before.get("corpus") != now["corpus"] else "tokenizer"
            raise CorpusError(
                f"cannot resume {state.run_dir}: the {what} changed since the run started "
                f"({before.get('train_pairs')} training pairs then, {now['train_pairs']} now); "
                "restore it, or start a new run"
            )
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        if self.stream is not None and saved.get("batches"):
            self.stream.load_state_dict(saved["batches"])
        if self.scaler is not None and "scaler" in saved:
            self.scaler.load_state_dict(saved["scaler"])

    # --- translation, for validation and reports ------------------------------------------------

    def test_data(self, state: RunState) -> tuple[list[str], list[str], str]:
        """The test split (the validation split when the corpus has no test split)."""
        assert self.data is not None
        test = self.data.splits.test or self.data.splits.valid
        return [p[0] for p in test], [p[1] for p in test], "test" if self.data.splits.test else "valid"

    def validation_data(self, state: RunState) -> tuple[list[str], list[str]]:
        assert self.data is not None
        valid = self.data.splits.valid
        return [p[0] for p in valid], [p[1] for p in valid]

    def translate(self, state: RunState, sources: list[str], beam_size: int = 1, model: Any = None) -> list[str]:
        assert self.data is not None
        teacher = model is not None and model is self.teacher
        return translate(
            model if model is not None else self.model,
            self.teacher_tokenizer if teacher and self.teacher_tokenizer is not None else self.data.tokenizer,
            sources,
            beam_size=beam_size,
            device=self.device,
            precision=self.precision,
        )

    # --- the end --------------------------------------------------------------------------------

    def _metadata(self, state: RunState, summary: RunSummary) -> dict[str, Any]:
        from cvmkd_core import __version__

        assert self.data is not None
        return {
            "role": self.role,
            "cvmkd_version": __version__,
            "recipe": state.recipe.to_dict(),
            "recipe_sha256": state.recipe.sha256(),
            "corpus": {
                "name": self.data.splits.name,
                "source_lang": self.data.splits.source_lang,
                "target_lang": self.data.splits.target_lang,
                "fingerprint": self.data.fingerprint,
            },
            "parameters": count_parameters(self.model),
            "final_step": state.step,
            "iterations_executed": state.iterations,
            # "finalizing" until the run's outcome is stamped, once every finalize step succeeded
            "status": "finalizing",
            "hardware": describe_hardware(self.device),
            "wall_seconds": round(state.elapsed(), 1),
            **({"teacher": self.teacher_info} if self.teacher_info else {}),
            **({"initialised_from": self.initialised_from} if self.initialised_from else {}),
        }

    @hookimpl
    def cvmkd_export(self, state: RunState, summary: RunSummary) -> None:
        from cvmkd_nmt.model.package import save_package

        if self.model is None or summary.status not in ("completed", "stopped"):
            return
        summary.extra.setdefault(TRAINER_INFO, self.run_info)
        path = save_package(state.run_dir / "model", self.model, self.data.tokenizer, self._metadata(state, summary))  # type: ignore[union-attr]
        summary.outputs["model"] = str(path)


class TeacherTrainer(Seq2SeqTrainer):
    """Trains a teacher with label-smoothed cross-entropy (the ``[teacher]`` section's settings)."""

    role = "teacher"

    def __init__(self, config: TeacherConfig) -> None:
        super().__init__(config)
        self.start_package: Path | None = None

    def test_beam_sizes(self) -> list[int]:
        return list(self.config.test_beam_sizes)

    def _model_component(self, state: RunState) -> Any:
        # a teacher recipe names its model in [distill.model]; a teacher stage copies [teacher]
        return state.components.get("distill.model") or state.components["teacher.model"]

    def _prepare(self, state: RunState) -> None:
        if not self.config.init_from:
            return Seq2SeqTrainer._prepare(self, state)
        from cvmkd_nmt.model.package import TOKENIZER, resolve_package

        self.start_package = resolve_package(self.config.init_from, state.registry)
        if not (self.start_package / TOKENIZER).is_file():
            raise ModelError(f"init_from = {self.config.init_from!r}: no model package at {self.start_package}")
        # the package's tokenizer, so that its embeddings keep their meaning
        self.data = prepare_data(state, tokenizer_path=self.start_package / TOKENIZER)

    def _initial_weights(self, state: RunState) -> None:
        if self.start_package is None:
            return
        from cvmkd_nmt.model.package import load_package

        start, _, metadata = load_package(self.start_package)
        built, loaded = self.model.config.to_dict(), start.config.to_dict()
        differ = sorted(k for k in set(built) | set(loaded) if k != "dropout" and built.get(k) != loaded.get(k))
        if differ:
            raise ModelError(
                f"init_from = {self.config.init_from!r}: the recipe's model differs from the package's in "
                + ", ".join(f"{k} ({built.get(k)} here, {loaded.get(k)} there)" for k in differ)
            )
        self.model.load_state_dict({k: v.float() for k, v in start.state_dict().items()})
        self.initialised_from = {
            "package": str(self.config.init_from),
            "path": str(self.start_package),
            "weights_sha256": metadata.get("weights_sha256"),
            "final_step": metadata.get("final_step"),
            "recipe_sha256": metadata.get("recipe_sha256"),
        }
        log.info("teacher: training continues from the weights of %s", self.start_package)

    @hookimpl
    def cvmkd_check(self, state: RunState) -> None:
        Seq2SeqTrainer.cvmkd_check(self, state)
        keep = state.recipe.run.keep_checkpoints
        if self.config.average_checkpoints > keep:
            raise ModelError(
                f"teacher.average_checkpoints = {self.config.average_checkpoints} needs the last "
                f"{self.config.average_checkpoints} checkpoints, but run.keep_checkpoints = {keep}"
            )

    @hookimpl
    def cvmkd_checkpoint(self, state: RunState, record: Any, payload: NamedStash) -> None:
        Seq2SeqTrainer.cvmkd_checkpoint(self, state, record, payload)
        patience = self.config.early_stopping_patience
        if record is None or not patience:
            return
        since = validations_since_best(state.history)
        if since >= patience:
            state.request_stop(
                f"early stopping: {since} validations without a new best composite score "
                f"(best at step {best_record(state.history).step})"
            )
            log.info("%s", state.stop_reason)

    @hookimpl
    def cvmkd_export(self, state: RunState, summary: RunSummary) -> None:
        if (
            self.model is not None
            and summary.status in ("completed", "stopped")
            and self.config.average_checkpoints > 1
        ):
            summary.extra[AVERAGING] = self._average_checkpoints(state)
        Seq2SeqTrainer.cvmkd_export(self, state, summary)

    def _validation_scores(self, state: RunState) -> dict[str, float]:
        from cvmkd_validation.validation import score_all

        sources, references = self.validation_data(state)
        limit = state.recipe.section("validation").max_sentences
        if limit:
            sources, references = sources[:limit], references[:limit]
        beam = state.recipe.section("validation").beam_size
        return score_all(state, self.translate(state, sources, beam_size=beam), references, sources)

    def _average_checkpoints(self, state: RunState) -> dict[str, Any]:
        """Average the weights of the last N validated checkpoints (a standard gain in MT), and
        keep the average when it validates at least as well as the weights training ended with."""
        from cvmkd_core.checkpoint import CheckpointStore

        store = CheckpointStore(state.run_dir / "checkpoints", keep=state.recipe.run.keep_checkpoints)
        entries = [e for e in store.entries() if e.score is not None][-self.config.average_checkpoints :]
        if len(entries) < 2:
            return {"used": False, "reason": f"only {len(entries)} validated checkpoint(s)"}
        final = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        total: dict[str, torch.Tensor] = {}
        for entry in entries:
            weights = NamedStash.from_dict(store.load_entry(entry))[TRAINER_STATE]["model"]
            for key, value in weights.items():
                if value.is_floating_point():
                    total[key] = total.get(key, 0) + value.double()
                else:
                    total.setdefault(key, value)
        averaged = {k: (v / len(entries)).to(final[k].dtype) if v.is_floating_point() else v for k, v in total.items()}
        before = self._validation_scores(state)
        self.model.load_state_dict(averaged)
        after = self._validation_scores(state)
        key = "composite" if "composite" in after else next(iter(after))
        used = after[key] >= before[key]
        if not used:
            self.model.load_state_dict(final)
        report = {
            "used": used,
            "steps": [e.step for e in entries],
            "key": key,
            "valid_final": before,
            "valid_averaged": after,
        }
        log.info(
            "checkpoint average of steps %s: validation %s %.2f against %.2f for the final weights: %s",
            report["steps"],
            key,
            after[key],
            before[key],
            "kept" if used else "not kept",
        )
        return report


def _global_means(values: dict[str, float], tokens: int, device: torch.device) -> dict[str, float]:
    """Per-token means over every rank's tokens, from each rank's means and token count."""
    import torch.distributed as dist

    keys = sorted(values)
    totals = torch.tensor([values[k] * tokens for k in keys] + [float(tokens)], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    count = max(float(totals[-1]), 1.0)
    return {k: float(totals[i]) / count for i, k in enumerate(keys)}


def best_record(history: list[Any]) -> Any:
    """The validation with the best composite score (the earliest of equals); rolled-back ones
    do not count."""
    kept = [r for r in history if not r.rolled_back]
    key = "composite" if all("composite" in r.scores for r in kept) else None

    def value(record: Any) -> float:
        return record.scores[key] if key else next(iter(record.scores.values()), 0.0)

    return max(kept, key=lambda r: (value(r), -r.step))


def validations_since_best(history: list[Any]) -> int:
    """How many kept validations came after the best one."""
    kept = [r for r in history if not r.rolled_back]
    if not kept:
        return 0
    best = best_record(history)
    return sum(1 for r in kept if r.step > best.step)
