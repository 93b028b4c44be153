"""The token-level MDP: dynamic programming against brute-force enumeration."""

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from tokenratio.bench import task


def enumerate_sequences(mdp, policy_logps, x):
    """Every response with its log-probability under the policy and its return, by brute force."""
    out = []
    for ys in itertools.product(range(mdp.vocab_size), repeat=mdp.length):
        logp, ret, prev = 0.0, 0.0, mdp.vocab_size
        for t, y in enumerate(ys):
            logp += float(policy_logps[x, t, prev, y])
            ret += float(mdp.reward[x, t, prev, y])
            prev = y
        out.append((ys, logp, ret))
    return out


def test_reference_q_matches_enumeration(tiny):
    """Q_ref(s_t, a) = E_{pi_ref}[sum_{k>=t} r_k | prefix, a], enumerated over all suffixes."""
    q, _ = task.reference_q(tiny)
    for x in range(tiny.num_prompts):
        seqs = enumerate_sequences(tiny, tiny.ref_logps, x)
        for ys, _, _ in seqs[::5]:
            for t in range(tiny.length):
                prefix = ys[:t]
                prev = ys[t - 1] if t else tiny.vocab_size
                for a in range(tiny.vocab_size):
                    num = den = 0.0
                    for zs, _, _ in seqs:
                        if zs[:t] != prefix or zs[t] != a:
                            continue
                        # probability of the suffix after a, and the reward collected from t on
                        suffix_logp, reward, p = 0.0, 0.0, a
                        reward += float(tiny.reward[x, t, prev, a])
                        for k in range(t + 1, tiny.length):
                            suffix_logp += float(tiny.ref_logps[x, k, p, zs[k]])
                            reward += float(tiny.reward[x, k, p, zs[k]])
                            p = zs[k]
                        num += math.exp(suffix_logp) * reward
                        den += math.exp(suffix_logp)
                    assert abs(q[x, t, prev, a] - num / den) < 1e-9


@pytest.mark.parametrize("beta", [0.3, 1.0, 3.0])
def test_sequence_optimum_is_the_tilted_sequence_distribution(tiny, beta):
    """pi*_seq(y|x) = pi_ref(y|x) exp(R(y)/beta) / Z: the per-token optimum from soft DP must give it."""
    optimum = task.sequence_optimum(tiny, beta)
    for x in range(tiny.num_prompts):
        ours = enumerate_sequences(tiny, optimum, x)
        ref = enumerate_sequences(tiny, tiny.ref_logps, x)
        log_tilted = torch.tensor([lp + r / beta for _, lp, r in ref], dtype=torch.float64)
        expected = log_tilted.log_softmax(0)
        assert_close(torch.tensor([lp for _, lp, _ in ours], dtype=torch.float64), expected)


def test_exact_metrics_match_enumeration(tiny):
    policy = torch.randn(
        tiny.reward.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    ).log_softmax(-1)
    target = task.token_optimum(tiny, 0.5)
    metrics = task.exact_metrics(policy, tiny, {"tok": target})
    ret = kl_ref = kl_tok = 0.0
    for x in range(tiny.num_prompts):
        mine = enumerate_sequences(tiny, policy, x)
        ref = enumerate_sequences(tiny, tiny.ref_logps, x)
        tgt = enumerate_sequences(tiny, target, x)
        for (_, lp, r), (_, lq, _), (_, lt, _) in zip(mine, ref, tgt, strict=True):
            p = math.exp(lp) / tiny.num_prompts
            ret += p * r
            kl_ref += p * (lp - lq)
            kl_tok += p * (lp - lt)
    assert abs(metrics["return"] - ret) < 1e-9
    assert abs(metrics["kl_ref"] - kl_ref) < 1e-9
    assert abs(metrics["kl_tok"] - kl_tok) < 1e-9


def test_population_pairs_are_the_data_distribution(tiny):
    pairs = task.population_pairs(tiny)
    assert abs(float(pairs.weights.sum()) - 1.0) < 1e-12
    # Marginal probability that the chosen response is y, averaged over its partner and the label,
    # against sampled pairs.
    sampled = task.sample_pairs(tiny, 20_000, seed=0)
    exact_win = float(pairs.weights[(pairs.chosen[:, 0] == 0) & (pairs.prompts == 0)].sum())
    empirical = float(((sampled.chosen[:, 0] == 0) & (sampled.prompts == 0)).double().mean())
    assert abs(exact_win - empirical) < 0.015


def test_sampled_pairs_are_seeded():
    mdp = task.make_mdp()
    a, b = task.sample_pairs(mdp, 50, seed=3), task.sample_pairs(mdp, 50, seed=3)
    assert torch.equal(a.chosen, b.chosen) and torch.equal(a.rejected, b.rejected)
    assert not torch.equal(a.chosen, task.sample_pairs(mdp, 50, seed=4).chosen)
