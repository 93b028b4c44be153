"""A real pretrained model: SmolLM2-135M-Instruct from the offline GGUF wheel, converted once, trained
for a few steps of TBPO-A and TBPO-Q on HH-RLHF harmless pairs from ../shared, with held-out
preference accuracy reported. CI installs the wheel and sets TOKENRATIO_REQUIRE_SMOLLM2=1, so there
this test cannot skip."""

import json
from pathlib import Path

import pytest

from tokenratio.cli import main

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).parents[1] / "configs" / "smollm2_hh_cpu.toml"


@pytest.mark.parametrize("loss", ["tbpo-a", "tbpo-q"])
def test_smollm2_trains_on_hh_harmless_pairs(loss, smollm2_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / loss
    settings = {
        "model.name_or_path": smollm2_dir,
        "loss.name": loss,
        "train.output_dir": out,
        "data.limit": 40,
        "train.max_steps": 2,
        "train.batch_size": 1,
        "train.grad_accumulation": 1,
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.ref_cache": "false",  # tested on the tiny model; here it would score 40 pairs more
    }
    args = ["train", str(CONFIG), "--no-progress"]
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    assert "held-out: " in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert 0.0 <= final["eval_reward_accuracy"] <= 1.0 and final["eval_loss"] > 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["format"] == "hh-chat" and report["chat_template"]  # SmolLM2's own template
    assert report["heldout_pairs"] >= 4
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.model_type == "llama" and model.num_parameters() > 100e6


def test_checkpoints_load_in_float32_on_a_cpu_whatever_they_were_saved_in(tmp_path):
    """A bf16 checkpoint (convert-gguf's default) runs ~100x slower in bf16 than in fp32 on a CPU
    without native bf16: eval and explain found the study's reference taking minutes per batch."""
    import torch
    from transformers import AutoModelForCausalLM

    from tiny import make_tiny_model
    from tokenratio.modeling import load_pretrained

    path = make_tiny_model(tmp_path / "tiny")
    AutoModelForCausalLM.from_pretrained(path).to(torch.bfloat16).save_pretrained(path)
    model, _, _ = load_pretrained(str(path), device="cpu")
    assert next(model.parameters()).dtype == torch.float32
    model, _, _ = load_pretrained(str(path), device="cpu", dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
