"""`tokenratio bench`: train every loss on a token-level MDP with known optima and measure the distance.

A tabular policy (one logit vector per state, initialised at pi_ref) is trained on preference pairs
sampled from pi_ref and labelled by Bradley-Terry on the sequence return (synthetic.py). Its per-token
log-probs go through the same `token_logps` / `token_logps_and_kl`, `LOSSES` and `reduce` as a real
model's, and TBPO-Q's state baseline is a table b(s) in place of the MLP head. Metrics are exact
(dynamic programming over the state occupancy), so differences between methods are not sampling noise
of the evaluation: expected return, KL(pi||pi_ref), KL(pi||pi*_seq) (DPO's target), KL(pi||pi*_tok)
(TBPO's target), token entropy, distinct-2 of samples and held-out preference accuracy.
"""

import json
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tokenratio import synthetic
from tokenratio.logprobs import sampled_k3, token_logps, token_logps_and_kl
from tokenratio.losses import LOSSES, TokenLogps, reduce
from tokenratio.tisdpo import importance_weights

METRICS = (
    "return",
    "kl_ref",
    "kl_seq",
    "kl_tok",
    "entropy",
    "distinct",
    "heldout_acc",
    "best_step",
    "clamp_frac",
    "max_log_ratio",
    "lr",
)


@dataclass(frozen=True)
class BenchConfig:
    """What `tokenratio bench` runs. Presets: `quick` (CI), default, `full`."""

    losses: tuple[str, ...] = ("dpo", "ipo", "bpo", "tdpo1", "tdpo2", "tisdpo", "tbpo-q", "tbpo-a")
    betas: tuple[float, ...] = (0.25, 1.0, 4.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    num_prompts: int = 4
    vocab_size: int = 6
    length: int = 5
    reward_scale: float = 1.0
    train_pairs: int = 3000
    valid_pairs: int = 1000  # early stopping: keep the step with the lowest validation loss
    heldout_pairs: int = 1000  # test split: held-out preference accuracy, never used for selection
    steps: int = 300
    # Adam treats every loss's scale alike (TBPO averages over positions, DPO sums: with SGD the same
    # lr would favour DPO). "adam" or "sgd", on the logit table and TBPO-Q's baseline table.
    optimizer: str = "adam"
    lr: float = 0.02
    # Per-method learning rate: with a grid, seed 0 of each (loss, beta) is trained at every lr and
    # the lr with the lowest early-stopped validation loss is kept for all seeds (the loss's own
    # objective on held-out pairs: comparable across lrs, never across losses). Empty: `lr` for all.
    lr_grid: tuple[float, ...] = ()
    eval_every: int = 15
    samples_per_prompt: int = 64  # for `distinct`: unique responses among these samples
    loss_options: dict = field(default_factory=dict)  # {"tbpo-a": {"kl_estimator": "k3"}, ...}


LR_GRID = (0.005, 0.01, 0.02, 0.05)
PRESETS = {
    "quick": BenchConfig(
        betas=(1.0,), seeds=(0,), steps=150, train_pairs=1000, valid_pairs=500, heldout_pairs=500
    ),
    # ~2 min on 2 cores: 8 losses x 3 betas x 3 seeds, each method's lr from the grid
    "default": BenchConfig(lr_grid=LR_GRID),
    "full": BenchConfig(
        losses=tuple(sorted(set(LOSSES) - {"sft"})),
        betas=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0),
        seeds=(0, 1, 2, 3, 4),
        train_pairs=8000,
        valid_pairs=2000,
        heldout_pairs=2000,
        steps=600,
        lr_grid=LR_GRID,
    ),
}


