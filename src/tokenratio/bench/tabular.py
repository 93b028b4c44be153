"""Tabular policies on the token-level MDP: the loss contract's inputs through the real kernels, and the
one full-batch fit loop every tabular regime (finite, population) uses.

A tabular policy is one logit vector per state (prompt, position, previous token), initialised at
pi_ref; TBPO-Q's state baseline is a table b(s) in place of the MLP head. Its per-token log-probs go
through the same `token_logps` / `token_logps_and_kl`, `LOSSES` and `reduce` as a real model's.
"""

from collections.abc import Callable
from dataclasses import replace

import torch

from tokenratio.bench import task
from tokenratio.logprobs import sampled_k3, token_logps, token_logps_and_kl
from tokenratio.losses import LOSSES, Loss, TokenLogps, importance_weights, reduce
from tokenratio.methods import parse_method


def tabular_token_logps(
    policy_logits: torch.Tensor,
    mdp: task.TokenMDP,
    pairs: task.PreferencePairs,
    baseline: torch.Tensor | None = None,
    kl: str | None = None,
    k3_tokens: tuple | None = None,
) -> TokenLogps:
    """The loss contract's inputs for a tabular policy, through the real kernels.

    `token_logps` / `token_logps_and_kl` run once per (state, action) of the table, P*T*(V+1)*V
    rows, and each pair's tokens are gathered from the result: the same values and gradients as
    running them on every pair's tokens, without paying their per-row cost N*T times (torch's
    reductions over a handful of actions are dominated by per-row overhead). The sampled k3 draws
    a fresh a ~ pi_ref at every pair position, so it runs per pair; with `k3_tokens` ((N, T)
    chosen, rejected) it reads those instead, as a cached run does (train.ref_cache).
    """
    P, T, S, V = policy_logits.shape
    steps = torch.arange(mdp.length)[None]
    every_action = policy_logits.reshape(-1, 1, V).expand(-1, V, V)  # (P*T*S, V actions, V)
    actions = torch.arange(V).expand(P * T * S, V)
    if kl == "exact":
        ref_rows = mdp.ref_logps.reshape(-1, 1, V).expand(-1, V, V)
        table, table_kl = token_logps_and_kl(every_action, actions, ref_rows)
        table_kl = table_kl[:, 0].reshape(P, T, S)  # KL(ref || policy) of each state
    else:
        table = token_logps(every_action, actions)
    table = table.reshape(P, T, S, V)  # log pi(a | state)

    def side(responses, prev, tokens):
        prev = task.states_of(responses, mdp.vocab_size) if prev is None else prev
        index = (pairs.prompts[:, None], steps, prev)
        logps, ref_logps = table[(*index, responses)], mdp.ref_logps[(*index, responses)]
        kl_values = table_kl[index] if kl == "exact" else None
        if kl == "k3":
            kl_values = sampled_k3(policy_logits[index], mdp.ref_logps[index], tokens=tokens)
        return logps, ref_logps, kl_values, None if baseline is None else baseline[index]

    chosen_tokens, rejected_tokens = k3_tokens or (None, None)
    pc, rc, kc, bc = side(pairs.chosen, pairs.chosen_prev, chosen_tokens)
    pr, rr, kr, br = side(pairs.rejected, pairs.rejected_prev, rejected_tokens)
    mask = torch.ones_like(pairs.chosen, dtype=torch.bool)
    weights = pairs.chosen_weight, pairs.rejected_weight
    return TokenLogps(pc, pr, rc, rr, mask, mask, kc, kr, bc, br, *weights)


def contrast_weighted(
    positive: torch.Tensor, negative: torch.Tensor, mdp, pairs, **bounds
) -> task.PreferencePairs:
    """`pairs` with TIS-DPO's token weights from two tabular contrast policies (logit tables):
    contrast log pi+(y_t|s_t) - log pi-(y_t|s_t), then `losses.importance_weights(**bounds)`
    (default bounds: those of `tokenratio tisdpo`)."""
    plus = tabular_token_logps(positive.log_softmax(-1), mdp, pairs)
    minus = tabular_token_logps(negative.log_softmax(-1), mdp, pairs)
    return with_contrast_weights(
        pairs,
        plus.policy_chosen - minus.policy_chosen,
        plus.policy_rejected - minus.policy_rejected,
        **bounds,
    )


