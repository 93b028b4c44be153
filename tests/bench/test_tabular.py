"""Tabular policies through the real kernels: values, gradients and TIS-DPO contrast weights."""

import math

import pytest
import torch
from torch.testing import assert_close

from tokenratio.bench import tabular, task


@pytest.mark.parametrize("kl", [None, "exact"])
def test_table_kernels_equal_per_pair_kernels(kl):
    """tabular_token_logps runs the kernels once per (state, action) and gathers: the values and
    gradients must be those of running them on every pair's tokens directly."""
    from tokenratio.logprobs import token_logps, token_logps_and_kl

    mdp = task.make_mdp()
    pairs = task.sample_pairs(mdp, 300, seed=3)
    g = torch.Generator().manual_seed(0)
    logits = mdp.ref_logps + 0.3 * torch.randn(
        mdp.ref_logps.shape, generator=g, dtype=torch.float64
    )
    logits.requires_grad_()
    steps = torch.arange(mdp.length)[None]
    direct = []
    for responses in (pairs.chosen, pairs.rejected):
        index = (pairs.prompts[:, None], steps, task.states_of(responses, mdp.vocab_size))
        if kl:
            direct += token_logps_and_kl(logits[index], responses, mdp.ref_logps[index])
        else:
            direct.append(token_logps(logits[index], responses))
    batch = tabular.tabular_token_logps(logits, mdp, pairs, kl=kl)
    ours = [batch.policy_chosen, batch.chosen_kl, batch.policy_rejected, batch.rejected_kl]
    ours = [t for t in ours if t is not None]
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in ours]
    total = sum((w * t).sum() for w, t in zip(weights, ours, strict=True))
    expected = sum((w * t).sum() for w, t in zip(weights, direct, strict=True))
    for a, b in zip(ours, direct, strict=True):
        assert_close(a, b)
    assert_close(torch.autograd.grad(total, logits)[0], torch.autograd.grad(expected, logits)[0])


def test_contrast_weights_follow_the_contrast_models():
    """pi+ raises token 0 at every state by log 2 over pi-: every chosen token 0 gets weight
    exp(clamp(log pi+ - log pi-)) > 1, every rejected token 0 the reciprocal, others below 1."""
    mdp = task.make_mdp()
    negative = mdp.ref_logps.clone()
    positive = negative.clone()
    positive[..., 0] += math.log(2.0)
    pairs = task.sample_pairs(mdp, 200, seed=5)
    weighted = tabular.contrast_weighted(positive, negative, mdp, pairs)
    contrast = positive.log_softmax(-1) - negative.log_softmax(-1)  # (P, T, S, V)
    steps = torch.arange(mdp.length)[None]
    prev = task.states_of(pairs.chosen, mdp.vocab_size)
    expected = contrast[pairs.prompts[:, None], steps, prev, pairs.chosen].clamp(-1, 1).exp()
    assert_close(weighted.chosen_weight, expected)
    assert (weighted.chosen_weight[pairs.chosen == 0] > 1).all()
    assert (weighted.rejected_weight[pairs.rejected == 0] < 1).all()
    assert (weighted.chosen_weight[pairs.chosen != 0] < 1).all()
    flipped = weighted.flipped()
    assert torch.equal(flipped.chosen, pairs.rejected)
    assert torch.equal(flipped.chosen_weight, weighted.rejected_weight)
