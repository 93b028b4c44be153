"""The one scoring path: `score_pairs` against an independent full-sequence computation, the needs
a loss declares decide what runs (sft runs no reference), and frozen-model scoring of a dataset."""

import pytest
import torch

from tokenratio.data import collate, load_raw, tokenize_dataset
from tokenratio.losses import LOSSES, Needs
from tokenratio.modeling import PolicyWithHead, build_models, load_pretrained
from tokenratio.scoring import batches, frozen_reference, score_batches, score_pairs


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, hh_jsonl):
    from tokenratio.config import DataConfig

    model, tokenizer, _ = load_pretrained(str(tiny_model_dir), device="cpu", dtype="float32")
    raw = load_raw(str(hh_jsonl), limit=6)
    data, _ = tokenize_dataset(
        raw, tokenizer, DataConfig(path=str(hh_jsonl), max_length=384, on_invalid="skip")
    )
    return model, tokenizer, data


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
            reference, frozen_reference(reference), batch, Needs(kl="exact"), chunk_elements=1 << 12
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


def test_build_models_loads_no_reference_for_sft(tiny_model_dir):
    from tokenratio.config import ModelConfig

    cfg = ModelConfig(name_or_path=str(tiny_model_dir))
    policy, reference = build_models(cfg, LOSSES["sft"].needs())
    assert reference is None and policy.head is None
    policy, reference = build_models(cfg, LOSSES["tbpo-q"].needs())
    assert reference is not None and policy.head is not None


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
