"""The ground-truth MDP: dynamic programming against brute-force enumeration, and convergence."""

import itertools
import math

import pytest
import torch
from torch.testing import assert_close

from tokenratio import bench, synthetic


@pytest.fixture(scope="module")
def tiny():
    return synthetic.make_mdp(num_prompts=2, vocab_size=3, length=3, seed=7)


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
    q, _ = synthetic.reference_q(tiny)
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
    optimum = synthetic.sequence_optimum(tiny, beta)
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
    target = synthetic.token_optimum(tiny, 0.5)
    metrics = synthetic.exact_metrics(policy, tiny, {"tok": target})
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
    pairs = synthetic.population_pairs(tiny)
    assert abs(float(pairs.weights.sum()) - 1.0) < 1e-12
    # Marginal probability that the chosen response is y, averaged over its partner and the label,
    # against sampled pairs.
    sampled = synthetic.sample_pairs(tiny, 20_000, seed=0)
    exact_win = float(pairs.weights[(pairs.chosen[:, 0] == 0) & (pairs.prompts == 0)].sum())
    empirical = float(((sampled.chosen[:, 0] == 0) & (sampled.prompts == 0)).double().mean())
    assert abs(exact_win - empirical) < 0.015


def test_sampled_pairs_are_seeded():
    mdp = synthetic.make_mdp()
    a, b = synthetic.sample_pairs(mdp, 50, seed=3), synthetic.sample_pairs(mdp, 50, seed=3)
    assert torch.equal(a.chosen, b.chosen) and torch.equal(a.rejected, b.rejected)
    assert not torch.equal(a.chosen, synthetic.sample_pairs(mdp, 50, seed=4).chosen)


def train_population(mdp, loss, beta, steps):
    cfg = bench.BenchConfig(steps=steps, lr=0.05, eval_every=steps)
    pairs = synthetic.population_pairs(mdp)
    return bench.train_tabular(
        cfg, mdp, loss, beta, 0, {"train": pairs, "valid": pairs, "test": pairs}
    )


@pytest.mark.slow
def test_dpo_population_minimiser_is_the_sequence_optimum(tiny):
    """Trained on the exact data distribution, DPO converges to pi*_seq (tolerance: KL < 2e-3 nats
    per sequence, from KL ~ 1.5 at pi_ref); it is not the token-level optimum."""
    run = train_population(tiny, "dpo", 1.0, 1500)
    start = run["curve"][0]
    assert start["kl_seq"] > 0.5
    assert run["final"]["kl_seq"] < 2e-3
    assert run["final"]["kl_tok"] > 10 * run["final"]["kl_seq"]


def test_position_pairs_weights_and_orientation(tiny):
    from tokenratio.population import position_pairs

    pairs = position_pairs(tiny, "a")
    assert abs(float(pairs.weights.sum()) - 1.0) < 1e-12
    assert pairs.chosen_prev.shape == pairs.chosen.shape
    # Column t is token t of whichever response won step t, with that response's own prefix, so
    # the previous token need not be the row's column t-1 where the winner changes.
    mixed = (pairs.chosen_prev[:, 1:] != pairs.chosen[:, :-1]).any(1)
    assert mixed.any()  # orientation flips mid-response exist


@pytest.mark.slow
def test_tbpo_a_recovers_the_token_optimum_under_per_position_labels(tiny):
    """The theorem's data model (independent labels sigma(A(s1_t,a1_t) - A(s2_t,a2_t))), minimised
    exactly: TBPO-A's minimiser is pi*_tok (tolerance KL < 2e-3; pi_ref is ~1 nat away)."""
    from tokenratio.population import fit, position_pairs

    beta = 0.5
    logps, info = fit(tiny, position_pairs(tiny, "a"), "tbpo-a", beta, max_steps=2000)
    targets = {
        "seq": synthetic.sequence_optimum(tiny, beta),
        "tok": synthetic.token_optimum(tiny, beta),
    }
    metrics = synthetic.exact_metrics(logps, tiny, targets)
    start = synthetic.exact_metrics(tiny.ref_logps, tiny, targets)
    assert start["kl_tok"] > 0.5
    assert metrics["kl_tok"] < 2e-3, (metrics, info)
    assert info["loss_change"] < 1e-6


@pytest.mark.slow
def test_lr_grid_picks_per_method_by_validation_loss(tmp_path):
    cfg = bench.config_for("quick", losses=["dpo", "tbpo-a"], steps=60, lr_grid=[0.005, 0.05])
    results = bench.run_bench(cfg, tmp_path, progress=False)
    for run in results["runs"]:
        assert run["final"]["lr"] in (0.005, 0.05)
        assert 0.0 <= run["final"]["clamp_frac"] <= 1.0 and run["final"]["max_log_ratio"] > 0


