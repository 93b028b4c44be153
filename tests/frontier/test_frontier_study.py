"""`tokenratio frontier` end to end on the tiny model: pairs, 2 methods x 2 betas, 3 checkpoints a
run, the reference, the report's structure, checkpoint weights that are the run's own, and a
rerun that finds everything done."""

import gzip
import json
from pathlib import Path

import pytest

from tokenratio.cli import main

pytestmark = pytest.mark.slow


def write_config(path, model_dir, data, out, methods='["dpo", "tbpo-a"]'):
    path.write_text(
        f"""
[model]
name_or_path = "{model_dir}"
lora_r = 4
lora_alpha = 8
lora_dropout = 0.0
lora_last_layers = 1

[data]
path = "{data}"
max_length = 256
max_prompt_length = 192
on_invalid = "skip"

[train]
optimizer = "adamw"
batch_size = 2
warmup_ratio = 0.0
trunk_cache = true
ref_cache = true
save_merged = false
mixed_precision = "no"

[frontier]
methods = {methods}
betas = [0.1, 1.0]
lr = 1e-2
gold = "python:gold_stub:length"
train_prompts = 6
heldout_prompts = 4
samples = 3
eval_samples = 3
max_new_tokens = 6
checkpoints = 3
bootstrap_resamples = 200
output_dir = "{out}"
"""
    )
    return path


def test_frontier_trains_evaluates_checkpoints_and_reports(
    tiny_model_dir, hh_jsonl, tmp_path, capsys
):
    out = tmp_path / "frontier"
    config = write_config(tmp_path / "f.toml", tiny_model_dir, hh_jsonl, out)
    assert main(["frontier", str(config), "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["gold_reward"]["name"] == "python:gold_stub:length"
    points = report["points"]
    assert points[0]["method"] == "reference" and points[0]["kl"] == 0.0
    runs = {(p["method"], p["beta"]) for p in points[1:]}
    assert runs == {("dpo", 0.1), ("dpo", 1.0), ("tbpo-a", 0.1), ("tbpo-a", 1.0)}
    for method, beta in runs:
        steps = [p["step"] for p in points if (p["method"], p["beta"]) == (method, beta)]
        assert len(steps) >= 3 and steps == sorted(steps)
    for p in points:
        assert {"method", "beta", "seed", "step", "kl", "reward", "n_samples"} <= set(p)
        assert p["n_samples"] == 4 * 3 and p["kl"] >= 0
    assert all(p["kl"] > 0 for p in points[1:])  # every checkpoint moved away from the reference
    metrics = {(c["method"], c["metric"]) for c in report["comparisons"]}
    assert metrics == {
        ("tbpo-a", m)
        for m in ("reward_at_matched_kl", "area_between", "distinct_2_at_matched_kl",
                  "entropy_at_matched_kl")
    }  # fmt: skip
    for c in report["comparisons"]:
        assert c["baseline"] == "dpo" and {"diff", "low", "high", "verdict", "kl_range"} <= set(c)
    assert points[1]["samples"].startswith("samples/")  # relative to the report
    with gzip.open(out / points[1]["samples"], "rt") as handle:
        sample = json.loads(handle.readline())
    assert {"prompt_id", "response", "gold_reward", "kl", "log_ratio", "step"} <= set(sample)
    assert sample["gold_reward"] == len(sample["response"])
    assert (out / "frontier.png").stat().st_size > 0
    text = (out / "report.md").read_text()
    assert text.startswith("# Reward-KL frontier") and "tbpo-a vs dpo" in text
    pairs = [json.loads(line) for line in Path(report["pairs"]["path"]).read_text().splitlines()]
    heldout = set(json.loads((out / "prompts.json").read_text())["heldout"])
    assert pairs and not {p["prompt_id"] for p in pairs} & heldout
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()}
    assert main(["frontier", str(config), "--no-progress"]) == 0  # everything found, nothing redone
    assert {p.name: p.stat().st_mtime_ns for p in (out / "points").iterdir()} == stamps
    assert json.loads((out / "report.json").read_text())["points"] == points


def test_a_checkpoints_policy_is_the_runs_own_weights(tiny_model_dir, hh_jsonl, tmp_path):
    """The last checkpoint's merged policy equals the final adapter's, and differs from the
    reference: the loader puts every trained weight where training had it."""
    import torch

    from tokenratio.frontier.config import load_frontier
    from tokenratio.frontier.policies import load_policy
    from tokenratio.modeling import load_causal_lm

    out = tmp_path / "frontier"
    config = write_config(tmp_path / "f.toml", tiny_model_dir, hh_jsonl, out, '["dpo"]')
    overrides = ["frontier.betas=[0.1]", "frontier.checkpoints=2", "train.max_steps=4"]
    _, base = load_frontier(config, overrides)
    sets = [part for o in overrides for part in ("--set", o)]
    assert main(["frontier", str(config), "--no-progress", *sets]) == 0
    run_dir = out / "runs" / "dpo-b0.1-lr0.01-s0"
    reference = load_causal_lm(base.model).eval()
    final = load_policy(reference, base.model, run_dir / "final")
    step4 = load_policy(reference, base.model, run_dir / "checkpoints" / "step-000004")
    for (name, a), (_, b) in zip(
        final.state_dict().items(), step4.state_dict().items(), strict=True
    ):
        assert torch.allclose(a, b, atol=1e-6), name
    moved = [n for (n, a), (_, r) in zip(final.state_dict().items(),
             reference.state_dict().items(), strict=True) if not torch.equal(a, r)]  # fmt: skip
    assert moved and all("layers.1." in n for n in moved)  # only the adapted last layer
