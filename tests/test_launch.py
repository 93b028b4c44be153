"""No silent fallback (step.check_launch): a launch that asks for FSDP or DeepSpeed and does not get
it, or several processes that do not form one group, stop before any model loads, in one line."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokenratio.step import TrainingError, check_launch

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"


def test_an_engine_asked_for_and_not_given_is_refused():
    with pytest.raises(TrainingError, match=r"asked for FSDP .* set up MULTI_CPU with 2"):
        check_launch({"ACCELERATE_USE_FSDP": "true"}, "DistributedType.MULTI_CPU", 2)
    with pytest.raises(TrainingError, match="asked for DEEPSPEED"):
        check_launch({"ACCELERATE_USE_DEEPSPEED": "True"}, "DistributedType.NO", 1)
    check_launch({"ACCELERATE_USE_FSDP": "true"}, "DistributedType.FSDP", 8)  # given: fine
    check_launch({"ACCELERATE_USE_FSDP": "false"}, "DistributedType.NO", 1)


def test_processes_that_do_not_form_one_group_are_refused():
    with pytest.raises(TrainingError, match=r"started 2 processes .* sees 1 .* train alone"):
        check_launch({"WORLD_SIZE": "2"}, "DistributedType.NO", 1)
    check_launch({"WORLD_SIZE": "2"}, "DistributedType.MULTI_CPU", 2)
    check_launch({}, "DistributedType.NO", 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    "launch_file, said",
    [
        ("fsdp1.yaml", ("asked for FSDP", "only FSDP2 runs")),
        ("deepspeed_zero3.yaml", ("ZeRO-3", "set train.fused_head = false")),
    ],
)
def test_a_launch_the_run_cannot_follow_stops_in_one_line(
    launch_file, said, tiny_model_dir, hh_jsonl, tmp_path
):
    """configs/accelerate/fsdp.yaml with fsdp_version 1 (Accelerate would train under DDP without
    a word; only FSDP2 is given on a CPU: tests/test_sharded.py), and deepspeed_zero3.yaml with
    the fused head on (the default, which ZeRO-3's partitioned head weight cannot serve; CI
    installs DeepSpeed), as a user would launch them here: the run stops before the model loads."""
    if launch_file.startswith("deepspeed"):
        pytest.importorskip("deepspeed")  # accelerate launch needs it; .ci/run installs it
        path = CONFIGS / launch_file
    else:
        path = tmp_path / launch_file
        path.write_text((CONFIGS / "fsdp.yaml").read_text().replace("version: 2", "version: 1"))
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(path), "--num_processes", "2", "--mixed_precision", "no",
        "-m", "tokenratio.cli", "train",
        "--set", f"model.name_or_path={tiny_model_dir}", "--set", f"data.path={hh_jsonl}",
        "--set", f"train.output_dir={out}", "--set", "train.max_steps=1", "--set",
        "data.on_invalid=skip", "--set", "model.lora_r=0", "--set", "train.mixed_precision=no",
        "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "no"}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("tokenratio train:")]
    assert ours and all(words in ours[0] for words in said), result.stderr[-2000:]
    assert "Loading weights" not in result.stderr and not (out / "final").exists()


def _sharded_accelerator():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType.FSDP, is_fsdp2=True)


def test_a_sharded_run_refuses_what_it_cannot_do_before_loading():
    from dataclasses import replace

    from tokenratio.config import Config, DataConfig, LossConfig, ModelConfig
    from tokenratio.step import check_sharded

    cfg = Config(model=ModelConfig(name_or_path="x"), data=DataConfig(path="x"))
    check_sharded(cfg, _sharded_accelerator())  # full fine-tuning: fine
    lora = replace(cfg, model=replace(cfg.model, lora_r=8))
    with pytest.raises(TrainingError, match=r"LoRA under FSDP is not supported.*model.lora_r = 0"):
        check_sharded(lora, _sharded_accelerator())
    rmsprop = replace(
        cfg, loss=LossConfig(name="tbpo-q"), train=replace(cfg.train, optimizer="rmsprop")
    )
    with pytest.raises(TrainingError, match="tbpo-q's head shares the policy's optimizer"):
        check_sharded(rmsprop, _sharded_accelerator())


def test_zero3_with_the_fused_head_is_refused():
    """ZeRO-3 gathers the LM head's weight only inside its forward, which the fused head skips."""
    from dataclasses import replace
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from tokenratio.config import Config, DataConfig, ModelConfig
    from tokenratio.step import check_sharded

    cfg = Config(model=ModelConfig(name_or_path="x"), data=DataConfig(path="x"))
    plugin = SimpleNamespace(zero_stage=3)
    zero3 = SimpleNamespace(
        distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin)
    )
    with pytest.raises(TrainingError, match=r"ZeRO-3 .* train.fused_head = false"):
        check_sharded(cfg, zero3)
    check_sharded(replace(cfg, train=replace(cfg.train, fused_head=False)), zero3)
    plugin.zero_stage = 2  # ZeRO-2 keeps every parameter whole: the fused head reads it
    check_sharded(cfg, zero3)


def test_one_process_may_train_again_in_another_precision():
    """A study after another training in the same process (a notebook, the help examples)."""
    from dataclasses import replace

    from tokenratio.config import Config, DataConfig, ModelConfig
    from tokenratio.step import make_accelerator

    cfg = Config(model=ModelConfig(name_or_path="x"), data=DataConfig(path="x"))
    cfg = replace(cfg, train=replace(cfg.train, mixed_precision="no"))
    assert make_accelerator(cfg).mixed_precision == "no"
    bf16 = replace(cfg, train=replace(cfg.train, mixed_precision="bf16"))
    assert make_accelerator(bf16).mixed_precision == "bf16"
    assert make_accelerator(cfg).mixed_precision == "no"
    auto = replace(cfg, train=replace(cfg.train, mixed_precision="auto"))  # resolved, never passed
    assert make_accelerator(auto).mixed_precision in ("no", "bf16")
