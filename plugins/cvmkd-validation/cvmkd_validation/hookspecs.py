"""The hooks the validation plugin declares (through ``cvmkd_addhooks``): the error analysis of
each validation, and the phases of a distillation run's finalize, which its finalize wrapper
fires in this order before every plain ``cvmkd_finalize``: ``cvmkd_export``, ``cvmkd_evaluate``,
``cvmkd_quantize``. They fire also after a failed run (``summary.status`` says how it ended)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cvmkd_core.hookspecs import hookspec

if TYPE_CHECKING:
    from cvmkd_core.state import RunState, RunSummary
    from cvmkd_validation.records import TranslationSample

#: the finalize phases, in the order they fire
PHASES = ("cvmkd_export", "cvmkd_evaluate", "cvmkd_quantize")


@hookspec
def cvmkd_analyze(state: RunState, sample: TranslationSample) -> dict[str, Any] | None:
    """Analyse one validation's translations; return ``{name: findings}`` (JSON-serialisable).

    Called by the built-in validation after scoring. ``sample`` holds the sources, references and
    hypotheses, and the previous validation's hypotheses when there was one. Each
    implementation's findings are stored under ``details["analysis"]`` in the record; the same
    name from two implementations is an error. The built-in ``cvmkd.analysis`` returns
    ``{"errors": ...}`` (length, worst sentences, loops, copies, empty output, regressions).
    """


@hookspec
def cvmkd_export(state: RunState, summary: RunSummary) -> None:
    """Finalize, phase 1 of 3: write the trained model (a model package), and record it in
    ``summary.outputs``."""


@hookspec
def cvmkd_evaluate(state: RunState, summary: RunSummary) -> None:
    """Finalize, phase 2: score the final models on the test split and set
    ``summary[EVALUATION]`` (a :class:`~cvmkd_validation.records.TestEvaluation`)."""


@hookspec
def cvmkd_quantize(state: RunState, summary: RunSummary) -> None:
    """Finalize, phase 3: quantize the final model with the recipe's ``[[quantize]]`` and
    append every variant to ``summary[QUANTIZED]``."""
