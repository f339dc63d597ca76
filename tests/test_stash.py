"""Typed keys for what plugins share: the run's stash and the summary's results."""

from __future__ import annotations

import json

import attrs
import pytest

from cvmkd_core.stash import Stash, StashKey
from cvmkd_core.state import RunSummary

COUNT: StashKey[int] = StashKey("count")
NAMES: StashKey[list[str]] = StashKey("names", list)


def test_a_key_holds_its_value_and_a_missing_one_is_an_error_naming_it() -> None:
    stash = Stash()
    assert COUNT not in stash and stash.get(COUNT, None) is None
    with pytest.raises(KeyError, match="nothing stored under 'count' yet"):
        stash[COUNT]
    stash[COUNT] = 3
    assert stash[COUNT] == 3 and COUNT in stash and len(stash) == 1
    # another key of the same name is another entry: keys are objects, not strings
    assert StashKey[int]("count") not in stash
    assert stash.setdefault(COUNT, 7) == 3
    del stash[COUNT]
    assert COUNT not in stash


def test_a_key_with_a_default_makes_its_entry_when_first_read() -> None:
    stash = Stash()
    stash[NAMES].append("a")
    stash[NAMES].append("b")
    assert stash[NAMES] == ["a", "b"]


@attrs.define
class Score:
    value: float


def test_summary_results_are_written_under_their_names_between_outputs_and_extra() -> None:
    summary = RunSummary(status="completed", outputs={"model": "m"}, extra={"x": 1})
    best: StashKey[Score] = StashKey("best")
    summary[best] = Score(0.5)
    summary[NAMES] = ["n"]
    out = summary.to_dict()
    assert list(out)[-4:] == ["outputs", "best", "names", "extra"]
    assert out["best"] == {"value": 0.5} and out["names"] == ["n"] and out["extra"] == {"x": 1}
    assert "results" not in out and "verdicts" not in out
    json.dumps(out)
