"""`tokenratio tisdpo`: TIS-DPO end to end (contrast models, token weights, training)."""

import argparse
import json

from tokenratio.cli.common import (
    add_config_arguments,
    examples,
    fail,
    load_config,
    train_summary,
    trained_run,
)

EXAMPLES = [
    "tokenratio tisdpo configs/smollm2_hh_cpu.toml --set train.max_steps=2 "
    "--set data.limit=40 --set train.output_dir=runs/demo-tisdpo",
    "tokenratio tisdpo configs/smollm2_hh_cpu.toml --positive runs/demo-dpo "
    "--negative runs/demo-flipped --score-only --set data.limit=40 "
    "--set train.output_dir=runs/demo-scored",
]

HELP = f"""\
TIS-DPO (Liu et al., arXiv 2410.04350) end to end, with the same config as `tokenratio train`:
  1. two contrastive models from the config's model: pi+ trained with DPO on the data, pi- with DPO
     on flipped preferences (skipped with --positive/--negative, or [tisdpo] positive_model/...);
  2. every response token of data.path (and data.heldout_path) scored once: contrast
     c_t = log pi+(y_t|s_t) - log pi-(y_t|s_t), weight w_t = scale * exp(mu * clamp(c_t, lower,
     upper)) with mu = +1 on chosen and -1 on rejected, written to OUT/weights/train.jsonl;
  3. TIS-DPO (loss tisdpo) trained on the scored file into OUT (final/, metrics.jsonl, ...).
Each stage is skipped when its output exists, so a crashed run continues where it stopped.

Several processes (accelerate launch): train the two models with `tokenratio train --set
loss.name=dpo` (add --set data.swap_preferences=true for pi-), run `tokenratio tisdpo CONFIG
--positive P --negative N --score-only`, then `train --set loss.name=tisdpo --set data.path=OUT/weights/
train.jsonl`. A scored file is plain JSONL: any format `train` reads, plus chosen_weight/
rejected_weight (one number per response token, EOS included) and the raw contrasts.

{examples(EXAMPLES)}
"""


def run(args: argparse.Namespace) -> int:
    models = [
        f"tisdpo.{side}_model={json.dumps(trained_run(getattr(args, side))[0])}"
        for side in ("positive", "negative")
        if getattr(args, side)
    ]
    cfg = load_config(args, "tisdpo", models)
    if cfg is None:
        return 2
    from tokenratio.paths import check_config_paths

    try:
        check_config_paths(cfg)  # before torch loads: a bad path fails at once
    except FileNotFoundError as err:
        return fail("tisdpo", err)
    from tokenratio.checkpoint import CheckpointError
    from tokenratio.data import DataError
    from tokenratio.rundir import RunDirError
    from tokenratio.tisdpo import run_tisdpo
    from tokenratio.trainer import TrainingError

    try:
        result = run_tisdpo(cfg, score_only=args.score_only, progress=not args.no_progress)
    except (DataError, TrainingError, RunDirError, CheckpointError, ValueError, OSError) as err:
        return fail("tisdpo", err)
    if args.score_only:
        print(f"scored: {result}")
    elif "seconds" in result:  # trained now (else it said it had finished before)
        print("TIS-DPO " + train_summary(result, cfg.train.output_dir))
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "tisdpo",
        help="TIS-DPO end to end: contrastive models, token weights, training",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--positive", help="an existing pi+ (a DPO run or model directory) instead of training one"
    )
    parser.add_argument(
        "--negative", help="an existing pi- (flipped DPO run or model) instead of training one"
    )
    parser.add_argument(
        "--score-only", action="store_true", help="stop after writing the scored data"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(run=run)
