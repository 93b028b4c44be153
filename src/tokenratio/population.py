"""The benchmark's population regime: each loss minimised on the exact data distribution.

A loss "converges to an optimum" is a statement about its minimiser on the data distribution, not on
a few thousand sampled pairs (finite samples overfit, and KLIEP/SBA are unbounded below per sample).
On an instance small enough to enumerate, the training loss here is the exact expectation over every
response pair drawn from pi_ref and over the label, so the minimiser is the loss's true target. Two
data models:

- "sequence": one label per pair, Bradley-Terry on the sequence return, sigma(R(y1) - R(y2)).
  TIS-DPO's token weights come from exact contrast models (`exact_contrast_weighted`).
- "position": the TBPO theorem's own model (docs/method.md §3.1): an independent label at every
  position t, sigma(S(s1_t, y1_t) - S(s2_t, y2_t)), S = Q_ref (the TBPO-Q form) or A_ref (TBPO-A).
  A pair is expanded into its 2^T orientation patterns (which response wins at each step), weighted
  by their probabilities, so the unchanged losses compute the exact expectation.
"""

import itertools
from dataclasses import replace

import torch

from tokenratio import synthetic
from tokenratio.bench import contrast_weighted, tabular_token_logps
from tokenratio.losses import LOSSES


def position_pairs(mdp: synthetic.TokenMDP, score: str) -> synthetic.PreferencePairs:
    """Every ordered pair x every orientation pattern, weighted, for per-position labels.

    Args:
        score: "q" for S = Q_ref, "a" for S = A_ref = Q_ref - V_ref.
    """
    base = synthetic.population_pairs(mdp)  # its chosen/rejected are just the ordered (y1, y2)
    q, v = synthetic.reference_q(mdp)
    T, V = mdp.length, mdp.vocab_size
    steps = torch.arange(T)[None]

    def scores(responses):
        prev = synthetic.states_of(responses, V)
        s = q[base.prompts[:, None], steps, prev, responses]
        if score == "a":
            s = s - v[base.prompts[:, None], steps, prev]
        return s, prev

    s1, prev1 = scores(base.chosen)
    s2, prev2 = scores(base.rejected)
    p_first = torch.sigmoid(s1 - s2)  # (N, T): probability y1's token wins at step t
    # The draw weight of the ordered pair, without base's sequence-level label factor.
    log_ref = synthetic.sequence_logps(mdp.ref_logps, base.prompts, base.chosen)
    log_ref = log_ref + synthetic.sequence_logps(mdp.ref_logps, base.prompts, base.rejected)
    draw = log_ref.exp() / mdp.num_prompts  # (N,)
    rows = {k: [] for k in ("prompts", "chosen", "rejected", "weights", "cprev", "rprev")}
    for pattern in itertools.product((True, False), repeat=T):
        first_wins = torch.tensor(pattern)[None].expand_as(p_first)  # (N, T)
        prob = torch.where(first_wins, p_first, 1 - p_first).prod(-1)
        rows["prompts"].append(base.prompts)
        rows["chosen"].append(torch.where(first_wins, base.chosen, base.rejected))
        rows["rejected"].append(torch.where(first_wins, base.rejected, base.chosen))
        rows["cprev"].append(torch.where(first_wins, prev1, prev2))
        rows["rprev"].append(torch.where(first_wins, prev2, prev1))
        rows["weights"].append(draw * prob)
    cat = {k: torch.cat(v) for k, v in rows.items()}
    return synthetic.PreferencePairs(
        cat["prompts"], cat["chosen"], cat["rejected"], cat["weights"], cat["cprev"], cat["rprev"]
    )


def exact_contrast_weighted(mdp, pairs, beta: float) -> synthetic.PreferencePairs:
    """TIS-DPO's weights with exact contrast models: DPO's population minimiser is pi*_seq (a known
    result, tested), and on flipped labels, Bradley-Terry on -R, it is pi*_seq of the reward -R."""
    positive = synthetic.sequence_optimum(mdp, beta)
    negative = synthetic.sequence_optimum(replace(mdp, reward=-mdp.reward), beta)
    return contrast_weighted(positive, negative, mdp, pairs)


def weight_summary(pairs: synthetic.PreferencePairs) -> dict:
    """TIS-DPO's token weights over the data distribution: their pair-weighted means and the share
    of tokens at a clamp bound (the smallest or largest weight)."""
    share = pairs.weights[:, None] / pairs.weights.sum()  # (N, 1), each pair's probability
    out = {}
    for side in ("chosen", "rejected"):
        w = getattr(pairs, f"{side}_weight")  # (N, T)
        at_bound = (w <= w.min() + 1e-12) | (w >= w.max() - 1e-12)
        out[f"mean_{side}"] = float((share * w).sum() / w.shape[1])
        out[f"at_bound_{side}"] = float((share * at_bound).sum() / w.shape[1])
    return out


