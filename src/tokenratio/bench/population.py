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

from tokenratio.bench import task
from tokenratio.bench.report import format_table, write_report
from tokenratio.bench.tabular import (
    contrast_weighted,
    fit,
    pair_objective,
    resolve,
    tabular_params,
)


def position_pairs(mdp: task.TokenMDP, score: str) -> task.PreferencePairs:
    """Every ordered pair x every orientation pattern, weighted, for per-position labels.

    Args:
        score: "q" for S = Q_ref, "a" for S = A_ref = Q_ref - V_ref.
    """
    base = task.population_pairs(mdp)  # its chosen/rejected are just the ordered (y1, y2)
    q, v = task.reference_q(mdp)
    T, V = mdp.length, mdp.vocab_size
    steps = torch.arange(T)[None]

    def scores(responses):
        prev = task.states_of(responses, V)
        s = q[base.prompts[:, None], steps, prev, responses]
        if score == "a":
            s = s - v[base.prompts[:, None], steps, prev]
        return s, prev

    s1, prev1 = scores(base.chosen)
    s2, prev2 = scores(base.rejected)
    p_first = torch.sigmoid(s1 - s2)  # (N, T): probability y1's token wins at step t
    # The draw weight of the ordered pair, without base's sequence-level label factor.
    log_ref = task.sequence_logps(mdp.ref_logps, base.prompts, base.chosen)
    log_ref = log_ref + task.sequence_logps(mdp.ref_logps, base.prompts, base.rejected)
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
    return task.PreferencePairs(
        cat["prompts"], cat["chosen"], cat["rejected"], cat["weights"], cat["cprev"], cat["rprev"]
    )


def exact_contrast_weighted(mdp, pairs, beta: float) -> task.PreferencePairs:
    """TIS-DPO's weights with exact contrast models: DPO's population minimiser is pi*_seq (a known
    result, tested), and on flipped labels, Bradley-Terry on -R, it is pi*_seq of the reward -R."""
    positive = task.sequence_optimum(mdp, beta)
    negative = task.sequence_optimum(replace(mdp, reward=-mdp.reward), beta)
    return contrast_weighted(positive, negative, mdp, pairs)


def weight_summary(pairs: task.PreferencePairs) -> dict:
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


def fit_population(
    mdp, pairs, loss, beta, options=None, max_steps=3000, lr=0.05, tol=1e-7, window=100
):
    """Full-batch Adam on the exact expected loss (`tabular.fit`) until it is flat.

    Flat: the loss changed by less than `tol` over the last `window` steps. Returns the policy's
    log-probabilities, the steps taken and the final change (reported, so flatness is visible).
    """
    policy, baseline = tabular_params(mdp)
    optimizer = torch.optim.Adam([policy, baseline], lr=lr)
    # a k3 KL reads one a ~ pi_ref per pair position drawn once, as a cached run does: a fresh
    # draw every step would make the objective noisy, and it would never be flat
    objective = pair_objective(policy, baseline, mdp, loss, beta, dict(options or {}), "cached")
    history = []

    def on_step(step, value):
        history.append(value[0].item())
        return len(history) > window and abs(history[-1] - history[-1 - window]) < tol

    fit(lambda: objective(pairs), optimizer, max_steps, on_step)
    change = abs(history[-1] - history[-1 - window]) if len(history) > window else float("nan")
    return policy.detach().log_softmax(-1), {
        "steps": len(history),
        "final_loss": history[-1],
        "loss_change": change,
    }


# Which losses each data model is run with: every loss on sequence labels; the per-position
# controls with the loss they are the theorem's data model for, in each variant of that loss.
# TDPO1 also runs with the other Bregman generators under sequence labels (docs/method.md §6: every
# strictly convex generator has the same minimiser) and under the per-position labels.
CONTROLS = {
    "sequence": [
        *[("tdpo1", {"generator": g}) for g in ("sba", "kliep", "lsif")],
        ("tbpo-a", {"kl_estimator": "k3"}),
    ],
    "position-Q": [
        ("tbpo-q", {}),
        ("tbpo-q", {"center_log_w": False, "log_w_clamp": None}),
        ("tdpo1", {}),
    ],
    "position-A": [
        ("tbpo-a", {}),
        ("tbpo-a", {"kl_estimator": "k3"}),  # cached draws, as train.ref_cache runs it
        ("tbpo-a", {"kl_estimator": "k3-response"}),
        ("tbpo-a", {"detach_kl": True}),
        ("tdpo1", {}),
    ],
}


