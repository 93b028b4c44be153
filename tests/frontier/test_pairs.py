"""Pairs from the reference (frontier/pairs.py): counts and ties, a file `tokenratio train` reads,
resume after a kill, and a new key for every setting that decides them."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tokenratio.frontier import pairs as pairs_module
from tokenratio.frontier.gold import load_gold_reward
from tokenratio.frontier.pairs import PairSettings, Prompt, generate_pairs, label_pairs, pairs_key

PROMPTS = [Prompt(f"p{i}", f"Tell me about the number {i}.") for i in range(20)]
SETTINGS = PairSettings(samples=4, max_new_tokens=6, seed=0)


def test_every_two_samples_are_a_pair_and_ties_are_dropped_and_counted():
    prompt = Prompt("x", "hi")
    found, ties = label_pairs(prompt, ["a", "b", "c", "d"], [0.5, 0.1, 0.5, -0.2], 0.0)
    assert ties == 1 and len(found) == 5  # 6 pairs, (a, c) tied
    first = found[0]
    assert first["chosen"][0]["content"] == "a" and first["rejected"][0]["content"] == "b"
    assert (first["chosen_sample"], first["rejected_sample"]) == (0, 1)
    assert first["gold_chosen"] == 0.5 and first["gold_rejected"] == 0.1
    assert label_pairs(prompt, ["a", "b", "c", "d"], [0.5, 0.1, 0.5, -0.2], 0.45)[1] == 4


def test_pairs_are_a_preference_file_train_reads(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from tokenratio.config import DataConfig
    from tokenratio.data import load_raw, tokenize_dataset

    gold = load_gold_reward("python:gold_stub:length")
    report = generate_pairs(str(tiny_model_dir), PROMPTS, gold, SETTINGS, tmp_path, False)
    assert report["prompts"] == 20 and report["samples"] == 80
    assert report["pairs"] + report["ties_dropped"] == 20 * 6
    records = [json.loads(line) for line in Path(report["path"]).read_text().splitlines()]
    assert len(records) == report["pairs"]
    first = records[0]
    assert first["gold_reward"]["name"] == "python:gold_stub:length"
    assert first["model"].startswith("dir:") and first["seed"] == 0 and first["prompt_id"] == "p0"
    assert first["gold_chosen"] > first["gold_rejected"]
    assert first["gold_chosen"] == len(first["chosen"][0]["content"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = DataConfig(path=report["path"], on_invalid="skip", max_length=128, max_prompt_length=64)
    data, counts = tokenize_dataset(load_raw(report["path"], on_invalid="skip"), tokenizer, cfg)
    assert counts["format"] == "trl" and len(data) + counts["invalid"] == report["pairs"]


def test_a_killed_run_resumes_from_its_parts(tiny_model_dir, tmp_path, monkeypatch):
    gold = load_gold_reward("python:gold_stub:length")
    whole = generate_pairs(str(tiny_model_dir), PROMPTS, gold, SETTINGS, tmp_path / "a", False)
    cut = tmp_path / "b"
    shutil.copytree(tmp_path / "a", cut)
    for name in (f"pairs-{whole['key']}.jsonl", f"pairs-{whole['key']}.json"):
        (cut / name).unlink()  # killed before the end: the first part survives, the second not
    (cut / f".parts-{whole['key']}" / "part-0000016.json").unlink()
    sampled = []
    original = pairs_module._sample_missing_parts

    def counting(model_dir, prompts, gold, settings, parts, progress):
        sampled.extend(p.name for p in parts.iterdir())
        original(model_dir, prompts, gold, settings, parts, progress)
        sampled.append(sorted(p.name for p in parts.iterdir()))

    monkeypatch.setattr(pairs_module, "_sample_missing_parts", counting)
    again = generate_pairs(str(tiny_model_dir), PROMPTS, gold, SETTINGS, cut, False)
    assert sampled[0] == "part-0000000.json"  # only the first part was on disk
    assert Path(again["path"]).read_text() == Path(whole["path"]).read_text()  # the same pairs


@pytest.mark.parametrize(
    "change",
    [
        {"samples": 3}, {"max_new_tokens": 7}, {"tie_margin": 0.1}, {"seed": 1},
    ],
)  # fmt: skip
def test_every_setting_is_in_the_key(change):
    gold = load_gold_reward("python:gold_stub:length")
    base = pairs_key("dir:abc", PROMPTS, gold, SETTINGS)
    assert pairs_key("dir:abc", PROMPTS, gold, replace(SETTINGS, **change)) != base


def test_the_model_the_prompts_and_the_gold_reward_are_in_the_key():
    gold = load_gold_reward("python:gold_stub:length")
    base = pairs_key("dir:abc", PROMPTS, gold, SETTINGS)
    assert pairs_key("dir:abd", PROMPTS, gold, SETTINGS) != base
    assert pairs_key("dir:abc", PROMPTS[:-1], gold, SETTINGS) != base
    assert pairs_key("dir:abc", PROMPTS, load_gold_reward("vader"), SETTINGS) != base


def test_weights_changed_in_place_regenerate(tiny_model_dir, tmp_path):
    gold = load_gold_reward("python:gold_stub:length")
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    first = generate_pairs(str(model), PROMPTS[:2], gold, SETTINGS, tmp_path / "out", False)
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8:] = bytes(8)  # another value in the last weight, same size
    weights.write_bytes(bytes(data))
    second = generate_pairs(str(model), PROMPTS[:2], gold, SETTINGS, tmp_path / "out", False)
    assert second["key"] != first["key"] and second["path"] != first["path"]
