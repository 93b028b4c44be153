"""Two rows' `trainer.train_step` timed in ONE process, alternating, on the same HH-length
batches: a check of small step ratios (TBPO-Q against DPO) that the one-process-per-row harness
cannot resolve on a noisy VM (its rows also differ in process and memory layout).

    python scripts/perf_ab.py dpo tbpo-q --model cpu20m --repeats 3
"""

import argparse
import statistics
import time

import torch

from tokenratio.perf.harness import pair_lengths_for, plan_batches
from tokenratio.perf.lengths import DEFAULT_DATA
from tokenratio.perf.models import MODELS, build_model, pairs_of_lengths, token_rows, word_tokenizer
from tokenratio.perf.worker import parse_row, perf_config
from tokenratio.trainer import collate_fn, make_accelerator, prepare_step, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", nargs=2)
    parser.add_argument("--model", default="cpu20m")
    parser.add_argument("--data", default=DEFAULT_DATA)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    settings = {"max_length": 512, "max_prompt_length": 256}
    lengths, plans, _ = plan_batches(
        pair_lengths_for(args.data, args.model, settings), args.batch, args.steps + 1
    )
    vocab = MODELS[args.model][0]
    rows = token_rows(word_tokenizer(vocab), pairs_of_lengths(lengths, vocab), False)
    runs = {}
    for row in args.rows:
        method, switches = parse_row(row)
        cfg = perf_config(method, {"model": args.model, "device": "cpu"}, switches)
        step = prepare_step(cfg, make_accelerator(cfg), 1000, model=build_model(args.model))
        batches = [collate_fn(cfg)([rows[i] for i in b], 0) for b in plans["shared"]]
        train_step(step, [batches[0]])  # warm-up
        runs[row] = (step, batches[1:], [])
    for _ in range(args.repeats):
        for step, batches, times in runs.values():
            start = time.perf_counter()
            for batch in batches:
                train_step(step, [batch])
            times.append(time.perf_counter() - start)
    (a, (_, _, ta)), (b, (_, _, tb)) = runs.items()
    print(f"{a}: {[round(t, 2) for t in ta]} s; {b}: {[round(t, 2) for t in tb]} s")
    print(f"{b} / {a} (medians): {statistics.median(tb) / statistics.median(ta):.3f}x")


if __name__ == "__main__":
    main()
