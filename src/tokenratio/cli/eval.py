"""`tokenratio eval`: the paper's metrics on checkpoints, side by side."""

import argparse
import json
from pathlib import Path

from tokenratio.cli.common import examples, fail, on_invalid_hint, trained_run

HH = "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
EXAMPLES = [
    "tokenratio eval --model tbpo-a=runs/demo-tbpo-a --model tbpo-q=runs/demo-tbpo-q "
    "--num-prompts 4 --num-pairs 16 --out eval_out",
    f"tokenratio eval --model dpo=runs/demo-dpo --reference models/smollm2-135m --beta 0.1 --data {HH} "
    "--num-prompts 2 --samples 2 --max-new-tokens 16 --out eval_dpo",
]
HELP = f"""\
Evaluate trained checkpoints side by side, the way the paper does:
  held-out preference metrics (implicit-reward accuracy, margin, KL(pi||pi_ref)), generation with
  temperature 1.0, top-p 0.95, 128 new tokens, 5 samples per prompt (seeded), and predictive entropy
  (top-20), self-BLEU, distinct-1; with --judge, win rate and length-controlled win rate of the
  first sample against the dataset's chosen response (or --versus MODEL).
A --model that is a `tokenratio train` output directory (or its final/) brings its own settings:
beta, the reference model, the chat template and the lengths (data.max_length, max_prompt_length)
come from the run's config.json; --beta, --reference, --max-length and --max-prompt-length
override. Bad records stop the evaluation (naming file and line) unless --on-invalid skip, which
counts them by reason on stdout and in results.json.
Without --data, runs are evaluated on their own held-out split (splits.json in the run). With
--data (and --offset to skip records), a loud warning says how many evaluated records a run
trained on; results.json records the count.
Models run on the device Accelerate picks (the GPU when there is one).
Judges: --judge reward-model:PATH (any AutoModelForSequenceClassification) or
--judge openai:http://127.0.0.1:8000/v1 (any OpenAI-compatible endpoint).
Writes --out/results.json and --out/results.md (mean ± standard error).

{examples(EXAMPLES)}
"""


def _name_path(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).name, text
    return name, path


def _shared(runs: list[dict], key: str, value, flag: str):
    """One setting for every model: the flag's, else the one all trained runs agree on."""
    if value is not None:
        return value
    found = {key(run) for run in runs}
    if len(found) > 1:
        raise ValueError(f"the runs disagree on {flag.lstrip('-')} ({sorted(found)}): give {flag}")
    return found.pop() if found else None


def check_flags(args) -> None:
    """Flags that cannot work, refused before anything loads."""
    if args.num_prompts and args.samples < 2:
        raise ValueError(f"--samples {args.samples}: self-BLEU needs at least 2 samples per prompt")
    for flag in ("num_prompts", "num_pairs", "max_new_tokens"):
        if (getattr(args, flag) or 0) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0")


def resolve_lengths(args, runs: list[dict]) -> tuple[int, int]:
    """data.max_length and data.max_prompt_length: the flags', else the runs' (the tokens they
    trained on), else eval's defaults."""
    lengths = []
    for key, flag, default in (
        ("max_length", "--max-length", 512),
        ("max_prompt_length", "--max-prompt-length", 384),
    ):
        value = _shared(runs, lambda r, k=key: r.get("data", {}).get(k), getattr(args, key), flag)
        lengths.append(default if value is None else value)
    return tuple(lengths)


def resolve_models(args) -> tuple[tuple, str | None, float, bool | None]:
    """(name, model dir) pairs, the reference, beta and data.chat_template, from the flags and the
    runs' configs."""
    models, runs = [], []
    for name, path in map(_name_path, args.model):
        directory, settings = trained_run(path)
        models.append((name, directory))
        runs += [settings] if settings else []
    reference = _shared(runs, lambda r: r["model"]["name_or_path"], args.reference, "--reference")
    beta = _shared(runs, lambda r: r["loss"]["beta"], args.beta, "--beta")
    # Runs from before data.chat_template existed were trained on raw HH text.
    chat = _shared(runs, lambda r: r.get("data", {}).get("chat_template", False), None, "--data")
    args.max_length, args.max_prompt_length = resolve_lengths(args, runs)
    return tuple(models), reference, 0.1 if beta is None else beta, chat


def resolve_data(args, models) -> tuple[str, tuple[int, ...] | None]:
    """--data, else the held-out split the trained runs share (from their splits.json)."""
    from tokenratio.provenance import read_splits, run_dir_of

    if args.data:
        return args.data, None
    splits = [read_splits(run) for run in filter(None, (run_dir_of(p) for _, p in models))]
    heldout = {json.dumps(s["heldout"], sort_keys=True) for s in splits}
    if len(splits) != len(models) or len(heldout) != 1:
        raise ValueError(
            "give --data: without it every --model must be a `tokenratio train` run, all with "
            "the same held-out split"
        )
    return splits[0]["heldout"]["path"], tuple(splits[0]["heldout"]["records"])


