"""The errors of the translation stack's data."""

from __future__ import annotations

from cvmkd_core.errors import CvmkdError


class CorpusError(CvmkdError):
    """A corpus is missing, empty, misaligned or not valid UTF-8; the message names file and line."""


__all__ = ["CorpusError"]
