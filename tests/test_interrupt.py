"""Ctrl-C and SIGTERM (interrupt.py): the loop stops at a step boundary with a checkpoint and one
line, and `--resume` continues to the weights of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_trainer import overrides
from tokenratio.interrupt import StopRequest


def test_the_first_signal_asks_the_second_ctrl_c_exits_at_once():
    said = []
    with StopRequest(say=said.append) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested() and stop.signal_name == "SIGTERM"
        with pytest.raises(SystemExit) as exited:
            os.kill(os.getpid(), signal.SIGINT)
        assert exited.value.code == 130
    assert said[0] == "SIGTERM: stopping after this step with a checkpoint"
    assert "exiting now" in said[1]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored


def _command(args):
    return [sys.executable, "-m", "tokenratio.cli", "train", *args, "--no-progress"]


def _wait_for_first_step(process, metrics: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and metrics.read_text().strip()):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no step logged"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_then_resume_equals_an_uninterrupted_run(tiny_model_dir, hh_jsonl, tmp_path):
    """60 steps (91 training pairs in batches of 4: 22 steps an epoch, so into the third epoch):
    SIGTERM after the first logged step; the run ends with code 143, one line naming its step,
    checkpoint and resume command; `--resume` then ends at the same weights as a run never interrupted."""
    extra = {"train.max_steps": 60, "loss.name": "dpo"}
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    done = subprocess.run(_command(overrides(tiny_model_dir, hh_jsonl, straight, **extra)))
    assert done.returncode == 0

    args = overrides(tiny_model_dir, hh_jsonl, cut, **extra)
    process = subprocess.Popen(
        _command(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait_for_first_step(process, cut / "metrics.jsonl")
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr[-2000:]
    assert "SIGTERM: stopping after this step with a checkpoint" in stdout
    (line,) = [x for x in stderr.splitlines() if "stopped by SIGTERM" in x]
    assert "Traceback" not in stderr
    step = int(line.split("at step ")[1].split(" ")[0])
    assert 1 <= step < 60, line
    assert (cut / "checkpoints" / f"step-{step:06d}" / "trainer_state.json").exists()
    assert line.endswith("--resume") and "continue with: tokenratio train" in line
    assert not (cut / "final").exists()

    resumed = subprocess.run(_command([*args, "--resume"]), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"(step {step})" in resumed.stdout
    left = load_file(straight / "final" / "model.safetensors")
    right = load_file(cut / "final" / "model.safetensors")
    for key in left:  # one process both times: the same arithmetic in the same order
        torch.testing.assert_close(right[key], left[key], rtol=0, atol=0, msg=key)
