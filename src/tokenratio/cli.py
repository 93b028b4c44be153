"""The `tokenratio` command: bench | train | eval. `main(argv)` returns an exit code, so tests call it.

Heavy imports (transformers, datasets, matplotlib) happen inside the subcommands.
"""

import argparse
import sys
import time
from pathlib import Path

BENCH_HELP = """\
Train every loss on a token-level MDP whose optimal policies are known exactly (dynamic programming),
and report how close each method gets: expected return, KL(pi||pi_ref), KL to the sequence-level
optimum pi*_seq (what DPO targets) and to the token-level optimum pi*_tok (what TBPO targets), token
entropy, distinct responses, held-out preference accuracy and spread across seeds (each seed redraws
the training data). Writes results.json, frontier.png and curves.png to --out.

presets: default ~2 min on 2 CPU cores; --quick ~10 s (CI); --full the whole sweep (~15 min).
"""


def _bench(args: argparse.Namespace) -> int:
    from tokenratio import bench

    preset = "quick" if args.quick else "full" if args.full else "default"
    overrides = {}
    for name in ("losses", "betas", "seeds", "steps", "train_pairs", "lr"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    try:
        cfg = bench.config_for(preset, **overrides)
        for loss in cfg.losses:
            bench.LOSSES[loss]
    except ValueError as err:
        print(f"tokenratio bench: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    started = time.perf_counter()
    results = bench.run_bench(cfg, out, progress=not args.no_progress)
    print(bench.format_table(results))
    print(
        f"\n{preset} preset, {time.perf_counter() - started:.0f} s; wrote {out}/results.json, "
        f"{out}/frontier.png, {out}/curves.png"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenratio",
        description="Token-level preference optimization (TBPO-Q, TBPO-A) and its baselines.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{bench,train}")

    bench = sub.add_parser(
        "bench",
        help="ground-truth benchmark on a token-level MDP with known optima (the default job)",
        description=BENCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = bench.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="one beta, one seed, 150 steps (CI)")
    size.add_argument("--full", action="store_true", help="all losses, 6 betas, 5 seeds")
    bench.add_argument("--out", default="bench_out", help="output directory (default: bench_out)")
    bench.add_argument("--losses", nargs="+", help="registry names, e.g. dpo tbpo-a tbpo-q")
    bench.add_argument("--betas", nargs="+", type=float, help="KL strengths to sweep")
    bench.add_argument("--seeds", nargs="+", type=int, help="data seeds")
    bench.add_argument("--steps", type=int, help="optimizer steps per run")
    bench.add_argument("--train-pairs", dest="train_pairs", type=int, help="training pairs")
    bench.add_argument("--lr", type=float, help="Adam learning rate on the logit table")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