def judge_options(args) -> dict:
    """The chat judge's settings from the flags (a reward model takes none)."""
    if not (args.judge or "").startswith("openai:"):
        return {}
    options = {"timeout": args.judge_timeout, "retries": args.judge_retries}
    options["deadline"] = args.judge_deadline
    return {**options, "model": args.judge_model} if args.judge_model else options


def run(args: argparse.Namespace) -> int:
    from tokenratio.paths import check_local_path

    try:
        check_flags(args)
        models, reference, beta, chat_template = resolve_models(args)
        for path in [p for _, p in models] + [reference] * bool(reference):
            check_local_path(path)  # every path before anything (torch included) loads
    except (FileNotFoundError, ValueError) as err:
        return fail("eval", err)
    from tokenratio.data import DataError
    from tokenratio.eval.evaluate import EvalConfig, markdown_table, run_eval
    from tokenratio.eval.judges import JudgeError

    try:
        data, records = resolve_data(args, models)
        cfg = EvalConfig(
            models=models,
            data=data,
            records=records,
            offset=args.offset,
            split=args.split,
            chat_template=chat_template,
            reference=reference,
            num_prompts=args.num_prompts,
            num_pairs=args.num_pairs if args.num_pairs is not None else (None if records else 64),
            samples_per_prompt=args.samples,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            beta=beta,
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            on_invalid=args.on_invalid,
            judge=args.judge,
            versus=args.versus,
            judge_options=judge_options(args),
            trunk_cache=args.trunk_cache,
            mixed_precision=args.mixed_precision,
        )
        results = run_eval(cfg, Path(args.out))
    except (JudgeError, DataError, ValueError, OSError) as err:
        return fail("eval", on_invalid_hint(err))
    print(markdown_table(results))
    print(f"\nwrote {args.out}/results.json and {args.out}/results.md")
    return 0


def add_parser(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="the paper's metrics on checkpoints, side by side",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument(
        "--model", action="append", required=True, metavar="NAME=PATH", help="repeatable"
    )
    ev.add_argument(
        "--trunk-cache",
        action="store_true",
        help="score pairs above the frozen layers a model shares with the reference (a model "
        "trained with LoRA on its last layers), computed once and kept beside the data",
    )
    ev.add_argument(
        "--mixed-precision",
        default="auto",
        choices=["auto", "no", "bf16"],
        help="bf16 autocast; auto: bf16 where the hardware multiplies it natively, else fp32",
    )
    ev.add_argument("--reference", help="reference policy (default: the runs' own)")
    ev.add_argument(
        "--data",
        help="preference data (any format train reads); default: the runs' own held-out split",
    )
    ev.add_argument("--offset", type=int, default=0, help="skip this many records of --data (0)")
    ev.add_argument(
        "--split", default="train", help="the split of a --data directory or hub dataset (train)"
    )
    ev.add_argument(
        "--on-invalid",
        choices=("error", "skip"),
        default="error",
        help="a bad record stops the evaluation, or is skipped and counted (error, as train)",
    )
    ev.add_argument(
        "--max-length",
        type=int,
        help="prompt + response tokens (default: the runs' data.max_length, or 512)",
    )
    ev.add_argument(
        "--max-prompt-length",
        type=int,
        help="prompt tokens (default: the runs' data.max_prompt_length, or 384)",
    )
    ev.add_argument("--num-prompts", type=int, default=20, help="prompts to generate for (20)")
    ev.add_argument(
        "--num-pairs",
        type=int,
        default=None,
        help="pairs for preference metrics (default: a run's whole held-out split; 64 of --data)",
    )
    ev.add_argument("--samples", type=int, default=5, help="samples per prompt (paper: 5)")
    ev.add_argument("--max-new-tokens", type=int, default=128, help="paper: 128")
    ev.add_argument("--temperature", type=float, default=1.0, help="paper: 1.0")
    ev.add_argument("--top-p", type=float, default=0.95, help="paper: 0.95")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--beta", type=float, help="for implicit rewards (default: the runs', or 0.1)")
    ev.add_argument("--judge", help="reward-model:PATH or openai:URL")
    ev.add_argument("--judge-model", help="model name sent to an OpenAI-compatible judge")
    ev.add_argument(
        "--judge-timeout", type=float, default=60.0, help="seconds per judge request (60)"
    )
    ev.add_argument("--judge-retries", type=int, default=3, help="retries per request (3)")
    ev.add_argument(
        "--judge-deadline",
        type=float,
        default=1800.0,
        help="seconds for all judging; past it the run stops, metrics kept (1800)",
    )
    ev.add_argument(
        "--versus",
        default="dataset",
        help="win rate against 'dataset' (its chosen response) or a model NAME",
    )
    ev.add_argument("--out", default="eval_out", help="output directory (eval_out)")
    ev.set_defaults(run=run)
