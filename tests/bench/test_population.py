"""The population regime: per-position pairs, the TBPO theorem under its own data model, TIS-DPO weights."""

import math

import pytest
import torch

from tokenratio.bench import task


def test_position_pairs_weights_and_orientation(tiny):
    from tokenratio.bench.population import position_pairs

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
    from tokenratio.bench.population import fit_population, position_pairs

    beta = 0.5
    logps, info = fit_population(tiny, position_pairs(tiny, "a"), "tbpo-a", beta, max_steps=2000)
    targets = {
        "seq": task.sequence_optimum(tiny, beta),
        "tok": task.token_optimum(tiny, beta),
    }
    metrics = task.exact_metrics(logps, tiny, targets)
    start = task.exact_metrics(tiny.ref_logps, tiny, targets)
    assert start["kl_tok"] > 0.5
    assert metrics["kl_tok"] < 2e-3, (metrics, info)
    assert info["loss_change"] < 1e-6


def test_weight_summary_hand_values():
    """Two pairs with probabilities 0.75 and 0.25. Chosen weights [[1/e, 1], [e, e]]: mean
    0.75 (1/e + 1)/2 + 0.25 e; at a bound (1/e or e): 0.75 * 1/2 + 0.25 * 2/2 = 0.625."""
    from tokenratio.bench.population import weight_summary

    e = math.e
    pairs = task.PreferencePairs(
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


@pytest.mark.slow
@pytest.mark.parametrize("generator", ["lr", "sba"])
def test_tdpo1_reaches_the_token_optimum_under_sequence_labels_with_any_generator(tiny, generator):
    """docs/method.md §6: TDPO1's logit is the sequence-level Bradley-Terry logit in the token-optimal
    parametrisation, so its population minimiser under sequence labels is pi*_tok, for the logistic
    loss and for any strictly convex Bregman generator (tolerance KL < 1e-3; pi_ref is > 0.5 away),
    while DPO's is pi*_seq."""
    from tokenratio.bench.population import fit_population

    beta = 0.5
    targets = {"seq": task.sequence_optimum(tiny, beta), "tok": task.token_optimum(tiny, beta)}
    pairs = task.population_pairs(tiny)
    options = {"generator": generator}
    logps, info = fit_population(tiny, pairs, "tdpo1", beta, options, max_steps=4000)
    metrics = task.exact_metrics(logps, tiny, targets)
    assert task.exact_metrics(tiny.ref_logps, tiny, targets)["kl_tok"] > 0.5
    assert metrics["kl_tok"] < 1e-3, (metrics, info)
    assert metrics["kl_seq"] > 10 * metrics["kl_tok"]  # pi*_seq is a different policy
