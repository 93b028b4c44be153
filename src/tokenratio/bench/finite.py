"""`tokenratio bench`: train every loss on a token-level MDP with known optima and measure the distance.

A tabular policy (one logit vector per state, initialised at pi_ref) is trained on preference pairs
sampled from pi_ref and labelled by Bradley-Terry on the sequence return (task.py). Its per-token
log-probs go through the same `token_logps` / `token_logps_and_kl`, `LOSSES` and `reduce` as a real
model's, and TBPO-Q's state baseline is a table b(s) in place of the MLP head. Metrics are exact
(dynamic programming over the state occupancy), so differences between methods are not sampling noise
of the evaluation: expected return, KL(pi||pi_ref), KL(pi||pi*_seq) (DPO's target), KL(pi||pi*_tok)
(TBPO's target), token entropy, distinct-2 of samples and held-out preference accuracy.
"""

import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tokenratio.bench import task
from tokenratio.bench.report import format_table, write_report
from tokenratio.bench.tabular import (
    contrast_weighted,
    fit,
    pair_objective,
    resolve,
    tabular_params,
    tabular_token_logps,
)
from tokenratio.losses import LOSSES

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

    losses: tuple[str, ...] = (
        "dpo", "ipo", "bpo", "tdpo1", "tdpo1[generator=sba]", "tdpo2", "tisdpo", "tbpo-q", "tbpo-a",
    )  # fmt: skip
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
    # 370 s measured on a 2-core VM: 9 methods x 3 betas x 3 seeds, each method's lr from the grid
    "default": BenchConfig(lr_grid=LR_GRID),
    "full": BenchConfig(
        losses=(*sorted(set(LOSSES) - {"sft"}), "tdpo1[generator=sba]"),
        betas=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0),
        seeds=(0, 1, 2, 3, 4),
        train_pairs=8000,
        valid_pairs=2000,
        heldout_pairs=2000,
        steps=600,
        lr_grid=LR_GRID,
    ),
}


def train_tabular(
    cfg: BenchConfig,
    mdp: task.TokenMDP,
    loss: str,
    beta: float,
    seed: int,
    splits: dict[str, task.PreferencePairs],
    lr: float | None = None,
    keep_policy: bool = False,
) -> dict:
    """Full-batch Adam from pi_ref (`tabular.fit`), early-stopped on the validation loss.

    Returns the metrics of the kept policy ("final"), a curve sampled every eval_every steps and,
    with keep_policy, the kept logit table ("policy", for TIS-DPO's contrast models).
    """
    torch.manual_seed(seed)
    policy, baseline = tabular_params(mdp)
    optimizer_class = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}[cfg.optimizer]
    lr = cfg.lr if lr is None else lr
    optimizer = optimizer_class([policy, baseline], lr=lr)
    options = dict(cfg.loss_options.get(loss, {}))
    objective = pair_objective(policy, baseline, mdp, loss, beta, options)
    targets = {"seq": task.sequence_optimum(mdp, beta), "tok": task.token_optimum(mdp, beta)}
    curve, best = [], {}

    def on_step(step, value):
        if step % cfg.eval_every and step != cfg.steps:
            return False
        with torch.no_grad():
            valid = float(objective(splits["valid"])[0])
        point = _checkpoint_metrics(policy.detach(), mdp, targets, splits["test"], beta, value)
        curve.append({"step": step, "loss": value[0].item(), **point, "valid_loss": valid})
        if not best or valid < best["valid"]:
            best.update(valid=valid, step=step, policy=policy.detach().clone(), point=curve[-1])
        return False

    fit(lambda: objective(splits["train"]), optimizer, cfg.steps, on_step)
    final = {k: v for k, v in best["point"].items() if k not in ("step", "loss")}
    final.update(best_step=best["step"], lr=lr, valid_loss=best["valid"])
    final["distinct"] = _distinct(best["policy"].log_softmax(-1), mdp, cfg.samples_per_prompt, seed)
    run = {"loss": loss, "beta": beta, "seed": seed, "final": final, "curve": curve}
    return {**run, "policy": best["policy"]} if keep_policy else run