def tabular_token_logps(
    policy_logits: torch.Tensor,
    mdp: synthetic.TokenMDP,
    pairs: synthetic.PreferencePairs,
    baseline: torch.Tensor | None = None,
    kl: str | None = None,
) -> TokenLogps:
    """The loss contract's inputs for a tabular policy, through the real kernels.

    `token_logps` / `token_logps_and_kl` run once per (state, action) of the table, P*T*(V+1)*V
    rows, and each pair's tokens are gathered from the result: the same values and gradients as
    running them on every pair's tokens, without paying their per-row cost N*T times (torch's
    reductions over a handful of actions are dominated by per-row overhead). The sampled k3 draws
    a fresh a ~ pi_ref at every pair position, so it runs per pair.
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

    def side(responses, prev):
        prev = synthetic.states_of(responses, mdp.vocab_size) if prev is None else prev
        index = (pairs.prompts[:, None], steps, prev)
        logps, ref_logps = table[(*index, responses)], mdp.ref_logps[(*index, responses)]
        kl_values = table_kl[index] if kl == "exact" else None
        if kl == "k3":
            kl_values = sampled_k3(policy_logits[index], mdp.ref_logps[index])
        return logps, ref_logps, kl_values, None if baseline is None else baseline[index]

    pc, rc, kc, bc = side(pairs.chosen, pairs.chosen_prev)
    pr, rr, kr, br = side(pairs.rejected, pairs.rejected_prev)
    mask = torch.ones_like(pairs.chosen, dtype=torch.bool)
    weights = pairs.chosen_weight, pairs.rejected_weight
    return TokenLogps(pc, pr, rc, rr, mask, mask, kc, kr, bc, br, *weights)


def contrast_weighted(
    positive: torch.Tensor, negative: torch.Tensor, mdp, pairs, **bounds
) -> synthetic.PreferencePairs:
    """`pairs` with TIS-DPO's token weights from two tabular contrast policies (logit tables):
    contrast log pi+(y_t|s_t) - log pi-(y_t|s_t), then `tisdpo.importance_weights(**bounds)`
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
    pairs: synthetic.PreferencePairs, chosen: torch.Tensor, rejected: torch.Tensor, **bounds
) -> synthetic.PreferencePairs:
    """`pairs` carrying TIS-DPO's weights of their (N, T) chosen and rejected token contrasts."""
    return replace(
        pairs,
        chosen_weight=importance_weights(chosen, chosen=True, **bounds),
        rejected_weight=importance_weights(rejected, chosen=False, **bounds),
    )


def train_tabular(
    cfg: BenchConfig,
    mdp: synthetic.TokenMDP,
    loss: str,
    beta: float,
    seed: int,
    splits: dict[str, synthetic.PreferencePairs],
    lr: float | None = None,
    keep_policy: bool = False,
) -> dict:
    """Full-batch Adam from pi_ref, early-stopped on the validation loss.

    Returns the metrics of the kept policy ("final"), a curve sampled every eval_every steps and,
    with keep_policy, the kept logit table ("policy", for TIS-DPO's contrast models).
    """
    torch.manual_seed(seed)
    options = dict(cfg.loss_options.get(loss, {}))
    policy = mdp.ref_logps.clone().requires_grad_()
    baseline = torch.zeros(mdp.reward.shape[:3], dtype=policy.dtype, requires_grad=True)
    optimizer_class = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[cfg.optimizer]
    lr = cfg.lr if lr is None else lr
    optimizer = optimizer_class([policy, baseline], lr=lr)
    targets = {
        "seq": synthetic.sequence_optimum(mdp, beta),
        "tok": synthetic.token_optimum(mdp, beta),
    }
    kl = LOSSES[loss].needs(options).kl

    def loss_on(pairs):
        batch = tabular_token_logps(policy, mdp, pairs, baseline, kl)
        losses, metrics = LOSSES[loss](batch, beta=beta, **options)
        at_clamp = metrics.get("clamp_fraction", torch.zeros_like(losses))
        if pairs.weights is None:
            return reduce(losses), float(at_clamp.mean())
        return (losses * pairs.weights).sum(), float((at_clamp * pairs.weights).sum())

    curve, best = [], None
    for step in range(cfg.steps + 1):
        total, clamp_frac = loss_on(splits["train"])
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with torch.no_grad():
                valid = float(loss_on(splits["valid"])[0])
            point = evaluate(policy.detach(), mdp, targets, splits["test"], beta)
            # Instability made visible: share of pairs/tokens at the log R clamp, largest log-ratio.
            point["clamp_frac"] = clamp_frac
            point["max_log_ratio"] = float(
                (policy.detach().log_softmax(-1) - mdp.ref_logps).abs().max()
            )
            point["valid_loss"] = valid
            curve.append({"step": step, "loss": total.item(), **point})
            if best is None or valid < best[0]:
                best = (valid, step, policy.detach().clone(), point)
        if step == cfg.steps:
            break
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    best_valid, best_step, kept, final = best
    final = {**final, "best_step": best_step, "lr": lr, "valid_loss": best_valid}
    final["distinct"] = _distinct(kept.log_softmax(-1), mdp, cfg.samples_per_prompt, seed)
    run = {"loss": loss, "beta": beta, "seed": seed, "final": final, "curve": curve}
    return {**run, "policy": kept} if keep_policy else run


