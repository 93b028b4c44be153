"""TBPO-A's k3 from the cache: tokens a ~ pi_ref drawn once per response position; given the same
tokens, the cached step's loss and gradients equal the in-step k3 path's, without a reference
forward."""

import pytest
import torch

from tiny import load_tiny_pairs, perturbed
from tokenratio import reference
from tokenratio.batch import collate_shared
from tokenratio.logprobs import IGNORE_INDEX, sampled_k3, token_logps
from tokenratio.losses import LOSSES
from tokenratio.modeling import PolicyWithHead
from tokenratio.scoring import score_pairs, split_pairs


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, hh_jsonl):
    model, tokenizer, data = load_tiny_pairs(tiny_model_dir, hh_jsonl, limit=6)
    rows = list(data)
    return model, tokenizer, rows, reference.score_rows(model, rows, tokenizer.pad_token_id, 4, 2)


def test_the_cached_k3_step_equals_the_in_step_k3_at_the_same_tokens(tiny):
    model, tokenizer, rows, values = tiny
    batch = values.fill(collate_shared(rows, tokenizer.pad_token_id), rows, epoch=1)
    needs = LOSSES["tbpo-a"].needs({"kl_estimator": "k3"})
    assert needs.kl == "k3"
    policy = PolicyWithHead(perturbed(model))
    ref = reference.module_forward(PolicyWithHead(model).eval())
    results = []
    for cached in (False, True):
        policy.zero_grad(set_to_none=True)
        if cached:
            scored = score_pairs(policy, None, batch, needs, chunk_elements=1 << 12)
        else:  # the in-step path (scoring.label_logps_and_kl's k3), at the cached tokens
            logits, _ = policy(batch)
            with torch.no_grad():
                ref_logits = ref(batch)
            kl = sampled_k3(logits, ref_logits, tokens=batch.ref_sample_tokens)
            logps, ref_logps = (
                token_logps(logits, batch.labels),
                token_logps(ref_logits, batch.labels),
            )
            scored = split_pairs(batch, logps, ref_logps, kl)
        losses, _ = LOSSES["tbpo-a"](scored, beta=0.1, kl_estimator="k3")
        losses.mean().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append((losses.detach(), grads))
    (live, live_grads), (fast, fast_grads) = results
    torch.testing.assert_close(fast, live, rtol=1e-5, atol=1e-6)
    assert live_grads.keys() == fast_grads.keys() and live_grads
    for name, grad in live_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_cached_samples_are_the_reference_s_log_probs_at_tokens_it_drew(tiny):
    model, tokenizer, rows, values = tiny
    batch = values.fill(collate_shared(rows, tokenizer.pad_token_id), rows)
    logits = reference.module_forward(PolicyWithHead(model).eval())(batch).detach()
    tokens = batch.ref_sample_tokens
    valid = batch.labels != IGNORE_INDEX
    assert torch.equal(tokens != IGNORE_INDEX, valid)
    expected = token_logps(logits, tokens)
    torch.testing.assert_close(batch.ref_sample_logps, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        batch.ref_logps, token_logps(logits, batch.labels), rtol=1e-4, atol=1e-5
    )


def test_epoch_e_reads_sample_e_mod_m_and_batching_never_changes_a_sample(tiny):
    model, tokenizer, rows, values = tiny
    pad = tokenizer.pad_token_id

    def tokens(store, epoch):
        return store.fill(collate_shared(rows, pad), rows, epoch).ref_sample_tokens

    assert torch.equal(tokens(values, 0), tokens(values, 2))
    assert not torch.equal(tokens(values, 0), tokens(values, 1))
    one_by_one = reference.score_rows(model, rows[::-1], pad, 1, 2)
    assert torch.equal(tokens(one_by_one, 1), tokens(values, 1))


def test_samples_follow_the_reference_distribution():
    """Gumbel-max at a pair's seeded generator: 4,000 draws at one position match softmax."""
    from tokenratio.reference.score import _samples

    logits = torch.randn(1, 50, generator=torch.Generator().manual_seed(0)) * 2
    tokens, logps = _samples(logits.expand(4000, 50).contiguous(), b"k" * 16, 0, 1)
    counts = torch.bincount(tokens[:, 0], minlength=50).float() / 4000
    assert (counts - logits.softmax(-1)[0]).abs().sum() / 2 < 0.06  # total variation
    torch.testing.assert_close(logps[:, 0], logits.log_softmax(-1)[0, tokens[:, 0]])