def _checkpoint_metrics(policy, mdp, targets, heldout, beta, value) -> dict:
    """Exact metrics at an evaluation step, with instability made visible: the share of pairs or
    tokens at the log R clamp and the largest |log pi - log pi_ref|."""
    point = policy_point(policy, mdp, targets, heldout, beta)
    point["clamp_frac"] = value[1]
    point["max_log_ratio"] = float((policy.log_softmax(-1) - mdp.ref_logps).abs().max())
    return point


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
        samples = task.sample_responses(logps, prompts, g)
        fractions.append(len({tuple(r) for r in samples.tolist()}) / per_prompt)
    return sum(fractions) / len(fractions)


def policy_point(policy_logits, mdp, targets, heldout, beta) -> dict:
    """Exact metrics of the policy plus held-out preference accuracy of its implicit reward."""
    logps = policy_logits.log_softmax(-1)
    metrics = task.exact_metrics(logps, mdp, targets)
    batch = tabular_token_logps(logps, mdp, heldout)
    _, pair_metrics = LOSSES["dpo"](batch, beta=beta)
    metrics["heldout_acc"] = float(pair_metrics["reward_accuracy"].mean())
    return metrics


REFERENCE_ROWS = ("pi_ref", "opt-seq", "opt-tok")  # printed for scale, never trained


def reference_rows(mdp, beta, heldout, per_prompt) -> list[dict]:
    """The reference and both optima as rows of the table, for scale."""
    rows = []
    targets = {
        "seq": task.sequence_optimum(mdp, beta),
        "tok": task.token_optimum(mdp, beta),
    }
    named = zip(REFERENCE_ROWS, (mdp.ref_logps, targets["seq"], targets["tok"]), strict=True)
    for name, logps in named:
        metrics = policy_point(logps, mdp, targets, heldout, beta)
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


def frontier(mdp: task.TokenMDP, num: int = 40) -> dict[str, list]:
    """Reward-KL curves of both optima over a log-spaced beta grid (for the plot)."""
    betas = torch.logspace(-1.3, 1.0, num).tolist()
    curves = {"beta": betas, "seq": [], "tok": []}
    for beta in betas:
        for name, fn in (("seq", task.sequence_optimum), ("tok", task.token_optimum)):
            m = task.exact_metrics(fn(mdp, beta), mdp)
            curves[name].append((m["kl_ref"], m["return"]))
    return curves


def _seed_splits(cfg: BenchConfig, mdp) -> dict:
    """Per seed: train and validation pairs redrawn (the spread is data sensitivity), and one test
    split fixed across seeds."""
    test = task.sample_pairs(mdp, cfg.heldout_pairs, seed=10_000)
    return {
        seed: {
            "train": task.sample_pairs(mdp, cfg.train_pairs, seed=2 * seed + 1),
            "valid": task.sample_pairs(mdp, cfg.valid_pairs, seed=2 * seed + 2),
            "test": test,
        }
        for seed in cfg.seeds
    }


def _train_with_lr_grid(cfg: BenchConfig, mdp, loss: str, beta: float, data: dict, bar):
    """Seed 0 at every lr of the grid, the lowest validation loss wins; the other seeds at it.
    Returns the runs kept (chosen lr, every seed) and seed 0's final metrics at every lr tried."""
    first, *rest = cfg.seeds
    tried = [
        train_tabular(cfg, mdp, loss, beta, first, data[first], lr)
        for lr in (cfg.lr_grid or (cfg.lr,))
    ]
    chosen = min(tried, key=lambda run: run["final"]["valid_loss"])
    bar.update(len(tried))
    runs = [chosen]
    for seed in rest:
        runs.append(train_tabular(cfg, mdp, loss, beta, seed, data[seed], chosen["final"]["lr"]))
        bar.update(1)
    grid = [{"loss": loss, "beta": beta, "seed": first, "final": r["final"]} for r in tried]
    return runs, grid


def _progress_total(cfg: BenchConfig) -> int:
    weighted = any(resolve(m)[0].weights for m in cfg.losses)
    contrasts = 2 * len(cfg.betas) * len(cfg.seeds) * weighted
    per_job = len(cfg.seeds) + max(0, len(cfg.lr_grid) - 1)
    return len(cfg.betas) * len(cfg.losses) * per_job + contrasts


