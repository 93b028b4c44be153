"""A full disk (a 400 KB tmpfs holding the run directory): the run ends with one line naming what
it was writing and what to do, no traceback, nothing half-written that a later run trusts; after
space is freed, --resume finishes the run."""

import subprocess
import sys

import pytest

from test_trainer import overrides

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({made.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _train(args):
    command = [sys.executable, "-m", "tokenratio.cli", "train", *args, "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def test_a_full_disk_is_one_line_and_a_resume_after_freeing_space_finishes(
    small_disk, tiny_model_dir, hh_jsonl
):
    out = small_disk / "run"
    extra = {"loss.name": "dpo", "train.max_steps": 6, "train.save_every": 2}
    args = overrides(tiny_model_dir, hh_jsonl, out, **extra)
    full = _train(args)
    assert full.returncode == 1, full.stderr[-2000:]
    said = [line for line in full.stderr.splitlines() if line.startswith("tokenratio train:")]
    assert len(said) == 1 and "Traceback" not in full.stderr, full.stderr[-2000:]
    assert "free some space" in said[0] and ("space" in said[0] or "could not write" in said[0])
    assert not (out / "final").exists()  # never published half-written
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    resumed = _train([*args, "--resume"])  # from the last checkpoint, or from step 0
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (out / "final" / "model.safetensors").exists()
