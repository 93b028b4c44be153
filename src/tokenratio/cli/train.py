"""`tokenratio train`: preference-optimize a Hugging Face causal LM with any loss of the registry."""

import argparse
import shlex

from tokenratio.cli.common import (
    add_config_arguments,
    examples,
    fail,
    is_main_process,
    load_config,
    train_summary,
)

EXAMPLES = [
    "tokenratio train configs/smollm2_hh_cpu.toml --set train.max_steps=2 --set data.limit=40 "
    "--set train.output_dir=runs/demo-tbpo-q",
    "tokenratio train configs/smollm2_hh_cpu.toml --set loss.name=tbpo-a --set train.max_steps=2 "
    "--set data.limit=40 --set train.output_dir=runs/demo-tbpo-a",
    "tokenratio train configs/smollm2_hh_cpu.toml --set loss.name=dpo --set train.max_steps=2 "
    "--set data.limit=40 --set train.output_dir=runs/demo-dpo",
    "tokenratio train configs/smollm2_hh_cpu.toml --print-config --set train.lr=1e-4",
    "tokenratio train configs/smollm2_hh_cpu.toml --set loss.name=dpo "
    "--set data.swap_preferences=true --set train.max_steps=2 --set data.limit=40 "
    "--set train.output_dir=runs/demo-flipped",
]
HELP = f"""\
Preference-optimize a Hugging Face causal LM with any loss of the registry (dpo, ipo, bpo, tdpo1,
tdpo2, tbpo-q, tbpo-a, sft, tisdpo). configs/smollm2_hh_cpu.toml trains SmolLM2-135M-Instruct
(converted by `tokenratio convert-gguf`, see its --help) on HH-RLHF harmless pairs on a CPU.

Overrides: --set section.key=value (repeatable), TOML syntax, e.g. --set train.lr=1e-6
--set loss.options.kl_estimator=k3 --set 'model.lora_target_modules=["q_proj","v_proj"]'.
Sections: model, data, loss, train (docs/training.md and src/tokenratio/config.py list every key).
Several processes: torchrun --nproc_per_node 2 -m tokenratio.cli train CONFIG (CPU, gloo), or
accelerate launch --config_file configs/accelerate/ddp.yaml -m tokenratio.cli train CONFIG (GPUs:
DDP, fsdp.yaml, deepspeed_zero3.yaml).
Writes to train.output_dir: metrics.jsonl, curves.png, data_report.json, config.json, checkpoints/,
final/.
A directory that already holds a run is refused unless --resume (continue it; a finished run is
left alone; only lr, max_steps, cadences and logging may change) or --overwrite (replace it).

{examples(EXAMPLES)}
"""


def run(args: argparse.Namespace) -> int:
    from tokenratio.paths import check_config_paths

    cfg = load_config(args, "train")
    if cfg is None:
        return 2
    if args.print_config:
        from tokenratio.config_print import config_as_toml

        print(config_as_toml(cfg), end="")
        return 0
    try:
        check_config_paths(cfg)  # before torch loads: a bad path fails at once
    except FileNotFoundError as err:
        return fail("train", err)
    from tokenratio.checkpoint import CheckpointError
    from tokenratio.data import DataError
    from tokenratio.rundir import RunDirError
    from tokenratio.trainer import TrainingError, train

    try:
        result = train(
            cfg,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            command=shlex.join(["tokenratio", *getattr(args, "argv", [])]),
        )
    except (DataError, TrainingError, RunDirError, CheckpointError, ValueError, OSError) as err:
        return fail("train", err)
    if is_main_process() and not result.get("finished_before"):
        # once under torchrun / accelerate launch
        print(train_summary(result, cfg.train.output_dir))
    return 0


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "train",
        help="preference-optimize a causal LM (dpo, tbpo-a, tbpo-q, ...)",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue from the newest complete checkpoint in train.output_dir",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config (file, --set, defaults) as commented TOML and exit",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run already in train.output_dir (without it, a used directory is refused)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=run)
