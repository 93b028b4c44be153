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
