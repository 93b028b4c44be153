"""A token-level MDP whose optimal policies are known exactly: the ground truth of `tokenratio bench`.

A prompt x (one of P), a vocabulary of V tokens, responses of exactly T tokens. The state at step t is
s_t = (x, t, previous token) (previous = BOS at t = 0), so reward r(s, a) and the reference pi_ref(a|s)
are tables of shape (P, T, V+1, V) and dynamic programming is exact:

    Q_ref(s, a)  = r(s, a) + V_ref(s'),   V_ref(s) = sum_a pi_ref(a|s) Q_ref(s, a)
    Q_soft(s, a) = r(s, a) + V_soft(s'),  V_soft(s) = beta log sum_a pi_ref(a|s) e^{Q_soft(s,a)/beta}
    pi*_seq(a|s) ~ pi_ref(a|s) exp(Q_soft(s,a)/beta)  sequence-level KL-regularised optimum (DPO's target)
    pi*_tok(a|s) ~ pi_ref(a|s) exp(Q_ref(s,a)/beta)   token-level optimum (TBPO's, docs/method.md §3.4)

A policy is a (P, T, V+1, V) table of log-probabilities; `exact_metrics` computes expected return,
sequence KLs and entropy through the state occupancy d_t(x, prev), with no sampling.
"""

from dataclasses import dataclass, replace

import torch

Tensor = torch.Tensor


@dataclass(frozen=True)
class TokenMDP:
    """Reward and reference tables. Shapes: (P, T, V+1, V); index V of dim 2 is BOS."""

    reward: Tensor
    ref_logps: Tensor

    @property
    def num_prompts(self) -> int:
        return self.reward.shape[0]

    @property
    def length(self) -> int:
        return self.reward.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.reward.shape[3]


def make_mdp(
    num_prompts: int = 4,
    vocab_size: int = 6,
    length: int = 5,
    reward_scale: float = 1.0,
    ref_temperature: float = 1.0,
    seed: int = 0,
) -> TokenMDP:
    """A random instance: rewards ~ N(0, reward_scale^2), reference logits ~ N(0, ref_temperature^2)."""
    g = torch.Generator().manual_seed(seed)
    shape = (num_prompts, length, vocab_size + 1, vocab_size)
    reward = torch.randn(shape, generator=g, dtype=torch.float64) * reward_scale
    ref_logits = torch.randn(shape, generator=g, dtype=torch.float64) * ref_temperature
    return TokenMDP(reward=reward, ref_logps=ref_logits.log_softmax(-1))


def reference_q(mdp: TokenMDP) -> tuple[Tensor, Tensor]:
    """Q_ref (P, T, V+1, V) and V_ref (P, T, V+1) by backward induction under pi_ref."""
    return _backward_induction(mdp, lambda q, ref_logps: (ref_logps.exp() * q).sum(-1))


def soft_q(mdp: TokenMDP, beta: float) -> tuple[Tensor, Tensor]:
    """Q_soft and V_soft of the sequence-level KL-regularised objective E[sum r] - beta KL(pi||pi_ref)."""
    return _backward_induction(
        mdp, lambda q, ref_logps: beta * torch.logsumexp(ref_logps + q / beta, dim=-1)
    )


def _backward_induction(mdp: TokenMDP, value_of_q) -> tuple[Tensor, Tensor]:
    """Q_t(s, a) = r_t(s, a) + V_{t+1}(s'), s' = (x, t+1, a); V_t = value_of_q(Q_t, log pi_ref_t)."""
    P, T, S, V = mdp.reward.shape
    q = torch.zeros_like(mdp.reward)
    values = torch.zeros(P, T, S, dtype=mdp.reward.dtype)
    for t in reversed(range(T)):
        future = values[:, t + 1, :V] if t + 1 < T else torch.zeros(P, V, dtype=values.dtype)
        q[:, t] = mdp.reward[:, t] + future[:, None, :]  # (P, V+1, V)
        values[:, t] = value_of_q(q[:, t], mdp.ref_logps[:, t])
    return q, values


def sequence_optimum(mdp: TokenMDP, beta: float) -> Tensor:
    """log pi*_seq = log softmax(log pi_ref + Q_soft / beta): what DPO converges to."""
    q, _ = soft_q(mdp, beta)
    return (mdp.ref_logps + q / beta).log_softmax(-1)


