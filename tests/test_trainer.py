"""`tokenratio train` end to end on a tiny real Llama and real HH-RLHF rows: every loss, loading back,
accumulation invariance, exact resume after SIGKILL, 2 processes == 1, LoRA, non-finite stop."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tokenratio.cli import main
from tokenratio.losses import LOSSES

pytestmark = pytest.mark.slow


def overrides(model_dir, data, out, **extra):
    values = {
        "model.name_or_path": str(model_dir),
        "data.path": str(data),
        "train.output_dir": str(out),
        "data.max_length": 384,
        "data.max_prompt_length": 256,
        "data.on_invalid": "skip",
        "train.max_steps": 4,
        "train.batch_size": 4,
        "train.lr": 1e-3,
        "train.optimizer": "adamw",
        "train.warmup_ratio": 0.0,
        "train.mixed_precision": "no",  # fp32 on every CPU: the numbers do not depend on the host
        **extra,
    }
    args = []
    for key, value in values.items():
        args += ["--set", f"{key}={json.dumps(value) if isinstance(value, str | bool) else value}"]
    return args


def run(model_dir, data, out, **extra):
    code = main(["train", *overrides(model_dir, data, out, **extra), "--no-progress"])
    assert code == 0
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def weights(directory):
    return load_file(Path(directory) / "model.safetensors")


@pytest.mark.parametrize(
    "loss", sorted(n for n, loss in LOSSES.items() if not loss.weights)
)  # tisdpo: test_tisdpo.py
def test_every_loss_trains_and_loads_back(loss, tiny_model_dir, hh_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    records = run(tiny_model_dir, hh_jsonl, tmp_path, **{"loss.name": loss})
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in train)
    assert any("eval_loss" in r for r in records)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [
        not torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters(), strict=True)
    ]
    assert any(changed)
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["format"] == "hh-chat" and report["train_pairs"] > 16  # the tiny chat template
    if loss == "tbpo-q":
        from tokenratio.baseline import StateBaselineHead

        head = StateBaselineHead.from_pretrained(tmp_path / "final")
        assert head.hidden_size == model.config.hidden_size


def test_gradient_accumulation_matches_one_big_batch(tiny_model_dir, hh_jsonl, tmp_path):
    """Batch 4 once == batch 2 accumulated twice (same global batches, same update). Grouping
    by length depends on the micro-batch size, so it is off here."""
    same = {"loss.name": "tbpo-a", "train.group_by_length": False}
    run(tiny_model_dir, hh_jsonl, tmp_path / "big", **same)
    run(
        tiny_model_dir,
        hh_jsonl,
        tmp_path / "acc",
        **{**same, "train.batch_size": 2, "train.grad_accumulation": 2},
    )
    big, acc = weights(tmp_path / "big" / "final"), weights(tmp_path / "acc" / "final")
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-4, atol=1e-6)


def _cli(*args):
    return [sys.executable, "-m", "tokenratio.cli", "train", *args, "--no-progress"]


def test_resume_after_sigkill_reaches_the_uninterrupted_weights(tiny_model_dir, hh_jsonl, tmp_path):
    extra = {
        "loss.name": "tbpo-q",
        "train.max_steps": 40,
        "train.batch_size": 2,
        "train.save_every": 3,
        "train.schedule": "cosine",
        "train.warmup_ratio": 0.1,
    }
    run(tiny_model_dir, hh_jsonl, tmp_path / "straight", **extra)

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        _cli(*overrides(tiny_model_dir, hh_jsonl, out, **extra)),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while not (out / "checkpoints" / "step-000006").exists() and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "final").exists()
    assert (
        main(
            [
                "train",
                *overrides(tiny_model_dir, hh_jsonl, out, **extra),
                "--resume",
                "--no-progress",
            ]
        )
        == 0
    )
    straight, resumed = weights(tmp_path / "straight" / "final"), weights(out / "final")
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=1e-6)
    head_a = load_file(tmp_path / "straight" / "final" / "baseline_head.safetensors")
    head_b = load_file(out / "final" / "baseline_head.safetensors")
    for name in head_a:
        torch.testing.assert_close(head_b[name], head_a[name], rtol=0, atol=1e-6)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step-000036",
        "step-000039",
    ]  # rotation keeps 2, no .tmp leftovers


@pytest.mark.parametrize("loss", ["tbpo-a", "tbpo-q"])
def test_two_processes_match_one_process(loss, tiny_model_dir, hh_jsonl, tmp_path):
    """torchrun, 2 CPU processes (gloo), batch 2 each == 1 process, batch 4: same loss curve.
    tbpo-a runs the reference in the step; tbpo-q reads it from the cache, which the two
    processes score half each (into a fresh cache directory)."""
    extra = {"loss.name": loss, "train.max_steps": 5, "train.group_by_length": False}
    one = run(tiny_model_dir, hh_jsonl, tmp_path / "one", **extra)
    out = tmp_path / "two"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "-m",
        "tokenratio.cli",
        "train",
        *overrides(tiny_model_dir, hh_jsonl, out, **{**extra, "train.batch_size": 2}),
        "--no-progress",
    ]
    env = {**os.environ, "TOKENRATIO_REF_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("done: 5 steps") == 1
    if loss == "tbpo-q":
        assert result.stdout.count("reference log-probs: scored") == 1
        assert len(list((tmp_path / "cache").glob("*/shard-*.safetensors"))) == 2  # one each
    two = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(two) == len(one)
    for a, b in zip(one, two, strict=True):
        key = "loss" if "loss" in a else "eval_loss"
        assert abs(a[key] - b[key]) < 1e-5, (a, b)


def test_lora_uses_adapter_disabled_reference_and_merges(tiny_model_dir, hh_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    run(
        tiny_model_dir,
        hh_jsonl,
        tmp_path,
        **{"loss.name": "tbpo-a", "model.lora_r": 4, "model.lora_alpha": 8, "train.lr": 1e-2},
    )
    assert (tmp_path / "final" / "adapter" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    diffs = {
        n: (a - b).abs().max().item()
        for (n, a), (_, b) in zip(merged.named_parameters(), base.named_parameters(), strict=True)
    }
    assert any(d > 0 for n, d in diffs.items() if "q_proj" in n)
    assert all(d == 0 for n, d in diffs.items() if "embed" in n or "norm" in n)


def test_lora_checkpoints_hold_the_adapter_and_resume_from_it(tiny_model_dir, hh_jsonl, tmp_path):
    """A LoRA checkpoint holds what resuming needs: the adapter (and the TBPO-Q head), not the
    frozen base model, which is also the reference; a resume loads it and finishes."""
    from safetensors import safe_open

    extra = {
        "loss.name": "tbpo-q",
        "model.lora_r": 4,
        "model.lora_alpha": 8,
        "train.lr": 1e-2,
        "train.save_every": 2,
        "train.max_steps": 2,
    }
    run(tiny_model_dir, hh_jsonl, tmp_path, **extra)
    checkpoint = tmp_path / "checkpoints" / "step-000002" / "model.safetensors"
    saved = load_file(checkpoint)
    assert saved and all("lora_" in n or n.startswith("head.") for n in saved), sorted(saved)[:5]
    final = load_file(tmp_path / "final" / "adapter" / "adapter_model.safetensors")
    lora_a = next(n for n in saved if "lora_A" in n)
    assert any(torch.equal(saved[lora_a], t) for t in final.values())  # the trained adapter
    shutil.rmtree(tmp_path / "final")  # as if stopped after step 2's checkpoint
    args = overrides(tiny_model_dir, hh_jsonl, tmp_path, **{**extra, "train.max_steps": 3})
    assert main(["train", *args, "--resume", "--no-progress"]) == 0
    assert (tmp_path / "final" / "COMPLETE").exists()
    with safe_open(str(checkpoint), framework="pt") as handle:
        assert len(list(handle.keys())) == len(saved)


def test_lora_on_the_last_layers_leaves_the_ones_below_untouched(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    from transformers import AutoModelForCausalLM

    settings = {"loss.name": "dpo", "model.lora_r": 4, "train.lr": 1e-2}
    run(
        tiny_model_dir,
        hh_jsonl,
        tmp_path,
        **settings,
        **{"model.lora_last_layers": 1, "train.group_by_length": True},
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = {
        n
        for (n, a), (_, b) in zip(merged.named_parameters(), base.named_parameters(), strict=True)
        if not torch.equal(a, b)
    }
    assert changed and all(n.startswith("model.layers.1.") for n in changed), changed
    bad = overrides(tiny_model_dir, hh_jsonl, tmp_path / "bad", **settings)
    assert main(["train", *bad, "--set", "model.lora_last_layers=3", "--no-progress"]) != 0
    assert "lora_last_layers=3, but the model has 2 layers" in capsys.readouterr().err


def test_non_finite_loss_stops_with_a_clear_message(tiny_model_dir, hh_jsonl, tmp_path, capsys):
    args = overrides(
        tiny_model_dir,
        hh_jsonl,
        tmp_path,
        **{
            "loss.name": "dpo",
            "train.lr": 1e30,
            "train.optimizer": "rmsprop",
            "train.max_steps": 8,
            "train.save_every": 1,
            "train.max_grad_norm": 0.0,
        },
    )
    assert main(["train", *args, "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss or gradient" in err and "last good checkpoint" in err
    last = sorted((tmp_path / "checkpoints").glob("step-*"))[-1]
    state = load_file(next(last.glob("model*.safetensors")))
    assert all(torch.isfinite(t).all() for t in state.values())
    assert not (tmp_path / "final").exists()


def test_a_resume_after_the_final_evaluation_logs_it_once_and_warns_of_a_lost_rng_state(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    """Killed between the final evaluation and publishing final/ (final/ removed here), with the
    checkpoint's RNG state lost (a checkpoint written without it: the file and its record gone;
    a file changed after writing is refused, tests/test_rundir.py): the resumed run publishes
    final/, logs no step twice, and says in one line that the RNG state could not be restored."""
    out = tmp_path / "run"
    records = run(tiny_model_dir, hh_jsonl, out, **{"train.save_every": 4})
    shutil.rmtree(out / "final")
    rng = out / "checkpoints" / "step-000004" / "random_states_0.pkl"
    rng.unlink()
    state_path = rng.parent / "trainer_state.json"
    state = json.loads(state_path.read_text())
    del state["files"][rng.name]
    state_path.write_text(json.dumps(state))
    capsys.readouterr()
    assert main(["train", *overrides(tiny_model_dir, hh_jsonl, out, **{"train.save_every": 4}),
                 "--resume", "--no-progress"]) == 0  # fmt: skip
    said = capsys.readouterr().out
    assert f"warning: {rng} could not be restored" in said
    again = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert again == records  # the same records, none twice
    assert (out / "final" / "COMPLETE").exists()


def test_a_truncated_checkpoint_is_refused_in_one_line(tiny_model_dir, hh_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    run(tiny_model_dir, hh_jsonl, out, **{"train.save_every": 2, "train.max_steps": 2})
    shutil.rmtree(out / "final")
    weights = out / "checkpoints" / "step-000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    code = main(["train", *overrides(tiny_model_dir, hh_jsonl, out, **{"train.save_every": 2,
                 "train.max_steps": 2}), "--resume", "--no-progress"])  # fmt: skip
    # tokenratio's own lines: the libraries' loading bars share stderr
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("tokenratio")]
    assert code == 1 and len(err) == 1, err
    assert f"{weights} differs from the record of checkpoint" in err[0]
    assert "delete that checkpoint" in err[0]


def test_held_out_curves_start_at_step_0_where_the_policy_is_the_reference(
    tiny_model_dir, hh_jsonl, tmp_path
):
    """With train.eval_every, the first held-out point is the reference itself: every implicit
    reward is 0 up to float rounding (the policy's pass and the cached reference's differ in
    the last bits, by another amount on AVX2 kernels than on AVX512 ones), so DPO's loss is log 2
    and its margin 0; the accuracy of rewards that small is rounding noise, not tested."""
    import math

    records = run(
        tiny_model_dir, hh_jsonl, tmp_path / "r", **{"loss.name": "dpo", "train.eval_every": 2}
    )
    first = records[0]
    assert first["step"] == 0 and abs(first["eval_reward_margin"]) < 1e-5
    assert first["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert [r["step"] for r in records if "eval_loss" in r] == [0, 2, 4]


def test_a_checkpoint_resumes_only_under_the_launch_that_wrote_it(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    """Its data position counts micro-batches per process: a checkpoint written by 2 processes
    (here: its record says so) is refused in one line by a 1-process resume, before any load."""
    import shutil

    out = tmp_path / "r"
    run(tiny_model_dir, hh_jsonl, out, **{"loss.name": "dpo", "train.save_every": 2})
    shutil.rmtree(out / "final")
    state_path = out / "checkpoints" / "step-000004" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    assert state["launch"] == {
        "processes": 1, "engine": "no distributed engine", "global_batch": 4,
    }  # fmt: skip
    state["launch"].update(processes=2, engine="DDP over CPU processes (gloo)", global_batch=8)
    state_path.write_text(json.dumps(state))
    args = overrides(tiny_model_dir, hh_jsonl, out, **{"loss.name": "dpo", "train.save_every": 2})
    assert main(["train", *args, "--resume", "--no-progress"]) == 1
    err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("tokenratio train:")]
    assert len(err) == 1 and "was written by 2 processes under DDP" in err[0], err
    assert "this run has 1 process under no distributed engine" in err[0]
