"""The learning-rate schedule: linear warmup, then the chosen decay."""

from __future__ import annotations

import pytest

from cvmkd_kd.trainer import learning_rate_at


def test_linear_warmup_reaches_the_peak_at_the_last_warmup_step() -> None:
    assert learning_rate_at(0, 1e-3, 1000, "inverse_sqrt", 10000) == pytest.approx(1e-6)
    assert learning_rate_at(499, 1e-3, 1000, "inverse_sqrt", 10000) == pytest.approx(5e-4)
    assert learning_rate_at(999, 1e-3, 1000, "inverse_sqrt", 10000) == pytest.approx(1e-3)


def test_decays() -> None:
    # inverse square root: a quarter of the peak at 16 x warmup
    assert learning_rate_at(15999, 1e-3, 1000, "inverse_sqrt", 20000) == pytest.approx(2.5e-4)
    # linear: to zero at the last step
    assert learning_rate_at(5499, 1e-3, 1000, "linear", 10000) == pytest.approx(1e-3 * 4501 / 9000)
    assert learning_rate_at(10000, 1e-3, 1000, "linear", 10000) == 0.0
    assert learning_rate_at(7000, 1e-3, 1000, "constant", 10000) == 1e-3


def test_no_warmup() -> None:
    assert learning_rate_at(0, 1e-3, 0, "constant", 100) == 1e-3
    assert learning_rate_at(3, 1e-3, 0, "inverse_sqrt", 100) == pytest.approx(1e-3 / 2)
