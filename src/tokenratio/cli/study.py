"""`tokenratio study`: the paper's comparison on a real model and real data, in one command."""

import argparse

from tokenratio.cli.common import add_grid_arguments, command_line, examples, fail

EXAMPLES = [
    'tokenratio study configs/study_smollm2_hh_cpu.toml --set study.methods=\'["dpo","tbpo-a"]\' '
    "--set study.seeds=[0] --set train.max_steps=2 --set study.train_pairs=40 "
    "--set study.valid_pairs=16 --set study.test_pairs=16 --set study.eval.num_prompts=2 "
    "--set study.eval.max_new_tokens=8 --set study.output_dir=runs/demo-study",
    "tokenratio study configs/study_smollm2_hh_cpu.toml --print-config --set study.seeds=[0]",
]
HELP = f"""\
A grid of (method, beta, lr, seed) trained with `tokenratio train` on a train split; each method's lr
is picked on a validation split (implicit-reward accuracy, the same for every loss; seed 0), the
other seeds train at that lr, and every chosen run and the reference are evaluated on a test split
that training and selection never see (preference accuracy and margin, KL per token, response
length, entropy, self-BLEU, distinct-1; win rates with [study.eval] judge). Writes, in
study.output_dir: data/ (the splits), runs/, test/, report.md, report.json and three plots.
A rerun skips finished runs and evaluations and resumes interrupted runs from their checkpoints.

The config is a `tokenratio train` config with a [study] table (methods, betas, lrs, seeds,
train_pairs, valid_pairs, test_pairs, split_seed, output_dir, [study.eval]); methods are loss
names or losses with options, e.g. "tdpo1[generator=sba]". --set works on every section.
configs/study_smollm2_hh_cpu.toml (2-core CPU) and configs/study_smollm2_hh_gpu.toml (one GPU).

{examples(EXAMPLES)}
"""


def run(args: argparse.Namespace) -> int:
    from tokenratio.checkpoint import CheckpointError
    from tokenratio.config import ConfigError
    from tokenratio.config_print import config_as_toml, section_as_toml
    from tokenratio.reference import CacheLocationError
    from tokenratio.rundir import RunDirError
    from tokenratio.study.config import load_study
    from tokenratio.study.runner import run_study
    from tokenratio.trainer import TrainingError

    try:
        study, base = load_study(args.config, args.set or [])
        if args.print_config:
            print(config_as_toml(base) + "\n" + "\n".join(section_as_toml("study", study)), end="")
            return 0
        report = run_study(
            study,
            base,
            command=command_line("study", args),
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except ConfigError as err:
        return fail("study", err, code=2)
    except (
        TrainingError,
        RunDirError,
        CheckpointError,
        CacheLocationError,
        ValueError,
        OSError,
    ) as err:  # fmt: skip  (DataError, RunLogError, TrunkError, StudyReuseError: ValueErrors)
        return fail("study", err)
    from tokenratio.study.report import markdown_table

    print(markdown_table(report["rows"]))
    print(f"\n{report['verdicts']}\n\n{report['check']}")  # the strings report.md leads with
    print(f"wrote {study.output_dir}/report.md, report.json and plots")
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "study",
        help="the paper's comparison of losses on a real model and data, with a report",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_grid_arguments(parser, "study")
    parser.set_defaults(run=run)