def token_optimum(mdp: TokenMDP, beta: float) -> Tensor:
    """log pi*_tok = log softmax(log pi_ref + Q_ref / beta): TBPO's target (docs/method.md §3.4)."""
    q, _ = reference_q(mdp)
    return (mdp.ref_logps + q / beta).log_softmax(-1)


def occupancy(policy_logps: Tensor) -> Tensor:
    """d_t(x, prev): probability of each state at each step, prompts uniform. (P, T, V+1)."""
    P, T, S, V = policy_logps.shape
    probs = policy_logps.exp()
    d = torch.zeros(P, T, S, dtype=probs.dtype)
    d[:, 0, V] = 1.0 / P
    for t in range(T - 1):
        d[:, t + 1, :V] = torch.einsum("ps,psa->pa", d[:, t], probs[:, t])
    return d


def exact_metrics(
    policy_logps: Tensor, mdp: TokenMDP, targets: dict[str, Tensor] | None = None
) -> dict[str, float]:
    """Exact expected return, KL(pi||pi_ref), KL(pi||target) for each target, mean token entropy.

    Sequence-level KLs are summed over steps: KL(pi||q) = E_pi sum_t KL(pi(.|s_t) || q(.|s_t)),
    averaged over prompts.
    """
    d = occupancy(policy_logps)  # (P, T, V+1)
    probs = policy_logps.exp()

    def expected(per_state: Tensor) -> float:
        return float((d * per_state).sum())

    out = {
        "return": expected((probs * mdp.reward).sum(-1)),
        "kl_ref": expected((probs * (policy_logps - mdp.ref_logps)).sum(-1)),
        "entropy": expected(-(probs * policy_logps).sum(-1)) / mdp.length,
    }
    for name, target in (targets or {}).items():
        out[f"kl_{name}"] = expected((probs * (policy_logps - target)).sum(-1))
    return out


def states_of(responses: Tensor, vocab_size: int) -> Tensor:
    """Previous token of each position, BOS (= vocab_size) at t = 0. (N, T) -> (N, T)."""
    prev = torch.full_like(responses, vocab_size)
    prev[:, 1:] = responses[:, :-1]
    return prev


def sample_responses(policy_logps: Tensor, prompts: Tensor, generator: torch.Generator) -> Tensor:
    """Sample one response of length T per prompt id. (N,) -> (N, T) token ids."""
    T, V = policy_logps.shape[1], policy_logps.shape[3]
    out = torch.empty(prompts.shape[0], T, dtype=torch.long)
    prev = torch.full_like(prompts, V)
    for t in range(T):
        probs = policy_logps[prompts, t, prev].exp()  # (N, V)
        out[:, t] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        prev = out[:, t]
    return out


def sequence_returns(mdp: TokenMDP, prompts: Tensor, responses: Tensor) -> Tensor:
    """sum_t r(s_t, y_t) for each response. (N,), (N, T) -> (N,)."""
    prev = states_of(responses, mdp.vocab_size)
    steps = torch.arange(mdp.length)[None]
    return mdp.reward[prompts[:, None], steps, prev, responses].sum(-1)


@dataclass(frozen=True)
class PreferencePairs:
    """Pairs: prompts (N,), chosen/rejected (N, T) token ids, optional weights (N,) summing to 1
    (the population regime: every ordered pair weighted by its probability).

    With chosen_prev/rejected_prev, column t of `chosen` is token t of whichever response won at
    step t, and chosen_prev[:, t] the previous token of that response's prefix."""

    prompts: Tensor
    chosen: Tensor
    rejected: Tensor
    weights: Tensor | None = None
    # Previous token of each column's state, when a row mixes two responses (per-position labels);
    # None: the row's own previous token (states_of).
    chosen_prev: Tensor | None = None
    rejected_prev: Tensor | None = None
    # TIS-DPO's per-token weights (N, T), when a loss needs them (bench.contrast_weighted).
    chosen_weight: Tensor | None = None
    rejected_weight: Tensor | None = None

    def __len__(self) -> int:
        return self.prompts.shape[0]

    def flipped(self) -> "PreferencePairs":
        """The same pairs with every label reversed (chosen and rejected exchanged)."""
        return replace(
            self,
            chosen=self.rejected,
            rejected=self.chosen,
            chosen_prev=self.rejected_prev,
            rejected_prev=self.chosen_prev,
            chosen_weight=self.rejected_weight,
            rejected_weight=self.chosen_weight,
        )