def _contrast_splits(cfg: BenchConfig, mdp, beta: float, seed: int, splits: dict) -> dict:
    """TIS-DPO's pipeline in miniature: pi+ trained with DPO on the training pairs, pi- with DPO on
    the same pairs flipped (both at the preset's lr, early-stopped), then every split weighted."""
    positive = train_tabular(cfg, mdp, "dpo", beta, seed, splits, keep_policy=True)["policy"]
    flipped = {name: pairs.flipped() for name, pairs in splits.items()}
    negative = train_tabular(cfg, mdp, "dpo", beta, seed, flipped, keep_policy=True)["policy"]
    return {
        name: contrast_weighted(positive, negative, mdp, pairs) for name, pairs in splits.items()
    }


def _distinct(logps, mdp, per_prompt: int, seed: int) -> float:
    """Fraction of distinct whole responses (distinct-n with n = T) among samples, per prompt."""
    g = torch.Generator().manual_seed(seed)
    fractions = []
    for x in range(mdp.num_prompts):
        prompts = torch.full((per_prompt,), x)
        samples = synthetic.sample_responses(logps, prompts, g)
        fractions.append(len({tuple(r) for r in samples.tolist()}) / per_prompt)
    return sum(fractions) / len(fractions)


def evaluate(policy_logits, mdp, targets, heldout, beta) -> dict:
    """Exact metrics of the policy plus held-out preference accuracy of its implicit reward."""
    logps = policy_logits.log_softmax(-1)
    metrics = synthetic.exact_metrics(logps, mdp, targets)
    batch = tabular_token_logps(logps, mdp, heldout)
    _, pair_metrics = LOSSES["dpo"](batch, beta=beta)
    metrics["heldout_acc"] = float(pair_metrics["reward_accuracy"].mean())
    return metrics


def reference_rows(mdp, beta, heldout, per_prompt) -> list[dict]:
    """The reference and both optima as rows of the table, for scale."""
    rows = []
    targets = {
        "seq": synthetic.sequence_optimum(mdp, beta),
        "tok": synthetic.token_optimum(mdp, beta),
    }
    named = [("pi_ref", mdp.ref_logps), ("opt-seq", targets["seq"]), ("opt-tok", targets["tok"])]
    for name, logps in named:
        metrics = evaluate(logps, mdp, targets, heldout, beta)
        metrics["distinct"] = _distinct(logps, mdp, per_prompt, seed=0)
        metrics.update(
            best_step=0,
            clamp_frac=0.0,
            lr=0.0,
            max_log_ratio=float((logps - mdp.ref_logps).abs().max()),
        )
        if name == "pi_ref":
            metrics["heldout_acc"] = float("nan")  # implicit reward is 0 everywhere
        rows.append({"method": name, "beta": beta, **{k: (v, 0.0) for k, v in metrics.items()}})
    return rows


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and standard deviation across seeds for each (loss, beta)."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["loss"], run["beta"]), []).append(run["final"])
    rows = []
    for (loss, beta), finals in groups.items():
        row = {"method": loss, "beta": beta}
        for metric in METRICS:
            values = [f[metric] for f in finals]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            row[metric] = (statistics.fmean(values), spread)
        rows.append(row)
    return rows


def frontier(mdp: synthetic.TokenMDP, num: int = 40) -> dict[str, list]:
    """Reward-KL curves of both optima over a log-spaced beta grid (for the plot)."""
    betas = torch.logspace(-1.3, 1.0, num).tolist()
    curves = {"beta": betas, "seq": [], "tok": []}
    for beta in betas:
        for name, fn in (("seq", synthetic.sequence_optimum), ("tok", synthetic.token_optimum)):
            m = synthetic.exact_metrics(fn(mdp, beta), mdp)
            curves[name].append((m["kl_ref"], m["return"]))
    return curves


