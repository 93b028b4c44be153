"""The one scoring path: `score_pairs` against an independent full-sequence computation, the needs
a loss declares decide what runs (sft runs no reference), the prefix-shared layout gives every
loss the same values and gradients as the plain one, and frozen-model scoring of a dataset."""

import pytest
import torch

from tiny import load_tiny_pairs, perturbed
from tokenratio.batch import collate, collate_shared
from tokenratio.losses import LOSSES, Needs
from tokenratio.modeling import (
    PolicyWithHead,
    build_policy,
    load_pretrained,
    segment_mask,
)
from tokenratio.reference import module_forward
from tokenratio.scoring import batches, score_batches, score_pairs


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, hh_jsonl):
    return load_tiny_pairs(tiny_model_dir, hh_jsonl, limit=6)


def naive_label_logps(model, batch) -> torch.Tensor:
    """Full-sequence log_softmax, then each response token's log-prob at the position before it."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logps = logits.float().log_softmax(-1)  # (2B, L, V)
    out = torch.zeros(batch.labels.shape)
    for i in range(batch.labels.shape[0]):
        for j in range(batch.labels.shape[1]):
            if batch.labels[i, j] >= 0:
                out[i, j] = logps[i, batch.positions[i, j], batch.labels[i, j]]
    return out


def test_score_pairs_matches_a_full_sequence_log_softmax(tiny):
    model, tokenizer, data = tiny
    batch = collate([data[i] for i in range(3)], tokenizer.pad_token_id)
    reference = PolicyWithHead(model).eval()
    with torch.no_grad():
        scored = score_pairs(
            reference, module_forward(reference), batch, Needs(kl="exact"), chunk_elements=1 << 12
        )
        expected = naive_label_logps(model, batch)
    mask = batch.labels >= 0
    B = batch.num_pairs
    torch.testing.assert_close(scored.policy_chosen[mask[:B]], expected[:B][mask[:B]])
    torch.testing.assert_close(scored.ref_rejected[mask[B:]], expected[B:][mask[B:]])
    assert scored.chosen_kl[mask[:B]].abs().max() < 1e-5  # the policy is its own reference


def test_a_loss_without_reference_never_runs_one(tiny):
    model, tokenizer, data = tiny
    batch = collate([data[i] for i in range(2)], tokenizer.pad_token_id)

    def reference(batch):
        raise AssertionError("sft must not run a reference forward")

    needs = LOSSES["sft"].needs()
    assert not needs.reference
    scored = score_pairs(PolicyWithHead(model), reference, batch, needs, chunk_elements=1 << 12)
    assert torch.equal(scored.ref_chosen, torch.zeros_like(scored.ref_chosen))
    losses, _ = LOSSES["sft"](scored)
    assert losses.shape == (2,) and losses.requires_grad


def test_build_policy_adds_the_head_only_for_losses_that_read_it(tiny_model_dir):
    from tokenratio.config import ModelConfig

    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    assert build_policy(cfg, LOSSES["sft"].needs()).head is None
    assert build_policy(cfg, LOSSES["tbpo-q"].needs()).head is not None


def test_score_batches_moves_batches_to_the_models_device_and_keeps_row_order(tiny):
    model, tokenizer, data = tiny
    seen = []
    for batch, [(logits, hidden)] in score_batches(
        [model], batches(data, tokenizer.pad_token_id, 4)
    ):
        assert logits.shape[:2] == batch.labels.shape and hidden.shape[:2] == batch.labels.shape
        assert not logits.requires_grad
        seen.append(batch.input_ids.shape[0])
    assert sum(seen) == 2 * len(data) and seen[0] == 8  # pairs in batches of 4: 2B rows each


def test_a_local_looking_path_that_does_not_exist_fails_at_once():
    with pytest.raises(FileNotFoundError, match="nope/model"):
        load_pretrained("./nope/model")


def test_segment_mask_hides_chosen_from_rejected():
    # prompt (2 tokens), chosen (1), rejected (2), one pad; hand-derived: row q lists the k it sees
    segments = torch.tensor([[0, 0, 1, 2, 2, 3]])
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],  # chosen: the prompt and itself
            [1, 1, 0, 1, 0, 0],  # rejected: the prompt and itself, never chosen
            [1, 1, 0, 1, 1, 0],
            [1, 1, 0, 0, 0, 1],  # padding: the prompt and padding, never a fully masked row
        ],
        dtype=torch.bool,
    )
    assert torch.equal(segment_mask(segments, boolean=True)[0, 0], expected)
    additive = segment_mask(segments, boolean=False)[0, 0]
    assert torch.equal(additive == 0, expected) and additive.min() == torch.finfo(torch.float32).min


def _loss_and_grads(name, model, head, batch):
    import copy

    loss = LOSSES[name]
    options = {"generator": "sba"} if name == "tdpo1" else {}
    needs = loss.needs(options)
    policy = PolicyWithHead(model, head if needs.baseline else None)
    reference = PolicyWithHead(copy.deepcopy(model)).eval()
    policy.zero_grad(set_to_none=True)
    scored = score_pairs(policy, module_forward(reference), batch, needs, chunk_elements=1 << 12)
    losses, _ = loss(scored, beta=0.1, **options)
    losses.mean().backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return losses.detach(), grads


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_prefix_sharing_gives_every_loss_the_same_values_and_gradients(name, tiny):
    """Real HH pairs, fp32: the prefix-shared batch (prompt once) and the plain one (prompt twice)
    give every loss the same per-pair values and the same gradient, to float rounding."""
    from tokenratio.baseline import StateBaselineHead

    model, tokenizer, data = tiny
    model = perturbed(model)
    head = StateBaselineHead(model.config.hidden_size)
    pairs = [data[i] for i in range(4)]
    if LOSSES[name].weights:
        pairs = [
            {
                **p,
                "chosen_weight": [0.5 + 0.1 * t for t in range(len(p["chosen_ids"]))],
                "rejected_weight": [1.5] * len(p["rejected_ids"]),
            }
            for p in pairs
        ]
    plain, plain_grads = _loss_and_grads(name, model, head, collate(pairs, tokenizer.pad_token_id))
    shared, shared_grads = _loss_and_grads(
        name, model, head, collate_shared(pairs, tokenizer.pad_token_id)
    )
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-6)
    assert shared_grads.keys() == plain_grads.keys() and plain_grads
    for key, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)