def with_contrast_weights(
    pairs: task.PreferencePairs, chosen: torch.Tensor, rejected: torch.Tensor, **bounds
) -> task.PreferencePairs:
    """`pairs` carrying TIS-DPO's weights of their (N, T) chosen and rejected token contrasts."""
    return replace(
        pairs,
        chosen_weight=importance_weights(chosen, chosen=True, **bounds),
        rejected_weight=importance_weights(rejected, chosen=False, **bounds),
    )


def tabular_params(mdp: task.TokenMDP) -> tuple[torch.Tensor, torch.Tensor]:
    """A policy logit table at pi_ref (P, T, S, V) and a zero state-baseline table (P, T, S)."""
    policy = mdp.ref_logps.clone().requires_grad_()
    baseline = torch.zeros(mdp.reward.shape[:3], dtype=policy.dtype, requires_grad=True)
    return policy, baseline


def resolve(method: str, extra: dict | None = None) -> tuple[Loss, dict]:
    """A benchmark method ("tdpo1" or "tdpo1[generator=sba]") -> its registry entry and options
    (`extra`, e.g. from --loss-option, on top of the spec's own)."""
    name, options = parse_method(method)
    return LOSSES[name], {**options, **(extra or {})}


def cached_k3_tokens(mdp, pairs: task.PreferencePairs, seed: int = 0) -> tuple:
    """One a ~ pi_ref per pair position, drawn once ((N, T) chosen, rejected): what a cached
    k3 run reads at every step (reference/score.py draws them in its scoring pass)."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.arange(mdp.length)[None]

    def draw(responses, prev):
        prev = task.states_of(responses, mdp.vocab_size) if prev is None else prev
        probs = mdp.ref_logps[pairs.prompts[:, None], steps, prev].exp()  # (N, T, V)
        flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=g)
        return flat.view(probs.shape[:-1])

    return draw(pairs.chosen, pairs.chosen_prev), draw(pairs.rejected, pairs.rejected_prev)


def pair_objective(
    policy, baseline, mdp, method: str, beta: float, options: dict, k3_draws: str = "fresh"
) -> Callable:
    """pairs -> (loss, share of pairs/tokens at the log R clamp): the mean over pairs, or, for
    weighted pairs (the population regime's exact distribution), the weighted sum. A k3 KL
    draws a fresh a ~ pi_ref at every evaluation (k3_draws "fresh", the in-step path) or reads
    one drawn once per pair position ("cached", train.ref_cache's)."""
    entry, options = resolve(method, options)
    kl = entry.needs(options).kl
    drawn = {}

    def objective(pairs: task.PreferencePairs) -> tuple[torch.Tensor, float]:
        tokens = None
        if kl == "k3" and k3_draws == "cached":
            tokens = drawn.setdefault(id(pairs), cached_k3_tokens(mdp, pairs))
        batch = tabular_token_logps(policy, mdp, pairs, baseline, kl, tokens)
        losses, metrics = entry(batch, beta=beta, **options)
        at_clamp = metrics.get("clamp_fraction", torch.zeros_like(losses))
        if pairs.weights is None:
            return reduce(losses), float(at_clamp.mean())
        return (losses * pairs.weights).sum(), float((at_clamp * pairs.weights).sum())

    return objective


def fit(objective: Callable, optimizer, max_steps: int, on_step: Callable) -> int:
    """Full-batch descent, the loop of every tabular regime.

    At each step: the objective at the current parameters, then `on_step(step, value)` (records,
    evaluates; True stops), then one update. Returns the last step.
    """
    for step in range(max_steps + 1):
        value = objective()
        if on_step(step, value) or step == max_steps:
            return step
        optimizer.zero_grad(set_to_none=True)
        value[0].backward()
        optimizer.step()
    return max_steps
