"""Atomic checkpoints without a training run: `latest` ignores half-written directories, rotation
keeps the newest. (Resume after SIGKILL, end to end, is in test_trainer.py.)"""

import json

from tokenratio import checkpoint


def make(root, step, complete=True, tmp=False):
    directory = checkpoint.checkpoint_dir(root, step)
    if tmp:
        directory = directory.with_name(directory.name + ".tmp")
    directory.mkdir(parents=True)
    if complete:
        (directory / checkpoint.STATE_NAME).write_text(json.dumps({"step": step}))
    return directory


def test_latest_skips_temporary_and_incomplete_directories(tmp_path):
    assert checkpoint.latest(tmp_path / "missing") is None
    make(tmp_path, 3)
    make(tmp_path, 9, tmp=True)  # a crash while writing step 9
    make(tmp_path, 6, complete=False)  # no trainer state: never published
    assert checkpoint.latest(tmp_path) == checkpoint.checkpoint_dir(tmp_path, 3)


def test_rotation_keeps_the_newest_and_removes_leftovers(tmp_path):
    for step in (1, 2, 3, 4):
        make(tmp_path, step)
    make(tmp_path, 5, tmp=True)
    checkpoint._rotate(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]


import pytest  # noqa: E402


@pytest.mark.parametrize(
    "content, why",
    [
        ("", "not a readable trainer state"),
        ('{"step": 3, "epo', "not a readable trainer state"),  # truncated
        ("\x00\xff garbage", "not a readable trainer state"),
        ("[1, 2]", "expected a JSON object"),
        ("{}", "step = None"),
        ('{"step": -5, "epoch": 0, "micro_batch": 0}', "step = -5"),
        ('{"step": 3, "epoch": 0, "micro_batch": "x"}', "micro_batch = 'x'"),
        ('{"step": 4, "epoch": 0, "micro_batch": 0}', "in a checkpoint named step-000003"),
    ],
    ids=["empty", "truncated", "garbage", "list", "no step", "negative", "not a count", "renamed"],
)
def test_a_damaged_trainer_state_is_one_line_naming_the_file(tmp_path, content, why):
    directory = checkpoint.checkpoint_dir(tmp_path, 3)
    directory.mkdir()
    (directory / checkpoint.STATE_NAME).write_bytes(content.encode("utf-8", "surrogateescape"))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.read_state(directory)
    message = str(err.value)
    assert str(directory / checkpoint.STATE_NAME) in message and why in message
    assert "\n" not in message and "--overwrite" in message


def test_a_step_past_the_run_is_refused_before_anything_loads(tmp_path):
    directory = make(tmp_path, 999)
    (directory / checkpoint.STATE_NAME).write_text('{"step": 999, "epoch": 0, "micro_batch": 0}')
    assert checkpoint.read_state(directory)["step"] == 999
    with pytest.raises(checkpoint.CheckpointError, match="past this run's 8 steps"):
        checkpoint.read_state(directory, total_steps=8)