def run_bench(cfg: BenchConfig, out_dir: Path, progress: bool = True) -> dict:
    """Train every (loss, beta, seed), write results.json and plots, return the results."""
    for loss in cfg.losses:
        LOSSES[loss]  # unknown names fail before any work, listing the valid ones
    mdp = synthetic.make_mdp(cfg.num_prompts, cfg.vocab_size, cfg.length, cfg.reward_scale)
    test = synthetic.sample_pairs(mdp, cfg.heldout_pairs, seed=10_000)  # fixed across seeds
    splits = {  # a seed redraws the data a method learns from: the spread is data sensitivity
        seed: {
            "train": synthetic.sample_pairs(mdp, cfg.train_pairs, seed=2 * seed + 1),
            "valid": synthetic.sample_pairs(mdp, cfg.valid_pairs, seed=2 * seed + 2),
            "test": test,
        }
        for seed in cfg.seeds
    }
    jobs = [(loss, beta) for beta in cfg.betas for loss in cfg.losses]
    runs = []
    needs_contrast = any(LOSSES[loss].weights for loss in cfg.losses)
    bar = tqdm(
        total=len(jobs) * (len(cfg.seeds) + max(0, len(cfg.lr_grid) - 1))
        + 2 * len(cfg.betas) * len(cfg.seeds) * needs_contrast,
        desc="bench",
        disable=not progress,
    )
    weighted_splits = {}  # (beta, seed) -> splits with TIS-DPO token weights
    for loss, beta in jobs:
        if LOSSES[loss].weights and (beta, cfg.seeds[0]) not in weighted_splits:
            for seed in cfg.seeds:
                weighted_splits[beta, seed] = _contrast_splits(cfg, mdp, beta, seed, splits[seed])
                bar.update(2)
        data = {
            s: weighted_splits[beta, s] if LOSSES[loss].weights else splits[s] for s in cfg.seeds
        }
        first, *rest = cfg.seeds
        tried = [
            train_tabular(cfg, mdp, loss, beta, first, data[first], lr)
            for lr in (cfg.lr_grid or (cfg.lr,))
        ]
        chosen = min(tried, key=lambda run: run["final"]["valid_loss"])
        runs.append(chosen)
        bar.update(len(tried))
        for seed in rest:
            runs.append(
                train_tabular(cfg, mdp, loss, beta, seed, data[seed], chosen["final"]["lr"])
            )
            bar.update(1)
    bar.close()
    rows = [
        row for beta in cfg.betas for row in reference_rows(mdp, beta, test, cfg.samples_per_prompt)
    ]
    results = {
        "config": asdict(cfg),
        "bayes_heldout_acc": synthetic.bayes_accuracy(mdp, test),
        "summary": rows + summarise(runs),
        "runs": runs,
        "frontier": frontier(mdp),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    from tokenratio import plots  # matplotlib only when plotting

    plots.bench_frontier(results, out_dir / "frontier.png")
    plots.bench_curves(results, out_dir / "curves.png")
    return results


def format_table(results: dict) -> str:
    """The summary as an aligned text table, grouped by beta."""
    header = ["method", "beta", *METRICS]
    lines = ["  ".join(f"{h:>13}" for h in header)]
    rows = sorted(results["summary"], key=lambda r: (r["beta"], r["method"]))
    for row in rows:
        cells = [f"{row['method']:>13}", f"{row['beta']:>13g}"]
        for metric in METRICS:
            mean, spread = row[metric]
            mean = 0.0 if abs(mean) < 5e-4 else mean  # no "-0.000"
            if metric in ("best_step", "lr"):
                cells.append(f"{mean:>13g}")
            else:
                cells.append(f"{mean:>7.3f}±{spread:<5.3f}" if spread else f"{mean:>13.3f}")
        lines.append("  ".join(cells))
    lines.append(
        f"held-out accuracy of the true reward (ceiling): {results['bayes_heldout_acc']:.3f}"
    )
    return "\n".join(lines)


def config_for(preset: str, **overrides) -> BenchConfig:
    """A preset with field overrides (tuples given as lists are converted)."""
    cfg = PRESETS[preset]
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return replace(cfg, **fixed)
