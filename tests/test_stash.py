"""Typed keys for what plugins share: the run's stash and the summary's results."""

from __future__ import annotations

import json

import attrs
import pytest

from cvmkd_core.stash import NamedStash, Stash, StashKey
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
    summary = RunSummary(status="completed", outputs={"model": "m"})
    summary.extra[COUNT] = 1
    best: StashKey[Score] = StashKey("best")
    summary[best] = Score(0.5)
    summary[NAMES] = ["n"]
    out = summary.to_dict()
    assert list(out)[-4:] == ["outputs", "best", "names", "extra"]
    assert out["best"] == {"value": 0.5} and out["names"] == ["n"] and out["extra"] == {"count": 1}
    assert "results" not in out and "verdicts" not in out
    json.dumps(out)


def test_a_named_stash_is_written_by_name_and_read_back_by_the_same_keys() -> None:
    payload = NamedStash()
    payload[COUNT] = 3
    payload[NAMES].append("a")
    assert payload.to_dict() == {"count": 3, "names": ["a"]}
    loaded = NamedStash.from_dict(json.loads(json.dumps(payload.to_dict())))
    assert loaded[COUNT] == 3 and loaded[NAMES] == ["a"] and COUNT in loaded and len(loaded) == 2
    absent: StashKey[int] = StashKey("absent")
    assert loaded.get(absent, None) is None
    with pytest.raises(KeyError, match="nothing stored under 'absent'"):
        loaded[absent]


def test_a_string_key_or_two_keys_of_one_name_are_errors_not_silent_entries() -> None:
    summary = RunSummary()
    with pytest.raises(TypeError, match="StashKey objects, not str 'stop_reason'"):
        summary.extra["stop_reason"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError):
        summary.extra.get("stop_reason", None)  # type: ignore[arg-type]
    summary.extra[COUNT] = 1
    with pytest.raises(KeyError, match="two different keys are named 'count'"):
        summary.extra[StashKey[int]("count")] = 2
    assert summary.extra[COUNT] == 1


def test_a_checkpoint_payload_is_written_under_its_keys_names(write, toy_plugins) -> None:
    """The loop's and the toy trainer's states are saved under their keys' names."""
    import torch

    from cvmkd_core.checkpoint import CheckpointStore
    from cvmkd_core.recipe import load_recipe
    from cvmkd_core.session import Session, run_session
    from cvmkd_testing import TOY_RECIPE, TOY_STATE

    path = write("recipe.toml", TOY_RECIPE)
    session = Session(recipe=load_recipe(path, registry=toy_plugins.registry), plugins=toy_plugins, recipe_path=path)
    _, run_dir = run_session(session)
    _, saved = CheckpointStore(run_dir / "checkpoints").load("last")
    assert set(saved) == {"core", "toy"}
    assert isinstance(NamedStash.from_dict(saved)[TOY_STATE]["weight"], torch.Tensor)
