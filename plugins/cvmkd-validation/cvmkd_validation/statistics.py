"""Comparisons between two validations: raw score changes, and a paired bootstrap test over
per-sentence scores; and the bootstrap interval of a student's retention of its teacher."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def deltas(current: Mapping[str, float], previous: Mapping[str, float]) -> dict[str, float]:
    """``current - previous`` per shared key (raw units; whether that is good depends on the spec)."""
    return {k: current[k] - previous[k] for k in current if k in previous}


def paired_bootstrap(
    baseline: Sequence[float], current: Sequence[float], *, samples: int = 1000, seed: int = 12345
) -> dict[str, Any]:
    """Paired bootstrap resampling over per-sentence scores whose mean is the corpus score.

    Follows sacrebleu's paired bootstrap (Koehn 2004, as in Moses): resample sentence indices
    with replacement, recompute both means, and take as p-value the share of centred resampled
    differences at least as large as the observed one. Returns ``p_value``, ``delta`` (current
    minus baseline), and the current system's bootstrap mean and 95% interval.
    """
    if len(baseline) != len(current):
        raise ValueError(f"paired test needs equal lengths, got {len(baseline)} and {len(current)}")
    n = len(current)
    if n == 0:
        return {"p_value": None, "delta": 0.0}
    a = torch.tensor(list(baseline), dtype=torch.float64)
    b = torch.tensor(list(current), dtype=torch.float64)
    if torch.equal(a, b):
        # every resampled difference would be 0: the statistic is degenerate, nothing changed
        return {"p_value": 1.0, "delta": 0.0}
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, n, (samples, n), generator=generator)
    mean_a, mean_b = a[index].mean(1), b[index].mean(1)
    observed = abs(float(b.mean() - a.mean()))
    sample_diffs = (mean_b - mean_a).abs()
    centred = sample_diffs - sample_diffs.mean()
    p_value = (int((centred > observed).sum()) + 1) / (samples + 1)
    low, high = torch.quantile(mean_b, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {
        "p_value": p_value,
        "delta": float(b.mean() - a.mean()),
        "mean": float(mean_b.mean()),
        "ci95": [low, high],
    }


def resample_indices(sentences: int, samples: int, seed: int = 12345) -> Any:
    """``samples`` rows of ``sentences`` sentence indices drawn with replacement (numpy's
    generator, as sacrebleu's paired bootstrap draws them for the same seed)."""
    import numpy as np

    return np.random.default_rng(seed).integers(0, sentences, size=(samples, sentences))


def retention_interval(
    student: Mapping[str, Any], teacher: Mapping[str, Any], specs: Mapping[str, Any], *, level: float = 0.95
) -> dict[str, list[float] | None]:
    """Per key, the bootstrap interval of the student's retention of its teacher.

    ``student`` and ``teacher`` hold, per score key, the score of each resample (the same
    resampled sentences for both: the test is paired). Each resample's retention is computed as
    the point estimate is (normalised student score over the teacher's); the interval is the
    central ``level`` share of them, percentile method. None where the teacher's normalised score
    is 0 in some resample (retention is not defined there)."""
    import numpy as np

    tail = (1.0 - level) / 2
    out: dict[str, list[float] | None] = {}
    for key, values in student.items():
        if key not in teacher or key not in specs:
            continue
        spec = specs[key]
        ours, theirs = (
            _normalised(np.asarray(values, dtype=float), spec),
            _normalised(np.asarray(teacher[key], dtype=float), spec),
        )
        if ours.shape != theirs.shape or not len(ours) or (theirs <= 0).any():
            out[key] = None
            continue
        low, high = np.quantile(ours / theirs, [tail, 1.0 - tail])
        out[key] = [float(low), float(high)]
    return out


def _normalised(values: Any, spec: Any) -> Any:
    """:meth:`ScoreSpec.normalise` over an array."""
    import numpy as np

    share = np.clip((values - spec.low) / (spec.high - spec.low), 0.0, 1.0)
    return share if spec.higher_is_better else 1.0 - share