def all_responses(vocab_size: int, length: int) -> Tensor:
    """Every response of the given length, (V^T, T), in lexicographic order."""
    grids = torch.meshgrid(*[torch.arange(vocab_size)] * length, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=1)


def sequence_logps(policy_logps: Tensor, prompts: Tensor, responses: Tensor) -> Tensor:
    """log pi(y | x) = sum_t log pi(y_t | s_t). (N,), (N, T) -> (N,)."""
    prev = states_of(responses, policy_logps.shape[3])
    steps = torch.arange(responses.shape[1])[None]
    return policy_logps[prompts[:, None], steps, prev, responses].sum(-1)


def population_pairs(mdp: TokenMDP) -> PreferencePairs:
    """The whole data distribution as weighted pairs, for instances small enough to enumerate.

    Every ordered (y1, y2) per prompt, y1 and y2 independent draws from pi_ref, labelled y1 > y2 with
    Bradley-Terry probability sigma(R(y1) - R(y2)): (chosen=y1, rejected=y2) arises from both draw
    orders, so its weight is 2 P(x) pi_ref(y1|x) pi_ref(y2|x) sigma(R(y1) - R(y2)). A loss averaged
    with these weights is its expectation over the data distribution, so its minimiser is the loss's
    true target.
    """
    ys = all_responses(mdp.vocab_size, mdp.length)  # (M, T)
    M = ys.shape[0]
    prompts, first, second, weights = [], [], [], []
    for x in range(mdp.num_prompts):
        px = torch.full((M,), x)
        log_ref = sequence_logps(mdp.ref_logps, px, ys)  # (M,)
        ret = sequence_returns(mdp, px, ys)  # (M,)
        i, j = torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")
        i, j = i.reshape(-1), j.reshape(-1)
        w = 2 * (log_ref[i] + log_ref[j]).exp() * torch.sigmoid(ret[i] - ret[j]) / mdp.num_prompts
        prompts.append(torch.full((M * M,), x))
        first.append(ys[i])
        second.append(ys[j])
        weights.append(w)
    return PreferencePairs(
        torch.cat(prompts), torch.cat(first), torch.cat(second), torch.cat(weights)
    )


def sample_pairs(mdp: TokenMDP, num_pairs: int, seed: int) -> PreferencePairs:
    """Two responses from pi_ref per pair, labelled by Bradley-Terry on the sequence return:
    p(y1 > y2) = sigma(R(y1) - R(y2)). Seeded and deterministic."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, mdp.num_prompts, (num_pairs,), generator=g)
    first = sample_responses(mdp.ref_logps, prompts, g)
    second = sample_responses(mdp.ref_logps, prompts, g)
    margin = sequence_returns(mdp, prompts, first) - sequence_returns(mdp, prompts, second)
    first_wins = torch.rand(num_pairs, generator=g, dtype=torch.float64) < torch.sigmoid(margin)
    chosen = torch.where(first_wins[:, None], first, second)
    rejected = torch.where(first_wins[:, None], second, first)
    return PreferencePairs(prompts, chosen, rejected)


def distinct_n(responses: Tensor, n: int = 2) -> float:
    """Unique n-grams over all n-grams in a set of responses (higher = more diverse)."""
    grams = responses.unfold(1, n, 1).reshape(-1, n)
    return len({tuple(g) for g in grams.tolist()}) / max(1, grams.shape[0])


def bayes_accuracy(mdp: TokenMDP, pairs: PreferencePairs) -> float:
    """Accuracy of the true reward on the labels: the ceiling for any learned implicit reward."""
    margin = sequence_returns(mdp, pairs.prompts, pairs.chosen) - sequence_returns(
        mdp, pairs.prompts, pairs.rejected
    )
    return float((margin > 0).double().mean() + 0.5 * (margin == 0).double().mean())
