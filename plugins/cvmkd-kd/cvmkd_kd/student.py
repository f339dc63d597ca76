"""The ``kd`` trainer: the student, distilled from a teacher with the recipe's loss."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import inspect
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import torch

from cvmkd_core.errors import ModelError
from cvmkd_core.files import atomic_write_json
from cvmkd_core.recipe import TrainerRef
from cvmkd_core.state import RunState
from cvmkd_kd.data import prepare_data
from cvmkd_kd.trainer import KDTrainerConfig, Seq2SeqTrainer
from cvmkd_nmt.cache import record_digest, verified_cache_file
from cvmkd_nmt.data.batching import Batch, batches_once
from cvmkd_nmt.hardware import autocast
from cvmkd_nmt.model.package import load_package, read_metadata

log = logging.getLogger("cvmkd")

#: in the run folder: the settings the teacher translated the sequence-KD targets with
TARGETS_RECORD = "teacher-targets.json"

#: bump when a cached teacher can no longer be trusted to match (training code changed meaning)
TEACHER_CACHE_VERSION = "1"


def _publish(folder: Path, target: Path) -> None:
    """Move the complete ``folder`` to ``target`` by renames alone, so a reader sees a whole
    teacher or none. A teacher already there (a damaged one, or another run's copy of the same
    teacher) is moved aside first; if another run publishes between the two renames, its copy is
    kept and this one dropped."""
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    try:
        with contextlib.suppress(FileNotFoundError):
            target.rename(aside / "teacher")
        try:
            folder.rename(target)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            log.info("another run cached the same teacher meanwhile: %s is kept", target)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def teacher_layers(student: int, teacher: int) -> list[int]:
    """Which of the teacher's ``teacher`` layers a student of ``student`` layers starts from:
    evenly spaced, the first and the last included (6 of 6: all; 3 of 6: 0, 2, 5; 2 of 6: 0, 5),
    and the first alone for one layer, the choice of Shleifer & Rush's shrink-and-fine-tune."""
    if student > teacher:
        raise ModelError(f"a student of {student} layers cannot start from a teacher of {teacher}")
    if student == 1:
        return [0]
    return [round(i * (teacher - 1) / (student - 1)) for i in range(student)]


def init_from_teacher(model: Any, teacher: Any) -> dict[str, Any]:
    """Copy the teacher's weights into the student ``model`` ([student] init = "teacher"):
    everything outside the layers as it is, and each student layer from the teacher layer
    :func:`teacher_layers` maps it to. Returns the mapping, for the run's records."""
    if type(model) is not type(teacher):
        raise ModelError(
            f'[student] init = "teacher" needs a teacher of the student\'s kind; the teacher is a '
            f"{type(teacher).__name__}, the student a {type(model).__name__}"
        )
    ours, theirs = model.config.to_dict(), teacher.config.to_dict()
    differ = [
        k
        for k in ("vocab_size", "d_model", "n_heads", "d_ff", "activation", "tie_embeddings")
        if ours.get(k) != theirs.get(k)
    ]
    if differ:
        raise ModelError(
            '[student] init = "teacher": the student must have the teacher\'s width; they differ in '
            + ", ".join(f"{k} ({ours.get(k)} here, {theirs.get(k)} in the teacher)" for k in differ)
        )
    layers = {
        "encoder_layers": teacher_layers(ours["n_encoder_layers"], theirs["n_encoder_layers"]),
        "decoder_layers": teacher_layers(ours["n_decoder_layers"], theirs["n_decoder_layers"]),
    }
    source = teacher.state_dict()
    weights = {}
    for name in model.state_dict():
        stack, _, rest = name.partition(".")
        if stack in layers:
            index, _, rest = rest.partition(".")
            name_there = f"{stack}.{layers[stack][int(index)]}.{rest}"
        else:
            name_there = name
        weights[name] = source[name_there].detach().float().clone()
    model.load_state_dict(weights)
    return {"teacher": True, "encoder_layers": layers["encoder_layers"], "decoder_layers": layers["decoder_layers"]}


