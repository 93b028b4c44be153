"""`tokenratio frontier`: the reward-KL frontier with a gold reward, every loss, one command."""

import argparse

from tokenratio.cli.common import add_grid_arguments, command_line, examples, fail

EXAMPLES = [
    'tokenratio frontier configs/study_smollm2_sentiment_cpu.toml --set \'frontier.methods=["dpo",'
    '"tbpo-a"]\' --set frontier.betas=[0.1] --set frontier.train_prompts=16 '
    "--set frontier.heldout_prompts=4 --set frontier.max_new_tokens=8 --set train.max_steps=3 "
    "--set train.batch_size=2 "
    "--set frontier.output_dir=runs/demo-frontier",
    "tokenratio frontier configs/study_smollm2_sentiment_cpu.toml --print-config",
]
HELP = f"""\
DPO's controlled sentiment experiment for every loss: K samples per prompt from the starting model,
every pair of them labelled by a gold reward (vader, reward-model:PATH or python:MODULE:FUNCTION),
each (method, beta, seed) trained on those pairs, and each run's checkpoints and the reference
evaluated on held-out prompts: the gold reward of the policy's own samples against their exact
KL(pi || pi_ref), diversity beside it. The report compares each method with the baseline (DPO) at
matched KL, with 95% intervals from a bootstrap over prompts, and says first whether TBPO wins.
Writes, in frontier.output_dir: prompts.json, data/ (the pairs), runs/, points/, samples/
(JSONL.gz, rescoreable), report.md, report.json and frontier.png. A rerun reuses what is done.

The config is a `tokenratio train` config (data.path: where the prompts come from) with a
[frontier] table: methods, betas, lr or lrs (one per method), seeds, gold, train_prompts,
heldout_prompts, samples, eval_samples, max_new_tokens, tie_margin, checkpoints, baseline,
output_dir. configs/study_smollm2_sentiment_cpu.toml (2-core CPU) and configs/study_frontier_gpu.toml
(one GPU, with a gold reward model you name).

{examples(EXAMPLES)}
"""


def run(args: argparse.Namespace) -> int:
    from tokenratio.checkpoint import CheckpointError
    from tokenratio.config import ConfigError
    from tokenratio.config_print import config_as_toml, section_as_toml
    from tokenratio.frontier.config import load_frontier
    from tokenratio.frontier.runner import run_frontier
    from tokenratio.rundir import RunDirError
    from tokenratio.trainer import TrainingError

    try:
        frontier, base = load_frontier(args.config, args.set or [])
        if args.print_config:
            print(config_as_toml(base) + "\n" + "\n".join(section_as_toml("frontier", frontier)))
            return 0
        report = run_frontier(
            frontier, base, command=command_line("frontier", args),
            progress=not args.no_progress, overwrite=args.overwrite,
        )  # fmt: skip
    except ConfigError as err:
        return fail("frontier", err, code=2)
    except (TrainingError, RunDirError, CheckpointError, ValueError, OSError) as err:
        return fail("frontier", err)  # GoldRewardError, PromptError, PolicyLoadError: ValueErrors
    print("\n".join(report["lead"]))
    print(f"wrote {frontier.output_dir}/report.md, report.json and frontier.png")
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "frontier",
        help="the reward-KL frontier of every loss with a gold reward, with a report",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_grid_arguments(parser, "frontier")
    parser.set_defaults(run=run)