def _reference_rows(mdp, targets) -> list[dict]:
    named = (("pi_ref", mdp.ref_logps), ("opt-seq", targets["seq"]), ("opt-tok", targets["tok"]))
    return [
        {"data": "-", "method": name, "options": {}, **task.exact_metrics(logps, mdp, targets)}
        for name, logps in named
    ]


def _jobs(losses, loss_options: dict) -> list[tuple[str, str, dict]]:
    """The methods under sequence labels, then the controls of every loss that runs; a control
    that repeats a method already run ("tdpo1[generator=sba]") is not run twice."""
    jobs = [("sequence", loss, loss_options.get(loss, {})) for loss in losses]
    seen = {(data, *_key(method, options)) for data, method, options in jobs}
    for data, runs in CONTROLS.items():
        for loss, options in runs:
            if loss in losses and (data, *_key(loss, options)) not in seen:
                jobs.append((data, loss, options))
    return jobs


def _key(method: str, options: dict) -> tuple[str, str]:
    entry, merged = resolve(method, options)
    return entry.name, repr(sorted(merged.items()))


def run_population(
    losses, beta=0.5, seed=0, max_steps=3000, progress=True, loss_options=None, out=None
) -> list[dict]:
    """Fit each loss (with its options from `loss_options` under sequence labels) on the exact
    distribution of a 2-prompt, 4-token, length-3 instance; with `out`, write population.json and
    population.txt there."""
    from tqdm.auto import tqdm

    mdp = task.make_mdp(num_prompts=2, vocab_size=4, length=3, seed=seed)
    targets = {"seq": task.sequence_optimum(mdp, beta), "tok": task.token_optimum(mdp, beta)}
    rows = _reference_rows(mdp, targets)
    data = {"sequence": task.population_pairs(mdp)}
    if any(resolve(method)[0].weights for method in losses):
        data["sequence", "weighted"] = exact_contrast_weighted(mdp, data["sequence"], beta)
    for data_name, loss, options in tqdm(
        _jobs(losses, loss_options or {}), desc="population", disable=not progress
    ):
        if data_name not in data:
            data[data_name] = position_pairs(mdp, data_name[-1].lower())
        weighted = resolve(loss)[0].weights
        pairs = data[data_name, "weighted"] if weighted else data[data_name]
        logps, info = fit_population(mdp, pairs, loss, beta, options, max_steps=max_steps)
        metrics = task.exact_metrics(logps, mdp, targets)
        rows.append({"data": data_name, "method": loss, "options": options, **metrics, **info})
        if weighted:
            rows[-1]["token_weights"] = weight_summary(pairs)
    if out is not None:
        write_report(out, "population", {"beta": beta, "rows": rows}, format_population(rows))
    return rows


COLUMNS = [
    ("data", ""),
    ("method", ""),
    ("options", ""),
    ("return", ".3f"),
    ("kl_ref", ".3f"),
    ("kl_seq", ".4f"),
    ("kl_tok", ".4f"),
    ("steps", "d"),
    ("loss_change", ".1e"),
]


def format_population(rows: list[dict]) -> str:
    """An aligned table: which optimum each loss's population minimiser sits on."""
    shown = [
        {**r, "options": ",".join(f"{k}={v}" for k, v in r["options"].items()) or "defaults"}
        for r in rows
    ]
    footer = [
        f"{r['method']} token weights (exact contrast models), pair-weighted: mean "
        f"{w['mean_chosen']:.2f} on chosen, {w['mean_rejected']:.2f} on rejected tokens; "
        f"at a clamp bound: {100 * w['at_bound_chosen']:.0f}% of chosen, "
        f"{100 * w['at_bound_rejected']:.0f}% of rejected tokens"
        for r in rows
        if (w := r.get("token_weights"))
    ]
    return format_table(shown, COLUMNS, footer)
