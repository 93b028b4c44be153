"""A study reuses a result only when its settings are the study's (study/reuse.py)."""

import json

import pytest

from tokenratio.study import reuse


def test_differences_name_the_dotted_keys_both_sides_hold():
    stored = {"train": {"max_steps": 8, "lr": 1e-3, "old_key": 1}, "data": {"path": "a"}}
    expected = {"train": {"max_steps": 3, "lr": 1e-3}, "data": {"path": "a"}, "new": 2}
    assert reuse.differences(stored, expected) == ["train.max_steps: 8 -> 3"]
    assert reuse.differences({"a": (1, 2)}, {"a": [1, 2]}) == []  # JSON has no tuples


def test_check_refuses_in_one_line_and_overwrite_removes(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": {"optimizer": "adamw", "max_steps": 8}}))
    reuse.check(run, "config.json", {"train": {"optimizer": "adamw", "max_steps": 8}}, False)
    asked = {"train": {"optimizer": "rmsprop", "max_steps": 3}}
    with pytest.raises(reuse.StudyReuseError) as caught:
        reuse.check(run, "config.json", asked, False)
    message = str(caught.value)
    assert (
        "train.max_steps: 8 -> 3" in message and "train.optimizer: 'adamw' -> 'rmsprop'" in message
    )
    assert "\n" not in message and "--overwrite" in message and run.exists()
    reuse.check(run, "config.json", asked, True)
    assert not run.exists()
    reuse.check(tmp_path / "never-run", "config.json", asked, False)  # nothing there: fine
