"""Registers the distillation components: trainers ``kd`` and ``teacher``, losses ``kd`` and ``ce``."""

from __future__ import annotations

from typing import Any

import attrs
import torch

from cvmkd_core.config import between
from cvmkd_core.hookspecs import hookimpl
from cvmkd_kd.config import StudentConfig, TeacherConfig
from cvmkd_kd.loss import KDConfig, KDLossOutput, kd_loss
from cvmkd_kd.student import KDTrainer
from cvmkd_kd.trainer import KDTrainerConfig, TeacherTrainer


class KDLoss:
    """Word-level KD: alpha·T²·KL(teacher_T ‖ student_T) + beta·CE, averaged over target tokens."""

    #: takes the logits of the target positions alone, (N, V) with targets (N,) (see kd_loss)
    accepts_rows = True

    def __init__(self, config: KDConfig) -> None:
        self.config = config
        self.needs_teacher = config.alpha > 0

    def __call__(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        pad_id: int,
        teacher_logits: torch.Tensor | None = None,
        teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> KDLossOutput:
        return kd_loss(logits, targets, pad_id, teacher_logits, teacher_topk=teacher_topk, config=self.config)


@attrs.frozen
class CEConfig:
    """``loss = {name = "ce", label_smoothing = 0.1}``."""

    label_smoothing: float = attrs.field(default=0.1, validator=between(0.0, 1.0, high_open=True))


class CELoss(KDLoss):
    """Plain (label-smoothed) cross-entropy with the reference: a student without a teacher."""

    def __init__(self, config: CEConfig) -> None:
        super().__init__(KDConfig(alpha=0.0, beta=1.0, label_smoothing=config.label_smoothing))


@hookimpl
def cvmkd_register(register: Any) -> None:
    register.kind("loss", "a training loss: factory(config) returns a callable computing the loss")
    register.trainer("kd", KDTrainer, config=KDTrainerConfig)
    register.trainer("teacher", TeacherTrainer, config=TeacherConfig)
    register.section("teacher", TeacherConfig)
    register.section("student", StudentConfig)
    register.loss("kd", KDLoss, config=KDConfig)
    register.loss("ce", CELoss, config=CEConfig)
    # [[quantize]]: the quantizers the finalize phase cvmkd_quantize runs on the trained student
    register.slot("quantize", "quantizer", many=True)


@hookimpl
def cvmkd_record_outcome(state: Any, summary: Any) -> None:
    """Record the run's provenance and outcome (test scores, gate verdict, status, wall time) in
    every model package, now that the summary is complete."""
    import logging

    from cvmkd_nmt.provenance import stamp_packages
    from cvmkd_validation.records import EVALUATION, GATE

    try:
        stamp_packages(state, summary, state.plugins, evaluation=summary[EVALUATION], gate=summary[GATE])
    except Exception as exc:  # the packages stay loadable without it; say so, don't fail the run
        logging.getLogger("cvmkd").warning(
            "could not record the run's outcome in the model packages: %s: %s", type(exc).__name__, exc
        )
