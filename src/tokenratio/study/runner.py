"""The study's grid: each method's lr picked on validation with seed 0, the other seeds at that lr,
every chosen run and the reference evaluated on a test split that training and selection never see.

Resumable at every level: a finished run (its `study_run.json`) or evaluation (its `results.json`)
is skipped; an interrupted run resumes from its newest checkpoint.
"""

import contextlib
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tokenratio import atomic, runlog
from tokenratio.config import with_overrides
from tokenratio.methods import parse_method
from tokenratio.rundir import release, take_lock
from tokenratio.study import reuse


@dataclass(frozen=True)
class Run:
    method: str
    beta: float
    lr: float
    seed: int

    @property
    def name(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9.-]+", "-", self.method).strip("-")
        return f"{slug}-b{self.beta:g}-lr{self.lr:g}-s{self.seed}"


class Progress:
    """One line per finished step of the study, with the time it took and an ETA."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self.started = time.perf_counter()

    def step(self, what: str, seconds: float, skipped: bool = False) -> None:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (self.total - self.done)
        status = "found, skipped" if skipped else f"{seconds:.0f} s"
        if self.enabled:
            print(
                f"[{self.done}/{self.total}] {what}: {status} (ETA {eta / 60:.1f} min)", flush=True
            )


def run_config(base, run: Run, paths: dict, out: Path):
    """The base training config with this run's method, beta, lr, seed, data and directory."""
    loss, options = parse_method(run.method)
    return with_overrides(
        base,
        loss={"name": loss, "options": options, "beta": run.beta},
        train={"lr": run.lr, "seed": run.seed, "output_dir": str(out / "runs" / run.name)},
        data={"path": paths["train"], "heldout_path": paths["valid"], "limit": None},
    )


def evaluate_on_split(
    models, data: str, reference: str, beta: float, num_pairs: int, study, base, out: Path,
    overwrite: bool = False, progress: bool = False,
) -> dict:  # fmt: skip
    """`tokenratio eval`'s metrics for one model, generations and judge included, into
    out/results.json (reused when present and made with these settings), on pairs tokenized as
    training tokenized them, with the training's trunk cache and precision (`base`: the base
    Config)."""
    from tokenratio.eval.evaluate import EvalConfig, run_eval

    study_data, e = base.data, study.eval
    cfg = EvalConfig(
        models=tuple(models),
        data=data,
        reference=reference,
        num_pairs=num_pairs,
        num_prompts=e.num_prompts,
        samples_per_prompt=e.samples,
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        beta=beta,
        chat_template=study_data.chat_template,
        progress=progress,  # bars on stderr; the study prints one line per evaluation
        max_length=study_data.max_length,
        max_prompt_length=study_data.max_prompt_length,
        judge=e.judge or None,
        judge_options={"model": e.judge_model} if e.judge_model else {},
        trunk_cache=base.train.trunk_cache,
        mixed_precision=base.train.mixed_precision,
    )
    reuse.check(out, "results.json", asdict(cfg), overwrite, key=lambda r: r["config"])
    inputs = {"data": reuse.digest(data), "reference": reuse.digest(reference)}
    reuse.check_inputs(out, {**inputs, **{name: reuse.digest(p) for name, p in models}}, overwrite)
    if (out / "results.json").exists():
        return reuse.read_json(out / "results.json")["results"][0]
    with run_log(out.parent.parent, f"test-{out.name}"):
        return run_eval(cfg, out)[0]


def train_and_validate(
    base, study, run: Run, paths: dict, out: Path, lines: Progress, overwrite: bool = False
) -> dict:
    """Train one run (resuming it if interrupted); its validation score is the trainer's final
    held-out evaluation on the validation split: DPO's implicit-reward accuracy, which every loss
    reports the same way (losses._sequence_metrics), so no second pass over the split."""

    run_dir = out / "runs" / run.name
    cfg = run_config(base, run, paths, out)
    reuse.check(run_dir, "config.json", asdict(cfg), overwrite)
    inputs = {name: reuse.digest(paths[name]) for name in ("train", "valid")}
    reuse.check_inputs(
        run_dir, {**inputs, "model": reuse.digest(cfg.model.name_or_path)}, overwrite
    )
    record_path = run_dir / "study_run.json"
    if record_path.exists():
        lines.step(f"train {run.name}", 0, skipped=True)
        return reuse.read_json(record_path)
    started = time.perf_counter()
    with run_log(out, run.name):
        train_run(cfg, lines.enabled)
    record = {**asdict(run), "name": run.name, "valid_accuracy": final_heldout_accuracy(run_dir)}
    atomic.write_json(record_path, record)
    lines.step(f"train {run.name}", time.perf_counter() - started)
    return record


def train_run(cfg, progress: bool) -> None:
    """One run of a grid, resumed if interrupted: TIS-DPO's pipeline (contrast models, scored
    weights, training) for a loss that reads token weights, else `tokenratio train`'s."""
    from tokenratio.losses import LOSSES
    from tokenratio.tisdpo import run_tisdpo
    from tokenratio.trainer import train

    if LOSSES[cfg.loss.name].weights:
        run_tisdpo(cfg, progress=progress)
    else:
        train(cfg, resume=True, progress=progress)