def fit(mdp, pairs, loss, beta, options=None, max_steps=3000, lr=0.05, tol=1e-7, window=100):
    """Full-batch Adam on the exact expected loss until it is flat.

    Flat: the loss changed by less than `tol` over the last `window` steps. Returns the policy's
    log-probabilities, the steps taken and the final change (reported, so flatness is visible).
    """
    options = dict(options or {})
    policy = mdp.ref_logps.clone().requires_grad_()
    baseline = torch.zeros(mdp.reward.shape[:3], dtype=policy.dtype, requires_grad=True)
    optimizer = torch.optim.Adam([policy, baseline], lr=lr)
    kl = LOSSES[loss].needs(options).kl
    history = []
    for step in range(1, max_steps + 1):
        batch = tabular_token_logps(policy, mdp, pairs, baseline, kl)
        total = (LOSSES[loss](batch, beta=beta, **options)[0] * pairs.weights).sum()
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        history.append(total.item())
        if step > window and abs(history[-1] - history[-1 - window]) < tol:
            break
    change = abs(history[-1] - history[-1 - window]) if len(history) > window else float("nan")
    return policy.detach().log_softmax(-1), {
        "steps": step,
        "final_loss": history[-1],
        "loss_change": change,
    }


# Which losses each data model is run with: every loss on sequence labels; the per-position
# controls with the loss they are the theorem's data model for, in each variant of that loss.
CONTROLS = {
    "position-Q": [("tbpo-q", {}), ("tbpo-q", {"center_log_w": False, "log_w_clamp": None})],
    "position-A": [
        ("tbpo-a", {}),
        ("tbpo-a", {"kl_estimator": "k3-response"}),
        ("tbpo-a", {"detach_kl": True}),
    ],
}


def run_population(losses, beta=0.5, seed=0, max_steps=3000, progress=True) -> list[dict]:
    """Fit each loss on the exact distribution of a 2-prompt, 4-token, length-3 instance."""
    from tqdm.auto import tqdm

    mdp = synthetic.make_mdp(num_prompts=2, vocab_size=4, length=3, seed=seed)
    targets = {
        "seq": synthetic.sequence_optimum(mdp, beta),
        "tok": synthetic.token_optimum(mdp, beta),
    }
    rows = []
    for name, logps in (
        ("pi_ref", mdp.ref_logps),
        ("opt-seq", targets["seq"]),
        ("opt-tok", targets["tok"]),
    ):
        rows.append(
            {
                "data": "-",
                "method": name,
                "options": {},
                **synthetic.exact_metrics(logps, mdp, targets),
            }
        )
    jobs = [("sequence", loss, {}) for loss in losses]
    jobs += [(d, loss, o) for d, runs in CONTROLS.items() for loss, o in runs if loss in losses]
    data = {"sequence": synthetic.population_pairs(mdp)}
    if any(LOSSES[loss].weights for loss in losses):
        data["sequence", "weighted"] = exact_contrast_weighted(mdp, data["sequence"], beta)
    for data_name, loss, options in tqdm(jobs, desc="population", disable=not progress):
        if data_name not in data:
            data[data_name] = position_pairs(mdp, data_name[-1].lower())
        weighted = LOSSES[loss].weights
        pairs = data[data_name, "weighted"] if weighted else data[data_name]
        logps, info = fit(mdp, pairs, loss, beta, options, max_steps=max_steps)
        metrics = synthetic.exact_metrics(logps, mdp, targets)
        rows.append({"data": data_name, "method": loss, "options": options, **metrics, **info})
        if weighted:
            rows[-1]["token_weights"] = weight_summary(pairs)
    return rows


def format_population(rows: list[dict]) -> str:
    """An aligned table: which optimum each loss's population minimiser sits on."""
    header = (
        f"{'data':>11} {'method':>7} {'options':>36} {'return':>7} {'kl_ref':>7} "
        f"{'kl_seq':>8} {'kl_tok':>8} {'steps':>6} {'loss_change':>11}"
    )
    lines = [header]
    for r in rows:
        options = ",".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults"
        tail = f"{r['steps']:>6} {r['loss_change']:>11.1e}" if "steps" in r else f"{'':>18}"
        lines.append(
            f"{r['data']:>11} {r['method']:>7} {options:>36} {r['return']:>7.3f} "
            f"{r['kl_ref']:>7.3f} {r['kl_seq']:>8.4f} {r['kl_tok']:>8.4f} {tail}"
        )
    for r in rows:
        if "token_weights" in r:
            w = r["token_weights"]
            lines.append(
                f"{r['method']} token weights (exact contrast models), pair-weighted: mean "
                f"{w['mean_chosen']:.2f} on chosen, {w['mean_rejected']:.2f} on rejected tokens; "
                f"at a clamp bound: {100 * w['at_bound_chosen']:.0f}% of chosen, "
                f"{100 * w['at_bound_rejected']:.0f}% of rejected tokens"
            )
    return "\n".join(lines)