@pytest.mark.slow
def test_transformer_policy_class_fits_the_reference_and_learns():
    """The second policy class: SFT brings a tiny Llama close to pi_ref, and DPO through the
    real-model code path moves it toward the optimum (sampled metrics with 95% intervals)."""
    from tokenratio.bench_lm import run_lm_bench

    result = run_lm_bench(
        ["dpo", "tbpo-a", "tisdpo"], sft_steps=200, train_steps=40, num_samples=1000, progress=False
    )
    fit, half_width = result["reference_fit_kl"]
    assert fit < 0.3 and half_width > 0
    reference, dpo = result["rows"]["sft-reference"], result["rows"]["dpo"]
    assert dpo["return"][0] > reference["return"][0] + 1.0
    assert dpo["kl_seq"][0] < reference["kl_seq"][0] - 0.5
    assert result["rows"]["tbpo-a"]["kl_tok"][0] < reference["kl_tok"][0]
    assert result["rows"]["tisdpo"]["return"][0] > reference["return"][0] + 0.5  # weighted, learns


@pytest.mark.parametrize("kl", [None, "exact"])
def test_table_kernels_equal_per_pair_kernels(kl):
    """tabular_token_logps runs the kernels once per (state, action) and gathers: the values and
    gradients must be those of running them on every pair's tokens directly."""
    from tokenratio.logprobs import token_logps, token_logps_and_kl

    mdp = synthetic.make_mdp()
    pairs = synthetic.sample_pairs(mdp, 300, seed=3)
    g = torch.Generator().manual_seed(0)
    logits = mdp.ref_logps + 0.3 * torch.randn(
        mdp.ref_logps.shape, generator=g, dtype=torch.float64
    )
    logits.requires_grad_()
    steps = torch.arange(mdp.length)[None]
    direct = []
    for responses in (pairs.chosen, pairs.rejected):
        index = (pairs.prompts[:, None], steps, synthetic.states_of(responses, mdp.vocab_size))
        if kl:
            direct += token_logps_and_kl(logits[index], responses, mdp.ref_logps[index])
        else:
            direct.append(token_logps(logits[index], responses))
    batch = bench.tabular_token_logps(logits, mdp, pairs, kl=kl)
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
    mdp = synthetic.make_mdp()
    negative = mdp.ref_logps.clone()
    positive = negative.clone()
    positive[..., 0] += math.log(2.0)
    pairs = synthetic.sample_pairs(mdp, 200, seed=5)
    weighted = bench.contrast_weighted(positive, negative, mdp, pairs)
    contrast = positive.log_softmax(-1) - negative.log_softmax(-1)  # (P, T, S, V)
    steps = torch.arange(mdp.length)[None]
    prev = synthetic.states_of(pairs.chosen, mdp.vocab_size)
    expected = contrast[pairs.prompts[:, None], steps, prev, pairs.chosen].clamp(-1, 1).exp()
    assert_close(weighted.chosen_weight, expected)
    assert (weighted.chosen_weight[pairs.chosen == 0] > 1).all()
    assert (weighted.rejected_weight[pairs.rejected == 0] < 1).all()
    assert (weighted.chosen_weight[pairs.chosen != 0] < 1).all()
    flipped = weighted.flipped()
    assert torch.equal(flipped.chosen, pairs.rejected)
    assert torch.equal(flipped.chosen_weight, weighted.rejected_weight)


def test_weight_summary_hand_values():
    """Two pairs with probabilities 0.75 and 0.25. Chosen weights [[1/e, 1], [e, e]]: mean
    0.75 (1/e + 1)/2 + 0.25 e; at a bound (1/e or e): 0.75 * 1/2 + 0.25 * 2/2 = 0.625."""
    from tokenratio.population import weight_summary

    e = math.e
    pairs = synthetic.PreferencePairs(
        prompts=torch.zeros(2, dtype=torch.long),
        chosen=torch.zeros(2, 2, dtype=torch.long),
        rejected=torch.ones(2, 2, dtype=torch.long),
        weights=torch.tensor([0.75, 0.25], dtype=torch.float64),
        chosen_weight=torch.tensor([[1 / e, 1.0], [e, e]], dtype=torch.float64),
        rejected_weight=torch.ones(2, 2, dtype=torch.float64),
    )
    summary = weight_summary(pairs)
    assert summary["mean_chosen"] == pytest.approx(0.75 * (1 / e + 1) / 2 + 0.25 * e)
    assert summary["at_bound_chosen"] == pytest.approx(0.625)
    assert summary["mean_rejected"] == pytest.approx(1.0)
