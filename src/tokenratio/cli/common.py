"""What every subcommand shares: error printing, config arguments, reading a trained run's config."""

import argparse
import errno
import json
import os
import sys
from pathlib import Path

from tokenratio.intervals import accuracy_interval


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch, or the only process: who prints summaries."""
    return int(os.environ.get("RANK", "0")) == 0


def fail(command: str, err, code: int = 1) -> int:
    """Print `tokenratio COMMAND: message` to stderr and return the exit code. A full disk says
    which file it was writing and what to do."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = f" while writing {err.filename}" if err.filename else ""
        err = (
            f"no space left on the device{where}: free some space, then run again (train: --resume)"
        )
    print(f"tokenratio {command}: {err}", file=sys.stderr)
    return code


def examples(lines: list[str]) -> str:
    """The examples block of a --help text; tests/cli runs every line of it as written."""
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="TOML config file")
    parser.add_argument(
        "--set",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="override a config value (repeatable)",
    )


def add_grid_arguments(parser: argparse.ArgumentParser, table: str) -> None:
    """The options of the commands that run a grid of trainings from one config (study,
    frontier): the config with its [`table`], --set, --no-progress, --overwrite, --print-config."""
    parser.add_argument("config", help=f"a train config with a [{table}] table")
    parser.add_argument(
        "--set", action="append", metavar="SECTION.KEY=VALUE", help="override (repeatable)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no per-run progress lines")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="redo runs and evaluations made with other settings or inputs than the config's "
        "(refused without it, naming what differs)",
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as TOML and exit"
    )


def command_line(command: str, args: argparse.Namespace) -> str:
    """The command line that reproduces a grid command's run, as a user would type it."""
    import shlex

    sets = [part for text in args.set or [] for part in ("--set", text)]
    return shlex.join(["tokenratio", command, args.config, *sets])


def load_config(args: argparse.Namespace, command: str, extra: list[str] = ()):
    """The config file plus --set overrides (and `extra` after them), or None after printing why."""
    from tokenratio.config import ConfigError, load_config

    try:
        return load_config(args.config, [*(args.set or []), *extra])
    except ConfigError as err:
        fail(command, err)
        return None


def trained_run(path: str) -> tuple[str, dict | None]:
    """A `tokenratio train` output directory (or its final/) -> (model directory, the run's config
    as written to config.json); any other path -> (path, None). A run without a complete final/
    (still training, or interrupted) is a ValueError that says so and what to do."""
    directory = Path(path)
    for run in (directory, directory.parent):
        settings = _run_config(run / "config.json")
        if settings is None:
            continue
        final = run / "final"
        if not (final / "COMPLETE").is_file():
            from tokenratio.checkpoint import latest

            found = latest(run / "checkpoints")
            newest = f"; its newest checkpoint is {found}" if found else ""
            raise ValueError(
                f"{run} is a training run without a complete final/ model (still training, "
                f"or interrupted){newest}: `tokenratio train CONFIG --set "
                f"train.output_dir={run} --resume` finishes it and publishes final/"
            )
        return str(final), settings
    return path, None


def _run_config(path: Path) -> dict | None:
    """A run's config.json (None: not a run's); a damaged one is a ValueError naming it."""
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path}: not a readable run config ({err}): restore it from the run's TOML, "
            "or pass --reference and --beta with the model's own directory"
        ) from None
    if not isinstance(settings, dict) or "loss" not in settings or "train" not in settings:
        return None
    return settings


def on_invalid_hint(err) -> str:
    """A data error's message, with the way to skip bad records that eval and explain take."""
    return str(err).replace("set data.on_invalid=skip", "pass --on-invalid skip")


def train_summary(result: dict, out: str) -> str:
    """The end-of-run lines: steps, time, held-out metrics (reward accuracy with its 95% interval
    over the held-out pairs, against chance 0.5) and where everything was written."""
    held_out = ", ".join(
        f"{k.removeprefix('eval_')} {v:.4f}" for k, v in result.items() if k.startswith("eval_")
    )
    lines = [
        f"done: {result['step']} steps in {result['seconds'] / 60:.1f} min "
        f"({result.get('tokens_per_s', float('nan')):.0f} tokens/s at the end)",
        f"held-out: {held_out}",
    ]
    n = result.get("data", {}).get("heldout_pairs")
    accuracy = result.get("eval_reward_accuracy")
    if n and accuracy is not None:
        low, high = accuracy_interval(accuracy, n)
        verdict = "above" if low > 0.5 else "below" if high < 0.5 else "not distinguishable from"
        lines.append(
            f"held-out reward accuracy {accuracy:.3f} on {n} pairs, 95% interval "
            f"{low:.3f}-{high:.3f}: {verdict} chance (0.5)"
        )
    written = f"model: {out}/final (from_pretrained), curves: {out}/curves.png and metrics.jsonl"
    checkpoints = Path(out) / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        written += f", checkpoints: {checkpoints}"
    return "\n".join([*lines, written])