@contextlib.contextmanager
def run_log(out: Path, name: str):
    """What a run prints goes to out/logs/<name>.log, so the study's terminal keeps one line per
    run; its progress bars (stderr) still show there, with their totals and time left."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    with open(out / "logs" / f"{name}.log", "a") as log, contextlib.redirect_stdout(log):
        yield


def final_heldout_accuracy(run_dir: Path) -> float:
    """The last held-out reward accuracy a run logged (its final evaluation)."""
    records = runlog.read(run_dir / runlog.NAME)
    scored = [r["eval_reward_accuracy"] for r in records if "eval_reward_accuracy" in r]
    if not scored:
        raise runlog.RunLogError(
            f"{run_dir / runlog.NAME} has no held-out evaluation: the run did not finish; "
            "remove its study_run.json and rerun the study"
        )
    return scored[-1]


def grid(study) -> list[tuple[str, float]]:
    return [(method, beta) for method in study.methods for beta in study.betas]


def run_study(
    study, base, *, command: str = "", progress: bool = True, overwrite: bool = False
) -> dict:
    """Everything: splits, lr selection, seeds, test evaluation, report; returns the report.
    `command` is recorded in the report as the one that produced it. One study per output
    directory at a time (its lock); results made with other settings are refused, or redone
    with `overwrite` (`reuse.py`)."""
    out = Path(study.output_dir)
    take_lock(out, "study.output_dir")
    try:
        return _run_study(study, base, command, progress, overwrite)
    finally:
        release(out)


def _run_study(study, base, command: str, progress: bool, overwrite: bool) -> dict:
    from tokenratio.study.report import write_report
    from tokenratio.study.splits import make_splits

    quiet_libraries()
    base = resolved_precision(base)
    out = Path(study.output_dir)
    sizes = {"train": study.train_pairs, "valid": study.valid_pairs, "test": study.test_pairs}
    paths = make_splits(base.data.path, sizes, study.split_seed, out / "data")
    first, *rest = study.seeds
    runs_total = len(grid(study)) * (len(study.lrs) + len(rest))
    bar = Progress(runs_total + len(grid(study)) * len(study.seeds) + 1, progress)
    chosen = {}
    for method, beta in grid(study):
        tried = [
            train_and_validate(
                base, study, Run(method, beta, lr, first), paths, out, bar, overwrite
            )
            for lr in study.lrs
        ]
        best = max(tried, key=lambda r: r["valid_accuracy"])  # ties: the first (smallest) lr
        chosen[method, beta] = {"lr": best["lr"], "tried": tried, "runs": [best]}
        for seed in rest:
            run = Run(method, beta, best["lr"], seed)
            chosen[method, beta]["runs"].append(
                train_and_validate(base, study, run, paths, out, bar, overwrite)
            )
    tested = evaluate_on_test(study, base, chosen, paths, out, bar, overwrite)
    return write_report(study, base, chosen, tested, out, command)


def resolved_precision(base):
    """The base config with mixed_precision "auto" resolved for this hardware, as every run's
    config.json and results.json record it (so a rerun compares like with like)."""
    from tokenratio.modeling import runs_on_cpu
    from tokenratio.precision import resolved_config

    return resolved_config(base, runs_on_cpu(base.train))[0]


def quiet_libraries() -> None:
    """Many short loads and tokenizations: the libraries' own progress bars would bury the study's
    one line per step."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


def evaluate_on_test(
    study, base, chosen: dict, paths: dict, out: Path, bar: Progress, overwrite: bool = False
) -> dict:
    """The reference and every chosen run on the test split, with generation and the judge."""
    reference = base.model.name_or_path
    beta0 = study.betas[0]
    tested = {
        "reference": [
            _evaluate_on_test(
                study, base, "reference", reference, reference, beta0, paths, out, bar, overwrite
            )
        ]
    }
    for (method, beta), selection in chosen.items():
        key = f"{method} (beta {beta:g})" if len(study.betas) > 1 else method
        tested[key] = [
            _evaluate_on_test(
                study,
                base,
                r["name"],
                str(out / "runs" / r["name"] / "final"),
                reference,
                beta,
                paths,
                out,
                bar,
                overwrite,
            )
            for r in selection["runs"]
        ]
    return tested


def _evaluate_on_test(
    study, base, name, path, reference, beta, paths, out, bar, overwrite=False
) -> dict:
    started = time.perf_counter()
    target = out / "test" / name
    skipped = (target / "results.json").exists()
    result = evaluate_on_split(
        [(name, path)],
        paths["test"],
        reference,
        beta,
        study.test_pairs,
        study,
        base,
        target,
        overwrite,
        bar.enabled,
    )
    bar.step(f"test {name}", time.perf_counter() - started, skipped)
    return result
