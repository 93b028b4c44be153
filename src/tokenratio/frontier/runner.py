"""The frontier study: pairs from the reference labelled by the gold reward, every (method, beta,
seed) trained on them, each run's checkpoints and the reference evaluated on held-out prompts,
and the report (report.py).

Resumable at every level: the pairs file is content-keyed (pairs.py), a finished run is skipped
and an interrupted one resumes from its newest checkpoint, and a point on disk is read back.
"""

import time
from dataclasses import asdict, replace
from pathlib import Path

from tokenratio import atomic, runlog
from tokenratio.config import with_overrides
from tokenratio.methods import parse_method
from tokenratio.rundir import release, take_lock
from tokenratio.study.runner import (
    Progress,
    Run,
    quiet_libraries,
    resolved_precision,
    run_log,
    train_run,
)

EVAL_SEED = 1_000_003  # every policy's held-out samples share it (common random numbers)


def grid(frontier) -> list[Run]:
    return [
        Run(method, beta, frontier.lr_of(method), seed)
        for method in frontier.methods
        for beta in frontier.betas
        for seed in frontier.seeds
    ]


def planned_steps(base, pairs: int) -> int:
    """The optimizer steps the trainer will take on `pairs` (trainer._total_steps, its held-out
    split taken out first), for spacing the checkpoints."""
    train = base.train
    kept = pairs - max(1, int(pairs * base.data.heldout_fraction))
    per_epoch = max(1, kept // (train.batch_size * train.grad_accumulation))
    return train.max_steps or per_epoch * train.epochs


def run_config(base, frontier, run: Run, pairs: dict, out: Path):
    """The base config with this run's method, beta, lr, seed, pairs and checkpoint spacing."""
    loss, options = parse_method(run.method)
    every = max(1, planned_steps(base, pairs["pairs"]) // frontier.checkpoints)
    return with_overrides(
        base,
        loss={"name": loss, "options": options, "beta": run.beta},
        train={
            "lr": run.lr,
            "seed": run.seed,
            "output_dir": str(out / "runs" / run.name),
            "save_every": every,
            "keep_checkpoints": frontier.checkpoints + 1,
        },
        data={"path": pairs["path"], "heldout_path": None, "limit": None},
    )


def run_frontier(frontier, base, *, command="", progress=True, overwrite=False) -> dict:
    """Everything (the module docstring); returns the report. One study per output directory
    at a time (its lock)."""
    out = Path(frontier.output_dir)
    take_lock(out, "frontier.output_dir")
    try:
        return _run_frontier(frontier, base, command, progress, overwrite)
    finally:
        release(out)


def _run_frontier(frontier, base, command, progress, overwrite) -> dict:
    from tokenratio.frontier.gold import load_gold_reward
    from tokenratio.frontier.pairs import PairSettings, generate_pairs
    from tokenratio.frontier.prompts import split_prompts
    from tokenratio.frontier.report import write_report
    from tokenratio.modeling import load_tokenizer

    quiet_libraries()
    base = resolved_precision(base)
    out = Path(frontier.output_dir)
    gold = load_gold_reward(frontier.gold)
    tokenizer = load_tokenizer(base.model)
    sizes = (frontier.train_prompts, frontier.heldout_prompts)
    train_prompts, heldout_prompts = split_prompts(
        base.data.path, tokenizer, base.data.max_prompt_length, sizes, frontier.split_seed
    )
    atomic.write_json(out / "prompts.json", {
        "source": base.data.path, "train": [p.id for p in train_prompts],
        "heldout": [p.id for p in heldout_prompts],
    })  # fmt: skip
    settings = PairSettings(
        frontier.samples, frontier.max_new_tokens, frontier.tie_margin, frontier.split_seed,
        frontier.batch_rows,
    )  # fmt: skip
    pairs = generate_pairs(
        base.model.name_or_path, train_prompts, gold, settings, out / "data", progress
    )
    runs = grid(frontier)
    bar = Progress(len(runs) + 1, progress)
    heldout = _heldout(frontier, base, tokenizer, gold, heldout_prompts)
    points = [_reference_point(heldout, out, bar)]
    for run in runs:
        points += _train_and_evaluate(base, frontier, run, pairs, heldout, out, bar, overwrite)
    return write_report(frontier, base, gold, pairs, points, out, command)


def _heldout(frontier, base, tokenizer, gold, prompts):
    from tokenratio.frontier.points import Heldout, heldout_identity
    from tokenratio.modeling import load_causal_lm
    from tokenratio.study.reuse import digest

    reference = load_causal_lm(replace(base.model, dtype="float32")).eval()
    settings = {
        "samples": frontier.eval_samples, "max_new_tokens": frontier.max_new_tokens,
        "batch_rows": frontier.batch_rows, "seed": EVAL_SEED,
    }  # fmt: skip
    identity = heldout_identity(prompts, gold, settings, digest(base.model.name_or_path))
    return Heldout(prompts, reference, tokenizer, gold, **settings, identity=identity)


def _reference_point(heldout, out: Path, bar: Progress) -> dict:
    from tokenratio.frontier.points import evaluate_point

    started = time.perf_counter()
    meta = {"method": "reference", "beta": None, "seed": None, "step": 0}
    point = evaluate_point(heldout, lambda: heldout.reference, "reference", meta, out, "reference")
    bar.step("reference samples", time.perf_counter() - started)
    return point


def _train_and_evaluate(base, frontier, run, pairs, heldout, out, bar, overwrite) -> list[dict]:
    """Train one run (resumed if interrupted) and its points along training."""
    from tokenratio.frontier.points import evaluate_point
    from tokenratio.frontier.policies import load_policy, steps_to_evaluate
    from tokenratio.reference.key import tree_digest
    from tokenratio.study import reuse

    started = time.perf_counter()
    run_dir = out / "runs" / run.name
    cfg = run_config(base, frontier, run, pairs, out)
    reuse.check(run_dir, "config.json", asdict(cfg), overwrite)
    with run_log(out, run.name):
        train_run(cfg, bar.enabled)
    points = []
    for step, directory in steps_to_evaluate(run_dir, _final_step(run_dir)):
        meta = {"method": run.method, "beta": run.beta, "seed": run.seed, "step": step}

        def load(directory=directory):
            return load_policy(heldout.reference, cfg.model, directory)

        name, weights = f"{run.name}-step{step}", tree_digest(directory)
        points.append(evaluate_point(heldout, load, name, meta, out, weights))
    bar.step(f"{run.name}: trained, {len(points)} points", time.perf_counter() - started)
    return points


def _final_step(run_dir: Path) -> int:
    """The step of the run's final evaluation, the last record its log holds."""
    steps = [r["step"] for r in runlog.read(run_dir / runlog.NAME) if "step" in r]
    return max(steps)
