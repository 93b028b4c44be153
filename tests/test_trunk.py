"""The frozen trunk (trunk.py): a step on cached trunk states gives the full forward's losses and
gradients for every registry loss in both layouts; runs it cannot serve are refused in one line;
the cache is keyed by the trunk's weights and drops damaged shards."""

import contextlib
import dataclasses
import os

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from tokenratio import trunk
from tokenratio.batch import collate, collate_shared
from tokenratio.config import ModelConfig
from tokenratio.losses import LOSSES
from tokenratio.modeling import build_policy, unwrap_peft
from tokenratio.scoring import score_pairs

ROWS = [
    {"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6, 7], "rejected_ids": [8, 9]},
    {"prompt_ids": [10, 11], "chosen_ids": [12, 13, 14, 15, 16], "rejected_ids": [17]},
    {"prompt_ids": [20, 21, 22], "chosen_ids": [23], "rejected_ids": [24, 25, 26, 27]},
]
LORA = ModelConfig(name_or_path="x", lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_last_layers=2)


def tiny_llama(layers: int = 4, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, **overrides,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def policy_for(loss: str, model=None):
    """A LoRA policy whose adapters are not zero (so policy and reference differ)."""
    policy = build_policy(LORA, LOSSES[loss].needs({}), model or tiny_llama())
    torch.manual_seed(1)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    return policy


def cache_for(policy) -> trunk.TrunkCache:
    layers = trunk.trunk_layers(LORA, policy.model)
    cache = trunk.TrunkCache(layers, "test")
    cache.compute_missing(unwrap_peft(policy.model), ROWS, 0, 2, contextlib.nullcontext)
    return cache


def losses_and_grads(policy, batch, loss: str):
    needs = LOSSES[loss].needs({})

    def reference(b):
        with policy.model.disable_adapter():
            return policy(b)[0]

    policy.zero_grad()
    if needs.weights:  # TIS-DPO: some per-token weights
        weights = torch.linspace(0.5, 1.5, batch.labels.numel()).view_as(batch.labels)
        batch.weights = weights * (batch.labels != -100)
    values = score_pairs(policy, reference, batch, needs, chunk_elements=1 << 20)
    losses, _ = LOSSES[loss](values, beta=0.1)
    losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return losses.detach(), grads


@pytest.mark.parametrize("layout", [collate, collate_shared], ids=["plain", "shared"])
@pytest.mark.parametrize("loss", sorted(n for n in LOSSES if n != "sft"))
def test_cached_trunk_gives_the_full_forwards_losses_and_gradients(loss, layout):
    policy = policy_for(loss)
    cache = cache_for(policy)
    full = losses_and_grads(policy, layout(ROWS, 0), loss)
    cached_batch = cache.fill(layout(ROWS, 0), ROWS)
    assert cached_batch.trunk_hidden is not None and cached_batch.trunk_layers == 2
    cached = losses_and_grads(policy, cached_batch, loss)
    torch.testing.assert_close(cached[0], full[0], rtol=1e-5, atol=1e-6)
    assert cached[1].keys() == full[1].keys() and cached[1]
    for name in full[1]:
        torch.testing.assert_close(cached[1][name], full[1][name], rtol=1e-4, atol=1e-6)


def test_the_upper_layers_run_alone_on_cached_states():
    """Garbage in the trunk's states changes the output: the cached states are what is read."""
    policy = policy_for("dpo")
    cache = cache_for(policy)
    batch = cache.fill(collate_shared(ROWS, 0), ROWS)
    calls = []
    lower = unwrap_peft(policy.model).base_model.layers[0]
    handle = lower.register_forward_hook(lambda *_: calls.append(1))
    rows, _ = policy(batch)  # HeadRows: the final hidden states and the head
    handle.remove()
    assert not calls  # layer 0 never ran
    batch.trunk_hidden = batch.trunk_hidden + 1.0
    assert not torch.allclose(policy(batch)[0].hidden, rows.hidden)


def test_runs_the_trunk_cannot_serve_are_refused():
    full = dataclasses.replace(LORA, lora_r=0)
    with pytest.raises(trunk.TrunkError, match="full fine-tuning"):
        trunk.trunk_layers(full, tiny_llama())
    every = dataclasses.replace(LORA, lora_last_layers=0)
    with pytest.raises(trunk.TrunkError, match="every layer"):
        trunk.trunk_layers(every, policy_for("dpo").model)
    dropout = policy_for("dpo", tiny_llama(attention_dropout=0.1))
    with pytest.raises(trunk.TrunkError, match=r"dropout 0\.1"):
        trunk.trunk_layers(LORA, dropout.model)
    trained = policy_for("dpo")
    unwrap_peft(trained.model).base_model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    with pytest.raises(trunk.TrunkError, match="layer 0 trains"):
        trunk.trunk_layers(LORA, trained.model)


def test_identity_follows_the_trunks_weights_not_the_upper_layers():
    model = tiny_llama()
    before = trunk.identity(model, 2, "float32/no", "cpu")
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight.add_(1.0)  # above the trunk: same cache
    assert trunk.identity(model, 2, "float32/no", "cpu") == before
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.add_(1.0)  # inside it: another cache
    assert trunk.identity(model, 2, "float32/no", "cpu") != before
    assert trunk.identity(model, 2, "float32/bf16", "cpu") != trunk.identity(
        model, 2, "float32/no", "cpu"
    )


def test_shared_layers_of_a_merged_model_and_its_base():
    base = tiny_llama()
    policy = policy_for("dpo", tiny_llama())
    merged = policy.model.merge_and_unload()
    assert trunk.shared_layers(merged, base) == 2
    assert trunk.shared_layers(base, base) == 3  # capped: one layer runs on the states
    other = tiny_llama()
    with torch.no_grad():
        other.model.embed_tokens.weight.mul_(2)
    assert trunk.shared_layers(other, base) == 0


def test_shards_are_read_back_and_damaged_ones_dropped(tmp_path):
    policy = policy_for("dpo")
    layers = trunk.trunk_layers(LORA, policy.model)
    inner = unwrap_peft(policy.model)
    written = trunk.TrunkCache(layers, "key-a", tmp_path)
    assert written.compute_missing(inner, ROWS, 0, 2, contextlib.nullcontext) == 3
    assert written.compute_missing(inner, ROWS, 0, 2, contextlib.nullcontext) == 0
    again = trunk.TrunkCache(layers, "key-a", tmp_path)
    again.read()
    assert again.states.keys() == written.states.keys()
    for key, states in written.states.items():
        torch.testing.assert_close(again.states[key], states, rtol=0, atol=0)
    foreign, said = trunk.TrunkCache(layers, "key-b", tmp_path), []
    foreign.read(say=said.append)
    assert not foreign.states and "another trunk" in said[0]
    assert not list(tmp_path.glob("shard-*"))  # dropped: its pairs are computed again


def test_a_truncated_shard_is_named_and_dropped(tmp_path):
    policy = policy_for("dpo")
    cache = trunk.TrunkCache(2, "key", tmp_path)
    cache.compute_missing(unwrap_peft(policy.model), ROWS, 0, 2, contextlib.nullcontext)
    [shard] = tmp_path.glob("shard-*.safetensors")
    shard.write_bytes(shard.read_bytes()[:100])
    fresh, said = trunk.TrunkCache(2, "key", tmp_path), []
    fresh.read(say=said.append)
    assert not fresh.states and str(shard) in said[0] and "not a readable" in said[0]


def test_the_pass_is_written_as_it_goes_and_leftovers_are_removed(tmp_path, monkeypatch):
    """Issue 39.6: a shard about every SHARD_SECONDS (here: every batch), so a kill loses at most
    that; a killed writer's temporary is removed by the next reader."""
    from tokenratio import atomic, shards

    monkeypatch.setattr(shards, "SHARD_SECONDS", 0.0)
    policy = policy_for("dpo")
    inner = unwrap_peft(policy.model)
    cache = trunk.TrunkCache(2, "key", tmp_path)
    assert cache.compute_missing(inner, ROWS, 0, 1, contextlib.nullcontext) == 3
    assert len(list(tmp_path.glob("shard-*.safetensors"))) == 3
    dead = tmp_path / atomic.temporary_name(tmp_path / "shard-x.safetensors").name
    dead = dead.with_name(dead.name.replace(f"~{os.getpid()}.", "~999999999."))
    dead.write_bytes(b"half a shard")
    again = trunk.TrunkCache(2, "key", tmp_path)
    again.read()
    assert len(again) == 3 and not dead.exists()


def test_a_complete_cache_is_read_where_nothing_can_be_written(monkeypatch):
    """Issue 39.6: read-only and complete: read; read-only and incomplete: one line, before the
    pass, with advice that works."""
    from tokenratio import shards

    policy = policy_for("dpo")
    inner = unwrap_peft(policy.model)
    compute = (0, 2, contextlib.nullcontext)
    written = trunk.load_or_compute(inner, 2, "ro-key", ROWS, compute, False)
    monkeypatch.setattr(shards, "is_writable", lambda directory: False)
    assert len(trunk.load_or_compute(inner, 2, "ro-key", ROWS, compute, False)) == len(written)
    with pytest.raises(
        trunk.TrunkError, match=r"cannot write to .*TOKENRATIO_CACHE_DIR.*trunk_cache"
    ):
        trunk.load_or_compute(inner, 2, "ro-key-2", ROWS, compute, False)
