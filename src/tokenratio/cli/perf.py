"""`tokenratio perf`: the trainer's step per loss, side by side with TRL (docs/perf.md)."""

import argparse

from tokenratio.cli.common import examples, fail

EXAMPLES = [
    "tokenratio perf --model tiny --rows dpo tbpo-a --steps 2 --warmup 1 --repeats 1 --out perf_out",
]
HELP = f"""\
Each row runs in its own process on the same model config, batches and batch size; rows alternate
for --repeats rounds and medians are reported, with ratios against our dpo and TRL's DPOTrainer
(when trl is installed). Our rows time `trainer.train_step`, the function `tokenratio train` runs
every step. MFU is against a matmul peak measured on the same machine. Writes perf.json, perf.txt.
GPU: tokenratio perf --model smollm2-135m --device cuda --dtype bf16.

{examples(EXAMPLES)}
"""


def run(args: argparse.Namespace) -> int:
    from tokenratio.perf.harness import format_report, run_perf

    try:
        report = run_perf(
            model=args.model,
            rows=args.rows,
            steps=args.steps,
            warmup=args.warmup,
            batch=args.batch,
            prompt_len=args.prompt_len,
            response_len=args.response_len,
            repeats=args.repeats,
            device=args.device,
            dtype=args.dtype,
            out=args.out,
        )
    except RuntimeError as err:
        return fail("perf", err)
    print(format_report(report))
    print(f"\nwrote {args.out}/perf.json and {args.out}/perf.txt")
    return 0


def add_parser(sub) -> None:
    perf = sub.add_parser(
        "perf",
        help="step time, tokens/s, peak memory and MFU per loss, side by side with TRL",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    perf.add_argument(
        "--model",
        default="tiny",
        choices=["tiny", "cpu20m", "smollm2-135m", "llama3-vocab"],
        help="tiny (CI), cpu20m (~16M, CPU), smollm2-135m (GPU), llama3-vocab (128k)",
    )
    perf.add_argument(
        "--rows",
        nargs="+",
        help="losses, or losses with options (quote them: 'tdpo1[generator=sba]'), and trl; "
        "default: dpo tbpo-a tbpo-q tdpo2 tdpo1[generator=sba] bpo tisdpo trl",
    )
    perf.add_argument("--steps", type=int, default=8, help="timed steps per row and repeat")
    perf.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    perf.add_argument("--batch", type=int, default=8, help="pairs per step")
    perf.add_argument("--prompt-len", type=int, default=64)
    perf.add_argument("--response-len", type=int, default=64)
    perf.add_argument("--repeats", type=int, default=3, help="alternating rounds (medians)")
    perf.add_argument("--device", default="cpu", help="cpu or cuda")
    perf.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    perf.add_argument("--out", default="perf_out")
    perf.set_defaults(run=run)
