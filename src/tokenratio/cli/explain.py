"""`tokenratio explain`: per-token credit of one pair as HTML and PNG."""

import argparse
from pathlib import Path

from tokenratio.cli.common import examples, fail, on_invalid_hint, trained_run

EXAMPLES = [
    "tokenratio explain --model runs/demo-tbpo-q "
    "--data ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz --index 3 --out explain_out",
]
HELP = f"""\
Colour each response token by beta * r_t (and, for TBPO-Q, show the baseline head's b(s_t)) as a
self-contained HTML page and a PNG. A --model that is a `tokenratio train` output directory (or its
final/) brings beta and the reference from the run's config.json; --beta and --reference override.

{examples(EXAMPLES)}
"""


def run(args: argparse.Namespace) -> int:
    try:
        model, settings = trained_run(args.model)
    except ValueError as err:
        return fail("explain", err)
    reference = args.reference or (settings and settings["model"]["name_or_path"])
    beta = args.beta if args.beta is not None else settings["loss"]["beta"] if settings else 0.1
    if not reference:
        return fail("explain", f"{args.model} is not a `tokenratio train` run: give --reference")
    if args.index < 0:
        return fail("explain", f"--index {args.index}: must be >= 0")
    from tokenratio.eval.evaluate import check_training_overlap
    from tokenratio.eval.explain import explain, read_record

    try:
        raw = read_record(args.data, args.index, args.on_invalid)
        advice = "Choose a held-out record: its index is in the run's splits.json (heldout)."
        check_training_overlap(raw, [("the model", model)], advice)  # loud if it trained on it
        credits = explain(model, reference, raw, beta, Path(args.out))
    except (ValueError, OSError, IndexError) as err:
        return fail("explain", on_invalid_hint(err))
    print(
        f"chosen sum beta*r_t {credits['chosen_reward']:+.4f}, rejected "
        f"{credits['rejected_reward']:+.4f}; wrote {args.out}/explain.html and explain.png"
    )
    return 0


def add_parser(sub) -> None:
    ex = sub.add_parser(
        "explain",
        help="per-token credit of one pair as HTML and PNG",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("--model", required=True, help="trained run or checkpoint (with its head)")
    ex.add_argument("--reference", help="reference policy (default: the run's own)")
    ex.add_argument("--data", required=True, help="preference data")
    ex.add_argument("--index", type=int, default=0, help="which record (0)")
    ex.add_argument(
        "--on-invalid",
        choices=("error", "skip"),
        default="error",
        help="a bad record before --index stops (error, as train), or is skipped and not counted",
    )
    ex.add_argument("--beta", type=float, help="default: the run's, or 0.1")
    ex.add_argument("--out", default="explain_out", help="output directory (explain_out)")
    ex.set_defaults(run=run)