def train_all(cfg: BenchConfig, mdp, splits: dict, progress: bool) -> tuple[list, list]:
    """Every (loss, beta, seed) run, and seed 0's final metrics at every lr of the grid; TIS-DPO's
    splits are weighted by contrast models first."""
    runs, grid, weighted = [], [], {}  # weighted: (beta, seed) -> splits with TIS-DPO weights
    # smoothing=0: the ETA from the average rate so far; runs differ a lot in length (early
    # stopping, lr grids), and tqdm's default moving average swung it from 5 to 40 minutes
    bar = tqdm(total=_progress_total(cfg), desc="bench", disable=not progress, smoothing=0)
    for beta in cfg.betas:
        for loss in cfg.losses:
            needs_weights = resolve(loss)[0].weights
            if needs_weights and (beta, cfg.seeds[0]) not in weighted:
                for seed in cfg.seeds:
                    weighted[beta, seed] = _contrast_splits(cfg, mdp, beta, seed, splits[seed])
                    bar.update(2)
            data = {s: weighted[beta, s] if needs_weights else splits[s] for s in cfg.seeds}
            kept, tried = _train_with_lr_grid(cfg, mdp, loss, beta, data, bar)
            runs += kept
            grid += tried
    bar.close()
    return runs, grid


def run_finite(cfg: BenchConfig, out: Path, progress: bool = True) -> dict:
    """Train every (loss, beta, seed); write finite.json, finite.txt, frontier.png and curves.png
    into `out`; return the results."""
    for loss in cfg.losses:
        resolve(loss, cfg.loss_options.get(loss))  # unknown names or options fail before any work
    mdp = task.make_mdp(cfg.num_prompts, cfg.vocab_size, cfg.length, cfg.reward_scale)
    splits = _seed_splits(cfg, mdp)
    runs, grid = train_all(cfg, mdp, splits, progress)
    test = splits[cfg.seeds[0]]["test"]
    rows = [
        r for beta in cfg.betas for r in reference_rows(mdp, beta, test, cfg.samples_per_prompt)
    ]
    results = {
        "config": asdict(cfg),
        "bayes_heldout_acc": task.bayes_accuracy(mdp, test),
        "summary": rows + summarise(runs),
        "runs": runs,
        "lr_grid": grid,  # seed 0 at every lr tried: how sensitive each method is to its lr
        "frontier": frontier(mdp),
    }
    write_report(out, "finite", results, format_finite(results))
    from tokenratio.bench import plots  # matplotlib only when plotting

    plots.bench_frontier(results, out / "frontier.png")
    plots.bench_curves(results, out / "curves.png")
    return results


def format_finite(results: dict) -> str:
    """The summary as an aligned text table, grouped by beta."""
    spec = {"best_step": ".0f", "lr": "g"}
    columns = [("method", ""), ("beta", "g")] + [(m, spec.get(m, ".3f")) for m in METRICS]
    rows = sorted(results["summary"], key=lambda r: (r["beta"], r["method"]))
    ceiling = f"held-out accuracy of the true reward (ceiling): {results['bayes_heldout_acc']:.3f}"
    return format_table(rows, columns, [ceiling, *nearest_lines(rows)])


def nearest_lines(rows: list[dict]) -> list[str]:
    """Per beta, in words: which trained method lands nearest each optimum, and which predicts
    held-out preferences best (the reference rows, pi_ref and the optima, are not candidates)."""

    def mean(row, key):
        value = row.get(key)
        return value[0] if isinstance(value, tuple | list) else value

    lines = []
    for beta in sorted({r["beta"] for r in rows}):
        trained = [r for r in rows if r["beta"] == beta and r["method"] not in REFERENCE_ROWS]
        if not trained:
            continue
        parts = []
        for key, what, best in (
            ("kl_seq", "nearest pi*_seq", min),
            ("kl_tok", "nearest pi*_tok", min),
            ("heldout_acc", "best held-out accuracy", max),
        ):
            scored = [r for r in trained if mean(r, key) is not None]
            if scored:
                top = best(scored, key=lambda r, k=key: mean(r, k))
                parts.append(f"{what}: {top['method']} ({mean(top, key):.3f})")
        lines.append(f"beta {beta:g}: " + "; ".join(parts))
    return lines


def config_for(preset: str, **overrides) -> BenchConfig:
    """A preset with field overrides (tuples given as lists are converted)."""
    cfg = PRESETS[preset]
    fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return replace(cfg, **fixed)