def teacher_key(state: RunState, data: Any) -> str:
    """What a trained teacher depends on: corpus, tokenizer, teacher settings, seed, precision."""
    recipe = state.recipe
    teacher = recipe.section("teacher")
    settings = attrs.asdict(teacher, recurse=False)
    settings.pop("checkpoint")
    settings.pop("validate_every")  # validating more often does not change the weights
    settings["model"] = teacher.model.to_table()
    blob = json.dumps(
        {
            "version": TEACHER_CACHE_VERSION,
            "corpus": data.fingerprint,
            "tokenizer": data.tokenizer.sha256,
            "teacher": settings,
            "seed": recipe.run.seed,
            "device": recipe.run.device,
            "precision": recipe.run.precision,
        },
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def teacher_held_out(state: RunState, metadata: dict[str, Any], splits: Any) -> dict[str, Any]:
    """Whether the student's validation and test sentences lie outside the teacher's training
    data, when the teacher package says how it was trained (its recipe's ``[corpus]``) and the
    student uses the same corpus: the teacher's split is rebuilt and the sources compared. A
    teacher that trained on the test sentences makes retention look better than it is, so any
    overlap is logged as a warning and recorded (``teacher.held_out`` in summary and metadata)."""
    recorded = (metadata.get("recipe") or {}).get("corpus")
    if not isinstance(recorded, dict) or not recorded.get("name"):
        return {"checked": False, "reason": "the teacher package does not record its corpus"}
    corpus = state.recipe.section("corpus")
    if corpus is None or recorded["name"] != corpus.name:
        return {"checked": False, "reason": f"the teacher was trained on the corpus {recorded['name']!r}"}
    try:
        component = state.registry.get("corpus", corpus.name)
        options = {k: v for k, v in recorded.items() if k != "name"}
        teacher_train = component.create(options).load().train
    except Exception as exc:  # the teacher's corpus files are not here, say
        return {"checked": False, "reason": f"the teacher's training split cannot be rebuilt here ({exc})"}
    seen = {pair[0] for pair in teacher_train}
    found = {
        "checked": True,
        "teacher_train_pairs": len(teacher_train),
        "valid_in_teacher_train": sum(1 for pair in splits.valid if pair[0] in seen),
        "test_in_teacher_train": sum(1 for pair in splits.test if pair[0] in seen),
    }
    if found["valid_in_teacher_train"] or found["test_in_teacher_train"]:
        log.warning(
            "the teacher trained on %d of the %d test sentences and %d of the %d validation sentences: "
            "its scores there, and the student's retention, are not a fair measure",
            found["test_in_teacher_train"],
            len(splits.test),
            found["valid_in_teacher_train"],
            len(splits.valid),
        )
    return found


class KDTrainer(Seq2SeqTrainer):
    """Distil the student from the teacher: load it, reuse the cached one, or train it first."""

    role = "student"

    def __init__(self, config: KDTrainerConfig) -> None:
        super().__init__(config)

    # --- the teacher ----------------------------------------------------------------------------

    def _prepare(self, state: RunState) -> None:
        recipe = state.recipe
        checkpoint = recipe.section("teacher").checkpoint
        if checkpoint:
            from cvmkd_nmt.model.package import resolve_package

            checkpoint = str(resolve_package(checkpoint, state.registry))
            # a cvmkd package, or a folder an installed loader reads (a Hugging Face teacher)
            from cvmkd_nmt.model.package import load_model_folder

            teacher = recipe.section("teacher")
            languages = {k: v for k in ("source_lang", "target_lang") if (v := getattr(teacher, k))}
            self.teacher, teacher_tokenizer, metadata = load_model_folder(checkpoint, state.registry, **languages)
            # the student speaks the teacher's vocabulary (the teacher's tokenizer governs), or
            # one of its own, learning from the teacher's translations alone
            self.teacher_tokenizer = teacher_tokenizer
            own = recipe.section("student").tokenizer == "own"
            self.data = prepare_data(state) if own else prepare_data(state, tokenizer=teacher_tokenizer)
            self.teacher_info = {
                "source": "loaded",
                "path": str(checkpoint),
                "weights_sha256": metadata.get("weights_sha256"),
                "held_out": teacher_held_out(state, metadata, self.data.splits),
            }
            log.info("teacher loaded from %s", checkpoint)
        else:
            if recipe.section("student").tokenizer == "own":
                raise ModelError(
                    '[student] tokenizer = "own" needs a loaded teacher ([teacher] checkpoint): a teacher '
                    "trained by the run shares the run's tokenizer"
                )
            self.data = prepare_data(state)
            self.teacher = self._cached_or_trained_teacher(state)
            self.teacher_tokenizer = self.data.tokenizer
        self.teacher.to(self.device).eval()
        for parameter in self.teacher.parameters():
            parameter.requires_grad_(False)
        self.loss_fn = state.components["distill.loss"]
        self.uses_teacher = getattr(self.loss_fn, "needs_teacher", True)
        shared = self.teacher_tokenizer.sha256 == self.data.tokenizer.sha256
        if self.uses_teacher and not shared:
            raise ModelError(
                "[student] tokenizer = \"own\": word-level KD compares the teacher's and the student's "
                "distributions token by token and needs one vocabulary; distil through the teacher's "
                'translations ([distill.sequence] targets = "teacher", [distill.loss] name = "ce"), '
                'or use tokenizer = "teacher"'
            )
        if shared and self.teacher.config.vocab_size != self.data.tokenizer.vocab_size:
            raise ModelError(
                f"teacher vocabulary ({self.teacher.config.vocab_size}) differs from the tokenizer's "
                f"({self.data.tokenizer.vocab_size}): distil with the teacher's tokenizer"
            )
        self.teacher_info["parameters"] = sum(p.numel() for p in {id(p): p for p in self.teacher.parameters()}.values())
        if not shared:
            self.teacher_info["student_tokenizer"] = {"own": True, "vocab_size": self.data.tokenizer.vocab_size}
        if self.config.sequence.targets != "reference":
            self.data = self._sequence_targets(state)
        elif self.data is not None and self.data.splits.extra_sources:
            log.warning(
                "the corpus offers %d extra sources, which only sequence-level KD uses "
                '([distill.sequence] targets = "teacher" or "both"): not used',
                len(self.data.splits.extra_sources),
            )

    def _initial_weights(self, state: RunState) -> None:
        if state.recipe.section("student").init != "teacher":
            return
        self.initialised_from = init_from_teacher(self.model, self.teacher)
        log.info(
            "student: starts from the teacher's weights, encoder layers %s and decoder layers %s",
            self.initialised_from["encoder_layers"],
            self.initialised_from["decoder_layers"],
        )

    def teacher_folder(self, state: RunState) -> Path | None:
        path = self.teacher_info.get("path")
        return Path(path) if path else None

    def _data_identity(self) -> dict[str, Any]:
        """What the run trains on, the teacher included: a resumed run that finds another
        teacher (a package changed in place, an upgraded teacher plugin) is refused."""
        identity = super()._data_identity()
        if self.teacher_info.get("weights_sha256"):
            identity["teacher"] = {
                "weights_sha256": self.teacher_info["weights_sha256"],
                "path": self.teacher_info.get("path"),
            }
        return identity

    def _cached_or_trained_teacher(self, state: RunState) -> Any:
        from cvmkd_core.session import run_stage

        assert self.data is not None
        key = teacher_key(state, self.data)
        cached = state.recipe.run.cache_path() / "teachers" / key[:20]
        if (cached / "metadata.json").is_file():
            try:
                model, _, metadata = load_package(cached)
            except ModelError as exc:
                raise ModelError(f"cached teacher: {exc}; delete {cached} and it is trained again") from None
            self.teacher_info = {
                "source": "cache",
                "path": str(cached),
                "key": key,
                "trained_in": metadata.get("trained_in"),
                "weights_sha256": metadata.get("weights_sha256"),
            }
            log.info("reusing the cached teacher %s (trained in %s)", cached, metadata.get("trained_in"))
            return model
        recipe = state.recipe
        teacher = recipe.section("teacher")
        stage = attrs.evolve(
            recipe,
            run=attrs.evolve(
                recipe.run,
                steps=teacher.steps,
                validate_every=teacher.validate_every,
                keep_checkpoints=max(recipe.run.keep_checkpoints, teacher.average_checkpoints),
            ),
            distill=TrainerRef(name="teacher", config=teacher),
            guard=None,
            reports=[],
            sections={**recipe.sections, "quantize": [], "exports": []},
        )
        stage_dir = state.run_dir / "teacher"
        log.info("training the teacher: %d steps in %s (cached afterwards as %s)", teacher.steps, stage_dir, cached)
        started = time.perf_counter()
        summary = run_stage(state, stage, stage_dir)
        if summary.status == "interrupted":
            raise KeyboardInterrupt  # the teacher stage wrote its checkpoint; --resume continues it
        if summary.status != "completed":
            raise ModelError(f"teacher training ended {summary.status}; see {stage_dir}")
        tmp: Path | None = None
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            # a folder of this process's own: concurrent runs caching the same teacher never
            # write into each other's copy
            tmp = Path(tempfile.mkdtemp(prefix=f".{cached.name}.", dir=cached.parent))
            shutil.copytree(stage_dir / "model", tmp, dirs_exist_ok=True)
            metadata = read_metadata(tmp)
            metadata.update(
                trained_in=str(stage_dir), teacher_key=key, training_seconds=round(time.perf_counter() - started, 1)
            )
            (tmp / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str) + "\n")
            _publish(tmp, cached)
        except OSError as exc:  # a full cache disk, say: the trained teacher stays in the run folder
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
            raise ModelError(
                f"cannot cache the trained teacher in {cached.parent}: {reason}; it is kept in {stage_dir}, and "
                "--resume continues from there once there is room"
            ) from None
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        model, _, _ = load_package(cached)
        self.teacher_info = {
            "source": "trained",
            "path": str(cached),
            "key": key,
            "trained_in": str(stage_dir),
            "training_seconds": round(time.perf_counter() - started, 1),
            "weights_sha256": metadata.get("weights_sha256"),
        }
        return model

    def _sequence_targets(self, state: RunState) -> Any:
        """Sequence-level KD: the training data with the teacher's translations as targets."""
        from cvmkd_kd.sequence import (
            SHIPPED_SETTINGS,
            cache_key,
            distillation_sources,
            shipped_targets,
            teacher_targets,
            with_targets,
        )
        from cvmkd_nmt.model.translate import translate_nbest

        assert self.data is not None
        config = self.config.sequence
        tokenizer = self.teacher_tokenizer  # the teacher reads and writes text with its own
        # the teacher translates the training sources, then the extra text (no references)
        sources, references, extra, left_out = distillation_sources(self.data.splits, config)
        if left_out:
            log.warning("sequence-level KD: %d extra sources are validation or test sources: left out", left_out)
        weights = self.teacher_info.get("weights_sha256") or "unknown"
        settings = self._targets_settings(state, weights, tokenizer.sha256, sources, references)
        key = cache_key(weights, tokenizer.sha256, sources, references, config, settings)
        directory = state.recipe.run.cache_path() / "teacher-targets" / key[:24]

        def translate(batch: list[str]) -> list[list[str]]:
            return translate_nbest(
                self.teacher,
                tokenizer,
                batch,
                beam_size=config.beam_size,
                nbest=config.nbest,
                batch_size=config.batch_size,
                device=self.device,
                precision=self.precision,
            )

        shipped = None
        if self.teacher_info.get("path"):  # the teacher package may ship these very translations
            shipped_key = cache_key(weights, tokenizer.sha256, sources, references, config, SHIPPED_SETTINGS)
            shipped = shipped_targets(Path(self.teacher_info["path"]), shipped_key, len(sources))
        if shipped is not None:
            hypotheses, info = shipped
            info.update(translated=0, reused=len(hypotheses), seconds=0.0, beam_size=config.beam_size)
            info.update(nbest=config.nbest, targets=config.targets, empty=sum(1 for h in hypotheses if not h.strip()))
            log.info("sequence-level KD: the teacher's translations shipped with its package (%s)", info["path"])
        else:
            log.info(
                "sequence-level KD: the teacher translates %d sources (%d of them extra text; beam %d, %d-best), cached in %s",
                len(sources),
                len(extra),
                config.beam_size,
                config.nbest,
                directory,
            )
            hypotheses, info = teacher_targets(translate, sources, references, config, directory)
        info.update(extra_sources=len(extra), extra_left_out=left_out)
        if state.world.main:  # what a resumed run trains on again (_targets_settings)
            atomic_write_json(state.run_dir / TARGETS_RECORD, {"settings": settings, "key": key})
        self.teacher_info["sequence_kd"] = info
        log.info(
            "sequence-level KD targets ready: %d translated, %d reused from %s, %.0fs",
            info["translated"],
            info["reused"],
            "the teacher's package" if shipped is not None else "the cache",
            info["seconds"],
        )
        return with_targets(self.data, hypotheses, config, extra)

    def _max_len(self) -> int:
        """The student's and the teacher's limit, the shorter: the teacher reads the same pairs,
        and its cached outputs hold exactly the positions of the batches."""
        limit = super()._max_len()
        return min(limit, self.teacher.config.max_len) if self.uses_teacher else limit

    def _model_ready(self, state: RunState) -> None:
        # the cache is built once the student exists: it is cut where the student's batches are
        if self.uses_teacher and self.config.teacher_outputs == "cached":
            self.cache = self._teacher_outputs(state)

    def _targets_settings(
        self, state: RunState, weights: str, tokenizer: str, sources: list[str], references: list[str]
    ) -> str:
        """The device and precision the teacher translates on: this run's, except on a resumed run
        whose first translations, made on another device (``--resume --set run.device=cuda``),
        are still cached. The targets a run trains on do not change when it is resumed."""
        from cvmkd_kd.sequence import cache_key, chunk_files

        # the device's type, not its index: every rank of a multi-GPU run (cuda:0, cuda:1...) finds
        # the translations rank 0 made while the others waited
        settings = f"{torch.device(self.device).type}|{self.precision}"
        try:
            earlier = json.loads((state.run_dir / TARGETS_RECORD).read_text("utf-8"))["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            return settings
        if not isinstance(earlier, str) or earlier == settings:
            return settings
        config = self.config.sequence
        key = cache_key(weights, tokenizer, sources, references, config, earlier)
        directory = state.recipe.run.cache_path() / "teacher-targets" / key[:24]
        if all(path.is_file() for _, path in chunk_files(directory, sources, config.chunk_size)):
            log.info("sequence-level KD: the run resumes on the targets it started with (translated on %s)", earlier)
            return earlier
        log.warning(
            "sequence-level KD: the targets this run started with (translated on %s) are no longer cached in %s: "
            "the teacher translates again on %s, and the targets may differ slightly",
            earlier,
            directory,
            settings,
        )
        return settings

    def _teacher_outputs(self, state: RunState) -> Any:
        """The teacher's top-k log-probabilities over the training set, computed once and cached."""
        from cvmkd_kd.teacher_cache import SHARD_PAIRS, TeacherCache, build_teacher_cache

        assert self.data is not None
        tokenizer = self.data.tokenizer
        max_len = self._max_len()
        weights = self.teacher_info.get("weights_sha256") or "unknown"
        fingerprint = hashlib.sha256(
            f"{weights}|{tokenizer.sha256}|{self.data.fingerprint}|{self.data.targets}|{max_len}|{self.config.topk}|{self.precision}".encode()
        ).hexdigest()
        path = state.recipe.run.cache_path() / "teacher-outputs" / fingerprint[:20]
        if TeacherCache.finished(path):
            cache = TeacherCache.load(path, fingerprint, student_vocab=tokenizer.vocab_size)
            log.info("reusing cached teacher outputs %s", path)
            self.teacher_info["outputs"] = {"path": str(path), "reused": True, **cache.stats()}
            return cache
        started = time.perf_counter()

        takes_rows = "rows" in inspect.signature(self.teacher.forward).parameters

        def forward(src: torch.Tensor, tgt_in: torch.Tensor) -> torch.Tensor:
            tgt_in = tgt_in.to(self.device)
            with autocast(self.device, self.precision):
                if not takes_rows:
                    return self.teacher(src.to(self.device), tgt_in)
                # the positions the cache keeps, the non-pad targets: bos + target and target +
                # eos have the same length, so they are the non-pad inputs
                return self.teacher(src.to(self.device), tgt_in, rows=tgt_in.ne(tokenizer.pad_id))

        data = self.data

        def batches(start: int, stop: int) -> Iterator[Batch]:
            """The pairs ``start..stop-1``, shortest first, with their places in the training set."""
            for batch in batches_once(
                data.train_src[start:stop],
                data.train_tgt[start:stop],
                pad_id=tokenizer.pad_id,
                bos_id=tokenizer.bos_id,
                eos_id=tokenizer.eos_id,
                batch_size=None,
                max_tokens=6000,
                max_len=max_len,
            ):
                assert batch.indices is not None
                yield dataclasses.replace(batch, indices=batch.indices + start)

        pairs = len(data.train_src)

        def progress(done: int, total: int) -> None:
            if total > SHARD_PAIRS:
                elapsed = time.perf_counter() - started
                log.info(
                    "teacher outputs: %d/%d pairs (%.0f%%), %.0fs, about %.0fs left",
                    done,
                    total,
                    100 * done / total,
                    elapsed,
                    elapsed / max(done, 1) * (total - done),
                )

        cache = build_teacher_cache(
            forward,
            batches,
            pairs,
            self.config.topk,
            path,
            fingerprint=fingerprint,
            pad_id=tokenizer.pad_id,
            progress=progress,
        )
        seconds = time.perf_counter() - started
        log.info(
            "teacher outputs cached in %.0fs: top-%d over %d positions hold %.0f%% of the mass",
            seconds,
            self.config.topk,
            cache.n_positions,
            100 * cache.mean_topk_mass,
        )
        self.teacher_info["outputs"] = {
            "path": str(path),
            "reused": False,
            "seconds": round(seconds, 1),
            **cache.stats(),
        }
        return cache

    # --- the loss -------------------------------------------------------------------------------

    def _loss_accepts_rows(self) -> bool:
        return bool(getattr(self.loss_fn, "accepts_rows", False))

    def _loss(self, state: RunState, batch: Batch, logits: torch.Tensor, rows: torch.Tensor | None = None) -> Any:
        """The recipe's loss; with ``rows`` (the target positions), logits, targets and the
        teacher's outputs are given for those positions alone."""
        assert self.data is not None
        pad = self.data.tokenizer.pad_id

        def select(t: torch.Tensor) -> torch.Tensor:
            return t if rows is None else t[rows]

        targets = select(batch.tgt_out)
        if not self.uses_teacher:
            return self.loss_fn(logits, targets, pad)
        if self.cache is not None:
            lp, ids = self.cache.lookup(batch.indices, batch.tgt_out.cpu(), pad)
            topk = (select(lp.to(self.device)), select(ids.to(self.device)))
            return self.loss_fn(logits, targets, pad, teacher_topk=topk)
        with torch.no_grad(), autocast(self.device, self.precision):
            teacher_logits = self.teacher(batch.src, batch.tgt_in)
        return self.loss_fn(logits, targets, pad, teacher_logits=select(teacher_logits))

    def measure_models(self, state: RunState) -> dict[str, Any]:
        """The teacher's and the student's size and CPU decoding speed, measured side by side
        (float32, the same sentences) so the comparison report can set them against each other."""
        from cvmkd_kd.quantize import float_copy, size_and_speed

        assert self.data is not None
        test = self.data.splits.test or self.data.splits.valid
        sources = [p[0] for p in test]
        teacher_dir = Path(self.teacher_info["path"]) if self.teacher_info.get("path") else None
        models = {
            "teacher": size_and_speed(float_copy(self.teacher), self.teacher_tokenizer, sources, teacher_dir),
            "student": size_and_speed(float_copy(self.model), self.data.tokenizer, sources, state.run_dir / "model"),
        }
        t, s = models["teacher"], models["student"]
        log.info(
            "teacher %.1fM parameters, %.0f tokens/s at batch 32, %.1f ms/sentence at batch 1; "
            "student %.1fM, %.0f tokens/s, %.1f ms/sentence (CPU, float32)",
            t["parameters"] / 1e6,
            t["throughput"]["tokens_per_second"],
            t["latency"]["ms_per_sentence"],
            s["parameters"] / 1e6,
            s["throughput"]["tokens_per_second"],
            s["latency"]["ms_per_sentence"],
        )
        return models

    def translate_with_teacher(self, state: RunState, sources: list[str], beam_size: int = 1) -> list[str]:
        return self.translate(state, sources, beam_size=beam_size, model=self.teacher)

    def teacher_translations(self, state: RunState, sources: list[str], beam_size: int = 1) -> list[str] | None:
        """The teacher's translations of ``sources``, cached on disk: the teacher does not change,
        so validation scores it once, and later runs with the same teacher reuse them. A teacher
        package may ship its translations of the sentences its runs are scored on
        (``translations/``, see plugins/cvmkd-teacher-bible/ship_targets.py): those are used as
        they are, whatever this machine would decode."""
        from cvmkd_core.files import atomic_write_text
        from cvmkd_kd.sequence import SHIPPED_SETTINGS, SHIPPED_TRANSLATIONS, shipped_targets, translations_key

        if self.teacher is None or self.data is None:
            return None
        weights = self.teacher_info.get("weights_sha256") or "unknown"
        tokenizer = self.teacher_tokenizer.sha256
        if self.teacher_info.get("path"):
            shipped_key = translations_key(weights, tokenizer, beam_size, SHIPPED_SETTINGS, sources)
            shipped = shipped_targets(
                Path(self.teacher_info["path"]), shipped_key, len(sources), folder_name=SHIPPED_TRANSLATIONS
            )
            if shipped is not None:
                log.info("the teacher's translations of %d sentences shipped with its package", len(sources))
                return shipped[0]
        # (device and precision on lines of their own: the key of the caches of earlier versions)
        key = translations_key(weights, tokenizer, beam_size, f"{self.device}\n{self.precision}", sources)
        path = state.recipe.run.cache_path() / "teacher-translations" / f"{key[:24]}.txt"
        if verified_cache_file(path, "cached teacher translations"):
            lines = path.read_text(encoding="utf-8").split("\n")[:-1]
            if len(lines) == len(sources):
                log.info("reusing the teacher's cached translations %s", path)
                return lines
        hypotheses = self.translate_with_teacher(state, sources, beam_size=beam_size)
        atomic_write_text(path, "".join(h.replace("\n", " ") + "\n" for h in hypotheses))
        record_digest(path)
        return hypotheses
