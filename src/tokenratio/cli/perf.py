"""`tokenratio perf`: the trainer's step per loss and per switch, side by side with TRL
(docs/perf.md)."""

import argparse

from tokenratio.cli.common import examples, fail

EXAMPLES = [
    "tokenratio perf --model tiny --rows dpo tbpo-a --steps 2 --warmup 1 --repeats 1 --out perf_out",
    "tokenratio perf --model tiny --rows dpo dpo+prefix_sharing=false --data fixed --steps 2 "
    "--warmup 1 --repeats 1 --out perf_out",
    "tokenratio perf --model tiny --rows dpo --ab generate:sample --steps 2 --warmup 1 "
    "--repeats 1 --out perf_out",
]
HELP = f"""\
Each row runs in its own process on the same model config and the same batches of pairs whose
lengths follow --data (default: the HH harmless pairs in ../shared, cut as `tokenratio train`
cuts them), or fixed lengths (--data fixed). Rows alternate for --repeats rounds; medians, with
ratios against our dpo and TRL's DPOTrainer (when trl is installed). Our rows time
`step.train_step`, the function `tokenratio train` runs every step; a row may switch trainer
settings off or on: dpo+prefix_sharing=false, dpo+ref_cache=false, dpo+compile=true.
--ab A:B times two rows step by step, alternating, in ONE process, for step ratios that the rows' own
processes cannot resolve on a noisy machine.
tokens/s counts real tokens (prompt once per side, as TRL counts). Writes perf.json after every
row (an interrupted run keeps its finished rows) and perf.txt at the end.

Presets, one command each:
  --preset cpu    the 16M model, every loss, TRL, the ablation rows and the one-process step ratios
  --preset study  the CPU study's SmolLM2 shape, lengths and LoRA: steps and the test evaluation
                  with and without the frozen trunk cache
  --preset sampling  the frontier's K samples a prompt (prompt forward shared, KV cache) against
                  model.generate(num_return_sequences=K): generated tokens/s on SmolLM2's shape
  --preset head   Llama-3's 128,256 vocabulary (untied head, a small body), 8 pairs x (512 + 512)
                  tokens: the fused head's memory against TRL's
  --preset gpu    random-weight SmolLM2-135M and Llama-3.2-1B shapes, bf16, one GPU, under 10
                  minutes; writes OUT/<model>/

{examples(EXAMPLES)}
"""


def run(args: argparse.Namespace) -> int:
    from tokenratio.perf.harness import PRESETS, format_report, run_perf

    if args.preset:
        settings = dict(PRESETS[args.preset])
        models = settings.pop("models")
        settings.setdefault("data", args.data)  # a preset of fixed lengths keeps its own
    else:
        models = [args.model]
        settings = {
            "rows": args.rows,
            "steps": args.steps,
            "warmup": args.warmup,
            "batch": args.batch,
            "data": args.data,
            "prompt_len": args.prompt_len,
            "response_len": args.response_len,
            "max_length": args.max_length,
            "max_prompt_length": args.max_prompt_length,
            "repeats": args.repeats,
            "ab": args.ab,
            "device": args.device,
            "dtype": args.dtype,
            "ablation": args.ablation,
        }
    for model in models:
        out = args.out if len(models) == 1 else f"{args.out}/{model}"
        try:
            report = run_perf(model=model, out=out, **settings)
        except RuntimeError as err:
            return fail("perf", err)
        print(format_report(report))
        print(f"\nwrote {out}/perf.json and {out}/perf.txt")
    return 0


def add_parser(sub) -> None:
    from tokenratio.perf.lengths import DEFAULT_DATA

    perf = sub.add_parser(
        "perf",
        help="step time, tokens/s, peak memory and MFU per loss, side by side with TRL",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    perf.add_argument(
        "--preset",
        choices=["cpu", "study", "sampling", "head", "gpu"],
        help="one prepared measurement",
    )
    perf.add_argument(
        "--model",
        default="tiny",
        choices=["tiny", "cpu20m", "smollm2-135m", "llama3.2-1b", "llama3-vocab"],
        help="tiny (CI), cpu20m (~16M, CPU), smollm2-135m and llama3.2-1b (GPU), "
        "llama3-vocab (128k vocabulary)",
    )
    perf.add_argument(
        "--rows",
        nargs="+",
        help="losses, losses with options (quote them: 'tdpo1[generator=sba]'), losses with "
        "train switches (dpo+ref_cache=false), and trl; default: dpo tbpo-a tbpo-q tdpo2 "
        "tdpo1[generator=sba] bpo tisdpo trl",
    )
    perf.add_argument("--ablation", action="store_true", help="add dpo with each switch flipped")
    perf.add_argument(
        "--ab",
        nargs="+",
        default=[],
        metavar="A:B",
        help="pairs of our rows timed step by step, alternating, in one process (B's step over "
        "A's), e.g. dpo:tbpo-q 'dpo+ref_cache=false:tbpo-a', or generate:sample (K samples a "
        "prompt: model.generate against the frontier's sampler)",
    )
    perf.add_argument(
        "--data", default=DEFAULT_DATA, help="preference data whose lengths to use, or fixed"
    )
    perf.add_argument("--max-length", type=int, default=512, help="with --data: as data.max_length")
    perf.add_argument("--max-prompt-length", type=int, default=256)
    perf.add_argument("--prompt-len", type=int, default=64, help="with --data fixed")
    perf.add_argument("--response-len", type=int, default=64, help="with --data fixed")
    perf.add_argument("--steps", type=int, default=8, help="timed steps per row and repeat")
    perf.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    perf.add_argument("--batch", type=int, default=8, help="pairs per step")
    perf.add_argument("--repeats", type=int, default=3, help="alternating rounds (medians)")
    perf.add_argument("--device", default="cpu", help="cpu or cuda")
    perf.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    perf.add_argument("--out", default="perf_out")
    perf.set_defaults(run=run)
