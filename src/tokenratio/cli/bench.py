"""`tokenratio bench`: the ground-truth benchmark in one of its three regimes (docs/bench.md)."""

import argparse
import time
from pathlib import Path

from tokenratio.cli.common import examples, fail

EXAMPLES = [
    "tokenratio bench --quick --losses dpo tdpo1 tbpo-a --out bench_out",
    "tokenratio bench --quick --steps 30 --losses tbpo-a --loss-option tbpo-a.kl_estimator=k3 "
    "--out bench_k3",
    "tokenratio bench --population --losses dpo bpo --betas 0.5 --out bench_population",
]
HELP = f"""\
Train every loss on a token-level MDP whose optimal policies are known exactly (dynamic programming),
and report how close each method gets: expected return, KL(pi||pi_ref), KL to the sequence-level
optimum pi*_seq (what DPO targets) and to the token-level optimum pi*_tok (what TBPO targets), token
entropy, distinct responses, held-out preference accuracy and spread across seeds (each seed redraws
the training data).

Regimes (one per run):
  finite (default)  sampled pairs, early stopping, a per-method lr grid (0.005 0.01 0.02 0.05: seed 0
                    of every (loss, beta) tries each, the lowest validation loss wins for all seeds).
                    Presets: default 370 s measured on a 2-core VM (9 methods x 3 betas x 3 seeds);
                    --quick ~10 s (one beta, one seed, one lr); --full the whole sweep (hours).
                    Writes finite.json, finite.txt, frontier.png, curves.png.
  --population      each loss minimised on the exact data distribution of a tiny instance, under
                    sequence labels and the per-position controls (~16 s per fit); one --betas
                    value (default 0.5). Writes population.json, population.txt.
  --transformer     a tiny transformer LM fitted to pi_ref by SFT, trained with each loss through
                    the real-model scoring path, sampled metrics with 95% intervals (~40 s per loss);
                    one --betas value (default 1). Writes transformer.json, transformer.txt.
Flags that a regime does not use are refused.

{examples(EXAMPLES)}
"""
FILES = {
    "finite": ("finite.json", "finite.txt", "frontier.png", "curves.png"),
    "population": ("population.json", "population.txt"),
    "transformer": ("transformer.json", "transformer.txt"),
}
FINITE_ONLY = ("quick", "full", "seeds", "steps", "train_pairs", "lr", "lr_grid")


def _regime(args) -> str:
    if args.population and args.transformer:
        raise ValueError("--population and --transformer are separate regimes: run one at a time")
    regime = "population" if args.population else "transformer" if args.transformer else "finite"
    if regime != "finite":
        used = [
            f"--{n.replace('_', '-')}" for n in FINITE_ONLY if getattr(args, n) not in (None, False)
        ]
        if used:
            raise ValueError(f"{', '.join(used)} applies only to the finite regime, not --{regime}")
        if args.betas and len(args.betas) != 1:
            raise ValueError(f"--{regime} takes one --betas value, got {args.betas}")
    return regime


def parse_loss_options(texts: list[str] | None) -> dict[str, dict]:
    """["tbpo-a.kl_estimator=k3", ...] -> {"tbpo-a": {"kl_estimator": "k3"}}."""
    from tokenratio.methods import parse_loss_option

    options: dict[str, dict] = {}
    for text in texts or []:
        loss, option, value = parse_loss_option(text)
        options.setdefault(loss, {})[option] = value
    return options


def _config(args, regime: str):
    from tokenratio.bench.finite import config_for
    from tokenratio.bench.tabular import resolve

    preset = "quick" if args.quick else "full" if args.full else "default"
    names = ("losses", "betas", "seeds", "steps", "train_pairs", "lr", "lr_grid")
    overrides = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    if args.lr is not None and args.lr_grid is None:
        overrides["lr_grid"] = ()  # one lr for every method
    overrides["loss_options"] = parse_loss_options(args.loss_option)
    cfg = config_for(preset, **overrides)
    for loss in cfg.losses:
        entry, options = resolve(loss, cfg.loss_options.get(loss))
        entry.needs(options)  # bad names or options fail here
    stray = sorted(set(cfg.loss_options) - set(cfg.losses))
    if stray:
        raise ValueError(f"--loss-option names {stray}, which --losses does not run")
    return cfg


def _run_regime(regime: str, cfg, args, out: Path) -> str:
    """Run the regime (its library function writes the files) and return its table."""
    progress = not args.no_progress
    if regime == "population":
        from tokenratio.bench.population import format_population, run_population

        beta = cfg.betas[0] if args.betas else 0.5
        rows = run_population(
            cfg.losses, beta=beta, progress=progress, loss_options=cfg.loss_options, out=out
        )
        return format_population(rows)
    if regime == "transformer":
        from tokenratio.bench.transformer import format_transformer, run_transformer

        beta = cfg.betas[0] if args.betas else 1.0
        result = run_transformer(
            cfg.losses, beta=beta, progress=progress, loss_options=cfg.loss_options, out=out
        )
        return format_transformer(result)
    from tokenratio.bench.finite import format_finite, run_finite

    return format_finite(run_finite(cfg, out, progress=progress))


def _check_out(out: Path, regime: str, overwrite: bool) -> None:
    """An earlier benchmark's results are replaced only when asked (as `train` refuses a run
    directory that holds a run)."""
    earlier = [name for name in FILES[regime] if (out / name).exists()]
    if earlier and not overwrite:
        raise ValueError(
            f"{out / earlier[0]} holds an earlier benchmark's results: give --overwrite to "
            "replace them, or another --out"
        )


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        regime = _regime(args)
        cfg = _config(args, regime)
        _check_out(out, regime, args.overwrite)
    except ValueError as err:
        return fail("bench", err, code=2)
    started = time.perf_counter()
    print(_run_regime(regime, cfg, args, out))
    seconds = time.perf_counter() - started
    print(f"\n{regime} regime, {seconds:.0f} s; wrote {', '.join(FILES[regime])} in {out}/")
    return 0


def add_parser(sub) -> None:
    bench = sub.add_parser(
        "bench",
        help="ground-truth benchmark on a token-level MDP with known optima (the default job)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one beta, one seed, 150 steps (CI)")
    size.add_argument("--full", action="store_true", help="all losses, 6 betas, 5 seeds")
    bench.add_argument("--population", action="store_true", help="the exact population regime")
    bench.add_argument("--transformer", action="store_true", help="the transformer policy class")
    bench.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    bench.add_argument(
        "--overwrite", action="store_true", help="replace an earlier benchmark's results in --out"
    )
    bench.add_argument("--losses", nargs="+", help="registry names, e.g. dpo tbpo-a tbpo-q")
    bench.add_argument("--betas", nargs="+", type=float, help="KL strengths to sweep")
    bench.add_argument("--seeds", nargs="+", type=int, help="data seeds")
    bench.add_argument("--steps", type=int, help="optimizer steps per run")
    bench.add_argument("--train-pairs", dest="train_pairs", type=int, help="training pairs")
    bench.add_argument("--lr", type=float, help="one Adam learning rate for every method (no grid)")
    bench.add_argument(
        "--lr-grid",
        dest="lr_grid",
        nargs="+",
        type=float,
        help="per-method lr grid (default and --full: 0.005 0.01 0.02 0.05)",
    )
    bench.add_argument(
        "--loss-option",
        action="append",
        metavar="LOSS.OPTION=VALUE",
        help="an option of one loss, e.g. tbpo-a.kl_estimator=k3 (repeatable)",
    )
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(run=run)
