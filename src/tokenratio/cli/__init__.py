"""The `tokenratio` command: bench | train | tisdpo | study | frontier | eval | explain | perf | convert-gguf.

One small module per command: it parses, calls the library (which writes every file) and prints.
`main(argv)` returns an exit code, so tests call it. Heavy imports (transformers, datasets,
matplotlib) happen inside the commands.
"""

import argparse
import contextlib
import sys

from tokenratio.cli import bench, convert, eval, explain, frontier, perf, study, tisdpo, train

COMMANDS = (bench, train, tisdpo, study, frontier, eval, explain, perf, convert)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    parser = argparse.ArgumentParser(
        prog="tokenratio",
        description="Token-level preference optimization (TBPO-Q, TBPO-A) and its baselines.",
    )
    with contextlib.suppress(PackageNotFoundError):  # a source tree without an install
        parser.add_argument("--version", action="version", version=version("tokenratio"))
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="{bench,train,tisdpo,study,frontier,eval,explain,perf,convert-gguf}",
    )
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command as run, for records
    from tokenratio.cli.common import is_main_process
    from tokenratio.interrupt import SignalStopError

    try:
        return args.run(args)
    except SignalStopError as err:  # training stopped at a step boundary with a checkpoint
        if is_main_process():
            print(f"tokenratio {args.command}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:  # outside training's step loop
        print(f"tokenratio {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
