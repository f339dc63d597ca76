"""The recipe sections the distillation plugin owns: ``[teacher]`` (load a teacher, or train one)
and ``[student]`` (the model being distilled)."""

from __future__ import annotations

import attrs

from cvmkd_core.config import between, ge, gt, one_of
from cvmkd_core.recipe import component_ref

ModelRef = component_ref("model")


@attrs.frozen
class TeacherConfig:
    """``[teacher]``: load a teacher, or train one (cached, so later runs reuse it)."""

    checkpoint: str = ""
    """a teacher model package (a run's ``model/`` folder) or the name of an installed one (``bible-fr-en``); empty: train a teacher or reuse the cached one"""
    model: ModelRef = attrs.field(factory=lambda: ModelRef(name="cvm", options={"preset": "teacher-cpu"}))  # type: ignore[valid-type]
    steps: int = attrs.field(default=2000, validator=gt(0))
    validate_every: int = attrs.field(default=1000, validator=gt(0))
    batch_size: int = attrs.field(default=64, validator=gt(0))
    max_tokens: int = attrs.field(default=0, validator=ge(0))
    learning_rate: float = attrs.field(default=1e-3, validator=gt(0))
    warmup_steps: int = attrs.field(default=1000, validator=ge(0))
    schedule: str = attrs.field(default="inverse_sqrt", validator=one_of("inverse_sqrt", "linear", "constant"))
    label_smoothing: float = attrs.field(default=0.1, validator=between(0.0, 1.0, high_open=True))
    weight_decay: float = attrs.field(default=0.0, validator=ge(0))
    clip_norm: float = attrs.field(default=1.0, validator=ge(0))
    max_len: int = attrs.field(default=128, validator=gt(0))
    early_stopping_patience: int = attrs.field(default=0, validator=ge(0))
    """stop after this many validations in a row without a new best composite score; 0: never"""
    average_checkpoints: int = attrs.field(default=1, validator=gt(0))
    """export the mean weights of the last N validated checkpoints when they validate better"""
    test_beam_sizes: list[int] = attrs.field(factory=lambda: [1], validator=attrs.validators.deep_iterable(gt(0)))
    """beam sizes the final teacher is scored with on the test split (evaluation.json)"""
    source_lang: str = ""
    """the language codes of a multilingual Hugging Face teacher (NLLB: ``fra_Latn``, M2M100: ``fr``,
    mBART-50: ``fr_XX``): its tokenizer writes them before each side's text"""
    target_lang: str = ""
    compile: str = attrs.field(default="auto", validator=one_of("auto", "on", "off"))
    """compile the loss's passes over the vocabulary (torch.compile, CPU): auto: on for CPU runs
    of at least 1,000 steps where a C++ compiler is found"""
    init_from: str = ""
    """continue training from this model package (a path or a registered name): its weights start
    the run and its tokenizer is used; the model settings must build the same architecture"""


@attrs.frozen
class StudentConfig:
    """``[student]``: the model being distilled."""

    model: ModelRef = attrs.field(factory=lambda: ModelRef(name="cvm", options={"preset": "student-cpu"}))  # type: ignore[valid-type]
    tokenizer: str = attrs.field(default="teacher", validator=one_of("teacher", "own"))
    """teacher: the student speaks the loaded teacher's tokenizer (word-level KD needs it); own: a
    SentencePiece vocabulary of its own, trained on the corpus with [tokenizer]'s settings, so the
    teacher teaches through its translations (sequence-level KD) only"""
    init: str = attrs.field(default="random", validator=one_of("random", "teacher"))
    """random: the model's own initialisation; teacher: "shrink and fine-tune", the student starts
    as a thinner copy of the teacher: its embeddings, norms and output layer, and of its layers an
    evenly spaced choice, the first and the last included (:func:`cvmkd_kd.student.teacher_layers`);
    the student's model needs the teacher's width (d_model, n_heads, d_ff, activation) and tokenizer"""
