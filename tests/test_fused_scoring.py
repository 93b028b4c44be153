"""The fused head on the scoring path (train.fused_head): every registry loss gets the same
values and gradients as from the head's full logits, with LoRA on the head, and for models
that scale (Cohere) or soft-cap (Gemma-2) their logits."""

import pytest
import torch
from transformers import (
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from tokenratio.batch import collate_shared
from tokenratio.config import ModelConfig
from tokenratio.losses import LOSSES
from tokenratio.modeling import build_policy
from tokenratio.scoring import score_pairs

ROWS = [
    {"prompt_ids": [1, 2, 3, 4], "chosen_ids": [5, 6, 7], "rejected_ids": [8, 9]},
    {"prompt_ids": [10, 11], "chosen_ids": [12, 13, 14, 15, 16], "rejected_ids": [17]},
]
SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)  # fmt: skip


def llama():
    return LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False))


def gemma2():
    config = Gemma2Config(**SHAPE, head_dim=8, final_logit_softcapping=2.0, query_pre_attn_scalar=8)
    return Gemma2ForCausalLM(config)


def cohere():
    return CohereForCausalLM(CohereConfig(**SHAPE, logit_scale=0.25))


def losses_and_grads(policy, loss: str, fused: bool):
    torch.manual_seed(0)
    needs = LOSSES[loss].needs({})
    policy.fused = fused
    policy.tile_elements = 3 * 97  # train.head_tile_elements: 3-row tiles for these few rows
    batch = collate_shared(ROWS, 0)
    if needs.weights:
        batch.weights = torch.linspace(0.5, 1.5, batch.labels.numel()).view_as(batch.labels)

    def reference(b):
        with policy.model.disable_adapter():
            return policy(b)[0]

    policy.zero_grad()
    values = score_pairs(policy, reference, batch, needs, chunk_elements=1 << 10)
    losses, _ = LOSSES[loss](values, beta=0.1)
    losses.sum().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return losses.detach(), grads


def policy_for(model, loss: str, targets=("q_proj", "v_proj")):
    torch.manual_seed(1)
    cfg = ModelConfig(name_or_path="x", lora_r=4, lora_alpha=8, lora_dropout=0.0,
                      lora_target_modules=targets)  # fmt: skip
    policy = build_policy(cfg, LOSSES[loss].needs({}), model)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    return policy


@pytest.mark.parametrize("loss", sorted(n for n in LOSSES if n != "sft"))
def test_every_loss_gets_the_unfused_values_and_gradients(loss):
    torch.manual_seed(0)
    policy = policy_for(llama(), loss)
    fused, unfused = losses_and_grads(policy, loss, True), losses_and_grads(policy, loss, False)
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-5, atol=1e-6)
    assert fused[1].keys() == unfused[1].keys() and fused[1]
    for name in unfused[1]:
        torch.testing.assert_close(fused[1][name], unfused[1][name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "build", [llama, gemma2, cohere], ids=["lora-on-the-head", "gemma2-softcap", "cohere-scale"]
)
def test_lora_on_the_head_and_scaled_or_capped_logits_are_exact(build):
    torch.manual_seed(0)
    policy = policy_for(build(), "tbpo-a", targets=("q_proj", "lm_head"))
    fused, unfused = (losses_and_grads(policy, "tbpo-a", f) for f in (True, False))
    torch.testing.assert_close(fused[0], unfused[0], rtol=1e-5, atol=1e-6)
    head = [n for n in unfused[1] if "lm_head" in n]
    assert head, "LoRA on the head receives a gradient"
    for name in unfused[1]:
        torch.testing.assert_close(fused[1][name], unfused[1][name], rtol=1e-4, atol=1e-6)


def test_dropout_in_a_lora_head_is_refused_in_one_line():
    torch.manual_seed(0)
    cfg = ModelConfig(name_or_path="x", lora_r=4, lora_alpha=8, lora_dropout=0.1,
                      lora_target_modules=("lm_head",))  # fmt: skip
    policy = build_policy(cfg, LOSSES["dpo"].needs({}), llama()).train()
    with pytest.raises(ValueError, match=r"LoRA on the LM head with dropout 0\.1"):
        policy(collate_shared(ROWS, 0))
