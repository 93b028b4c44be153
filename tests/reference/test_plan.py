"""reference.plan: which runs read the cache, which run a reference every step and why, in one
line; the key covers the reference by content and the settings it was scored under."""

import os
import shutil

import pytest
import torch

from tokenratio import reference
from tokenratio.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig
from tokenratio.losses import LOSSES
from tokenratio.reference import key

CACHED = ["bpo", "dpo", "ipo", "tbpo-a[kl_estimator=k3]", "tbpo-q", "tisdpo"]


def config(model_dir, name="dpo", options=None, **train):
    return Config(
        model=ModelConfig(name_or_path=str(model_dir)),
        data=DataConfig(path="data.jsonl"),
        loss=LossConfig(name=name, options=options or {}),
        train=TrainConfig(**train),
    )


def plan_of(model_dir, method, **train):
    from tokenratio.methods import parse_method

    name, options = parse_method(method)
    cfg = config(model_dir, name, options, **train)
    return reference.plan(cfg, LOSSES[name].needs(options))


def test_the_cache_serves_every_loss_that_reads_log_probs_or_k3_samples(tiny_model_dir):
    methods = [*LOSSES, "tbpo-a[kl_estimator=k3]"]
    cached = sorted(m for m in methods if plan_of(tiny_model_dir, m).cached)
    assert cached == CACHED
    k3 = plan_of(tiny_model_dir, "tbpo-a[kl_estimator=k3]", k3_samples=3)
    assert k3.samples == 3 and "3 k3 token(s)" in k3.reason
    assert plan_of(tiny_model_dir, "dpo").samples == 0


def test_a_run_that_cannot_read_the_cache_says_why_in_one_line(tiny_model_dir):
    exact = plan_of(tiny_model_dir, "tbpo-a")
    assert exact.source == "copy" and "exact KL" in exact.reason and "k3" in exact.reason
    off = plan_of(tiny_model_dir, "dpo", ref_cache=False)
    assert off.source == "copy" and "train.ref_cache = false" in off.reason
    sft = plan_of(tiny_model_dir, "sft")
    assert sft.source == "none" and "\n" not in sft.reason
    cfg = config(tiny_model_dir, "tdpo1")
    lora = reference.plan(
        Config(model=ModelConfig(name_or_path=str(tiny_model_dir), lora_r=4), loss=cfg.loss),
        LOSSES["tdpo1"].needs({}),
    )
    assert lora.source == "adapter" and "LoRA adapter off" in lora.reason


def _key(cfg, identity, tokenizer):
    return key.cache_key(cfg, identity, tokenizer, "cpu", 0)


def test_weights_swapped_in_place_with_the_old_mtime_change_the_key(tiny_model_dir, tmp_path):
    """The issue's case: same shapes, same file name, size and mtime, other weights."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    tokenizer = AutoTokenizer.from_pretrained(model)
    cfg = config(model)
    before = _key(cfg, key.model_identity(cfg.model), tokenizer)
    weights = model / "model.safetensors"
    stat = weights.stat()
    tensors = {k: v + 0.01 for k, v in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert weights.stat().st_mtime_ns == stat.st_mtime_ns
    assert _key(cfg, key.model_identity(cfg.model), tokenizer) != before


def test_precision_attention_tokenizer_and_data_settings_are_in_the_key(tiny_model_dir):
    from dataclasses import replace

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = config(tiny_model_dir)
    base = _key(cfg, "x", tokenizer)
    variants = [
        replace(cfg, train=replace(cfg.train, mixed_precision="bf16")),
        replace(cfg, model=replace(cfg.model, attn_implementation="eager")),
        replace(cfg, model=replace(cfg.model, dtype="bfloat16")),
        replace(cfg, data=replace(cfg.data, max_length=64)),
        replace(cfg, data=replace(cfg.data, chat_template=False)),
    ]
    keys = {base, *(_key(v, "x", tokenizer) for v in variants)}
    assert len(keys) == 1 + len(variants)
    assert key.cache_key(cfg, "x", tokenizer, "cuda", 0) != base
    assert key.cache_key(cfg, "x", tokenizer, "cpu", 2) != base
    tokenizer.chat_template = "{{ messages }}"
    assert _key(cfg, "x", tokenizer) != base


def test_hub_ids_are_keyed_by_their_resolved_revision(tmp_path, monkeypatch, tiny_model_dir):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    refs = tmp_path / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("abc123\n")
    assert key.model_identity(ModelConfig(name_or_path="org/model")) == "hub:org/model@abc123"
    (refs / "main").write_text("def456\n")
    assert key.model_identity(ModelConfig(name_or_path="org/model")) == "hub:org/model@def456"
    # a hub dataset id is never stat()ed; its revision where the cache has one
    assert key.data_identity("HuggingFaceH4/ultrafeedback_binarized").endswith("@unresolved")
    refs = tmp_path / "datasets--org--pairs" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text("fed789")
    assert key.data_identity("org/pairs") == "hub:org/pairs@fed789"
    # a model whose revision nobody can tell: no cache, said in the plan's line
    cfg = config("org/unknown")
    unknown = reference.plan(cfg, LOSSES["dpo"].needs({}))
    assert unknown.source == "copy" and "could not be resolved" in unknown.reason


def test_the_frozen_copy_is_taken_only_for_the_copy_plan(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert reference.frozen_copy(plan_of(tiny_model_dir, "dpo"), model) is None
    copy = reference.frozen_copy(plan_of(tiny_model_dir, "tdpo1"), model)
    assert not any(p.requires_grad for p in copy.parameters()) and not copy.training
    first = next(copy.parameters())
    assert first.data_ptr() != next(model.parameters()).data_ptr()
    assert torch.equal(first, next(model.parameters()))


@pytest.mark.parametrize("value", [0, -1])
def test_k3_samples_must_be_positive(value):
    from tokenratio.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="k3_samples"):
        load_config(None, [f"train.k3_samples={value}", "model.name_or_path=x", "data.path=y"])
