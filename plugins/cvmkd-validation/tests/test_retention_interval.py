"""The 95% interval of a student's retention of its teacher: a paired bootstrap over the test
sentences, checked against the same bootstrap written out by hand on a toy set."""

from __future__ import annotations

import numpy as np
import pytest

from cvmkd_validation.metrics import ScoreSpec
from cvmkd_validation.statistics import resample_indices, retention_interval

HIGHER = ScoreSpec(True, 0.0, 100.0)
LOWER = ScoreSpec(False, 0.0, 100.0)


def _by_hand(student: list[float], teacher: list[float], rows: np.ndarray, spec: ScoreSpec) -> list[float]:
    """Each resample: the mean of both systems' sentence scores over the same sentences, each
    normalised, their ratio; then the 2.5th and 97.5th percentiles (numpy's linear rule)."""
    ratios = []
    for row in rows:
        ours = sum(student[i] for i in row) / len(row)
        theirs = sum(teacher[i] for i in row) / len(row)
        ratios.append(spec.normalise(ours) / spec.normalise(theirs))
    ratios.sort()
    position = 0.025 * (len(ratios) - 1)
    below, share = int(position), position - int(position)
    low = ratios[below] + share * (ratios[below + 1] - ratios[below])
    position = 0.975 * (len(ratios) - 1)
    below, share = int(position), position - int(position)
    high = ratios[below] + share * (ratios[below + 1] - ratios[below])
    return [low, high]


def test_the_interval_is_the_paired_bootstrap_computed_by_hand() -> None:
    student = [40.0, 55.0, 10.0, 80.0, 35.0, 60.0, 20.0, 70.0]
    teacher = [45.0, 50.0, 30.0, 85.0, 40.0, 65.0, 25.0, 75.0]
    rows = resample_indices(len(student), 200, seed=7)
    assert rows.shape == (200, 8) and rows.min() >= 0 and rows.max() < 8
    means = {
        "chrf": (np.asarray(student)[rows].mean(1), np.asarray(teacher)[rows].mean(1)),
        "ter": (100 - np.asarray(student)[rows].mean(1), 100 - np.asarray(teacher)[rows].mean(1)),
    }
    interval = retention_interval(
        {k: v[0] for k, v in means.items()}, {k: v[1] for k, v in means.items()}, {"chrf": HIGHER, "ter": LOWER}
    )
    assert interval["chrf"] == pytest.approx(_by_hand(student, teacher, rows, HIGHER))
    flipped = [100 - x for x in student], [100 - x for x in teacher]
    assert interval["ter"] == pytest.approx(_by_hand(*flipped, rows, LOWER))
    # the point estimate lies inside; the same seed draws the same resamples
    point = (sum(student) / 8) / (sum(teacher) / 8)
    assert interval["chrf"][0] < point < interval["chrf"][1]
    assert (resample_indices(8, 200, seed=7) == rows).all()


def test_a_teacher_at_zero_in_a_resample_leaves_the_interval_undefined() -> None:
    rows = np.array([[0, 0], [1, 1]])
    student, teacher = np.array([10.0, 20.0]), np.array([30.0, 0.0])
    interval = retention_interval({"bleu": student[rows].mean(1)}, {"bleu": teacher[rows].mean(1)}, {"bleu": HIGHER})
    assert interval == {"bleu": None}
