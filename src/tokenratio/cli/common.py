"""What every subcommand shares: error printing, config arguments, reading a trained run's config."""

import argparse
import json
import sys
from pathlib import Path


def fail(command: str, err, code: int = 1) -> int:
    """Print `tokenratio COMMAND: message` to stderr and return the exit code."""
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
    as written to config.json); any other path -> (path, None)."""
    directory = Path(path)
    for run in (directory, directory.parent):
        config = run / "config.json"
        if (run / "final").is_dir() and config.exists():
            settings = json.loads(config.read_text())
            if "loss" in settings and "train" in settings:
                return str(run / "final"), settings
    return path, None
