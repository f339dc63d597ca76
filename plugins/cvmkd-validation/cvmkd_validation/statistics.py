"""Comparisons between two validations: raw score changes, and a paired bootstrap test over
per-sentence scores."""

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
