"""Run directories (rundir.py) through `tokenratio train`: refused when in use or holding another
run, resumed only with changes a checkpoint can honour, finished runs left alone, final models
published complete or not at all, and nothing in a checkpoint able to run code."""

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time

import pytest

from test_trainer import _cli, overrides, run
from tokenratio.cli import main
from tokenratio.rundir import COMPLETE, LOCK, is_complete

FAST = {"loss.name": "dpo", "train.max_steps": 5, "train.save_every": 2}


def train(model, data, out, *flags, **extra):
    return main(
        ["train", *overrides(model, data, out, **{**FAST, **extra}), *flags, "--no-progress"]
    )


def steps(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def test_a_directory_holding_a_run_needs_resume_or_overwrite(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    out = tmp_path / "run"
    run(tiny_model_dir, hh_jsonl, out, **FAST)
    assert is_complete(out / "final") and not (out / LOCK).exists()
    assert (out / "curves.png").stat().st_size > 10_000
    assert train(tiny_model_dir, hh_jsonl, out) == 1
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert train(tiny_model_dir, hh_jsonl, out, "--overwrite", **{"train.max_steps": 3}) == 0
    assert steps(out) == [1, 2, 3]  # the old run's rows are gone, not mixed in

    before = (out / "metrics.jsonl").read_text()
    assert train(tiny_model_dir, hh_jsonl, out, "--resume", **{"train.max_steps": 3}) == 0
    assert "already finished" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == before  # no work, no second evaluation


def test_resume_with_nothing_to_resume_says_so_and_starts(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    out = tmp_path / "fresh"
    assert train(tiny_model_dir, hh_jsonl, out, "--resume") == 0
    assert "nothing to resume" not in capsys.readouterr().out  # an empty directory: just start
    (out / "final" / COMPLETE).unlink()  # as if killed before the final model was published
    for checkpoint in (out / "checkpoints").iterdir():
        (checkpoint / "trainer_state.json").unlink()
    assert train(tiny_model_dir, hh_jsonl, out, "--resume") == 0
    assert "nothing to resume" in capsys.readouterr().out
    assert steps(out) == [1, 2, 3, 4, 5]


def test_resume_refuses_changes_it_cannot_honour_and_applies_a_new_lr(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    out = tmp_path / "run"
    extra = {"train.schedule": "constant", "train.lr": 1e-3}
    assert train(tiny_model_dir, hh_jsonl, out, **extra) == 0
    (out / "final" / COMPLETE).unlink()  # resume from checkpoint step 4
    code = train(tiny_model_dir, hh_jsonl, out, "--resume", **extra, **{"train.batch_size": 2})
    assert code == 1
    err = capsys.readouterr().err
    assert "train.batch_size: 4 -> 2" in err and "another train.output_dir" in err
    code = train(tiny_model_dir, hh_jsonl, out, "--resume", **extra, **{"loss.name": "ipo"})
    assert code == 1 and "loss.name: 'dpo' -> 'ipo'" in capsys.readouterr().err

    assert train(tiny_model_dir, hh_jsonl, out, "--resume", **{**extra, "train.lr": 1e-4}) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    assert lrs[4] == pytest.approx(1e-3) and lrs[5] == pytest.approx(1e-4)
    assert steps(out) == [1, 2, 3, 4, 5]  # step 5 logged once, by the resumed run
    resumed = json.loads((out / "resumes.jsonl").read_text())
    assert resumed == {"step": 4, "changed": {"train.lr": [1e-3, 1e-4]}}
    assert json.loads((out / "config.json").read_text())["train"]["lr"] == 1e-4


def test_a_directory_in_use_is_refused_and_a_stale_lock_taken_over(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    out = tmp_path / "run"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        started = time.perf_counter()
        assert train(tiny_model_dir, hh_jsonl, out) == 1
        assert time.perf_counter() - started < 5  # before any model or data loads
        assert f"in use by a live run (PID {sleeper.pid})" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert train(tiny_model_dir, hh_jsonl, out) == 0  # its process is gone: a stale lock
    assert is_complete(out / "final") and not (out / LOCK).exists()


def test_an_unwritable_output_dir_fails_before_loading(tiny_model_dir, hh_jsonl, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert train(tiny_model_dir, hh_jsonl, blocker / "run") == 1
    err = capsys.readouterr().err
    assert "is not writable" in err and len(err.strip().splitlines()) == 1


class _Planted:
    """Unpickling this creates a file: a stand-in for any code a crafted checkpoint could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_resume_unpickles_nothing_a_checkpoint_plants(tiny_model_dir, hh_jsonl, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    assert train(tiny_model_dir, hh_jsonl, out) == 0
    (out / "final" / COMPLETE).unlink()
    latest = sorted((out / "checkpoints").iterdir())[-1]
    assert not (latest / "custom_checkpoint_0.pkl").exists()  # the scheduler is JSON now
    assert "scheduler" in json.loads((latest / "trainer_state.json").read_text())
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"):
        (latest / name).write_bytes(pickle.dumps(_Planted(marker)))
    assert train(tiny_model_dir, hh_jsonl, out, "--resume") == 1
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err  # refused by the record of the checkpoint's files
    assert f"{latest / 'custom_checkpoint_0.pkl'} is not listed in the record" in err
    # a checkpoint from before files were recorded: Accelerate's weights_only loads refuse it
    state = json.loads((latest / "trainer_state.json").read_text())
    del state["files"]
    (latest / "trainer_state.json").write_text(json.dumps(state))
    assert train(tiny_model_dir, hh_jsonl, out, "--resume") == 1
    assert not marker.exists()
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"tokenratio train: checkpoint {latest} could not be loaded" in err


def test_checkpoints_hold_no_reference_weights(tiny_model_dir, hh_jsonl, tmp_path):
    out = tmp_path / "full"
    assert train(tiny_model_dir, hh_jsonl, out) == 0  # full fine-tuning: a frozen reference copy
    latest = sorted((out / "checkpoints").iterdir())[-1]
    weights = sorted(p.name for p in latest.glob("*.safetensors"))
    assert weights == ["model.safetensors"], weights
    policy_bytes = (out / "final" / "model.safetensors").stat().st_size
    assert (latest / "model.safetensors").stat().st_size < 1.1 * policy_bytes


def test_sigkill_during_the_final_save_never_leaves_a_half_model(
    tiny_model_dir, hh_jsonl, tmp_path
):
    out = tmp_path / "killed"
    args = overrides(tiny_model_dir, hh_jsonl, out, **{**FAST, "train.max_steps": 3})
    proc = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (out / "final.tmp").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists() or is_complete(out / "final")
    assert train(tiny_model_dir, hh_jsonl, out, "--resume", **{"train.max_steps": 3}) == 0
    assert is_complete(out / "final") and not (out / "final.tmp").exists()


def test_a_tracker_that_is_not_installed_is_an_error_at_start(
    tiny_model_dir, hh_jsonl, tmp_path, capsys, monkeypatch
):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    started = time.perf_counter()
    assert train(tiny_model_dir, hh_jsonl, tmp_path / "run", **{"train.report_to": ["wandb"]}) == 1
    assert time.perf_counter() - started < 5 and not (tmp_path / "run").exists()
    assert "asks for wandb, which is not installed" in capsys.readouterr().err


def test_a_full_disk_keeps_the_last_good_checkpoint_and_says_so(
    tiny_model_dir, hh_jsonl, tmp_path, capsys, monkeypatch
):
    import errno

    from accelerate import Accelerator

    out, real = tmp_path / "run", Accelerator.save_state
    calls = []

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the second checkpoint: the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, output_dir=output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    assert train(tiny_model_dir, hh_jsonl, out) == 1
    err = capsys.readouterr().err
    good = out / "checkpoints" / "step-000002"
    assert f"could not write the checkpoint of step 4 (No space left on device); the last good " \
           f"checkpoint is {good}" in err and "Traceback" not in err  # fmt: skip
    monkeypatch.setattr(Accelerator, "save_state", real)
    assert train(tiny_model_dir, hh_jsonl, out, "--resume") == 0
    assert steps(out) == [1, 2, 3, 4, 5]
