"""The errors of validation and its metrics."""

from __future__ import annotations

from cvmkd_core.errors import CheckError


class MetricError(CheckError):
    """A metric is misconfigured (unknown composite key...) or returned something unusable; raised
    in ``cvmkd_check``, it is reported as a recipe error."""


__all__ = ["MetricError"]
