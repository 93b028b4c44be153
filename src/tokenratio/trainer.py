"""`tokenratio train`: one explicit training loop on Hugging Face Accelerate.

The loop calls `step.train_step` (one optimizer step: forward, loss, backward, update) and, on
their cadences, logs, evaluates on the held-out pairs and checkpoints. Its state is one
`LoopState`: the data position a checkpoint saves, and the window of device-side metric sums and
finite flags since it last looked. The same code runs on CPU, one GPU, and under
`accelerate launch` / `torchrun` (DDP; FSDP and ZeRO on GPUs).
Data order is a seeded permutation per epoch, identical on every process; each process takes every
n-th micro-batch, so N processes with batch b see the same global batches as one process with N*b.
"""

import shlex
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch.utils.data import DataLoader

from tokenratio import (
    atomic,
    checkpoint,
    model_card,
    precision,
    reference,
    rundir,
    runlog,
    sharding,
    trunk,
)
from tokenratio.batch import length_grouped_order, pair_lengths
from tokenratio.curves import plot_run
from tokenratio.data import data_line, load_raw, tokenize_dataset
from tokenratio.interrupt import SignalStopError, StopRequest
from tokenratio.intervals import accuracy_interval
from tokenratio.losses import LOSSES, Needs
from tokenratio.modeling import load_tokenizer, runs_on_cpu, save_final
from tokenratio.provenance import SPLITS_NAME, splits_record
from tokenratio.step import (
    NonFiniteStepError,
    StepParts,
    StepResult,
    TrainingError,
    batch_collator,
    check_finite,
    heldout_metrics,
    make_accelerator,
    mean_metrics,
    prepare_step_parts,
    train_step,
)

__all__ = ["LoopState", "SignalStopError", "TrainingError", "prepare_data", "train"]


@dataclass
class LoopState:
    """Where the loop is, and what it has not yet read back from the device.

    `optimizer_steps`, `epoch` and `micro_batches` (consumed in this epoch) are the data position
    a checkpoint saves. The window holds the metric sums and finite flags of the steps since the
    last look: device tensors, read only at log, evaluation and checkpoint time (`check_finite`),
    so a step never waits for the device and no checkpoint holds a non-finite step's weights.
    """

    optimizer_steps: int = 0
    epoch: int = 0
    micro_batches: int = 0
    sums: dict = field(default_factory=dict)
    pairs: int = 0  # in the window
    real_tokens: int = 0  # in the window
    flags: list = field(default_factory=list)  # (optimizer step, device bool)
    window_started: float = field(default_factory=time.perf_counter)

    @classmethod
    def resumed(cls, position: dict) -> "LoopState":
        return cls(position["step"], position["epoch"], position["micro_batch"])

    def position(self) -> dict:
        """What trainer_state.json records (checkpoint.py's format)."""
        return {
            "step": self.optimizer_steps,
            "epoch": self.epoch,
            "micro_batch": self.micro_batches,
        }

    def add(self, result: StepResult, micro_batches: int) -> None:
        """One optimizer step's `train_step` result, its sums kept on the device."""
        self.micro_batches += micro_batches
        self.optimizer_steps += 1
        self.flags.append((self.optimizer_steps, result.finite))
        self.pairs += result.pairs
        self.real_tokens += result.real_tokens
        for key, value in result.sums.items():
            self.sums[key] = self.sums.get(key, 0) + value

    def next_epoch(self) -> None:
        self.epoch += 1
        self.micro_batches = 0

    def check_finite(self, checkpoints: Path) -> None:
        """Before anything reads or saves the weights: were the steps since the last look finite?"""
        flags, self.flags = self.flags, []
        try:
            check_finite(flags)  # one device -> host transfer for the whole window
        except NonFiniteStepError as err:
            found = checkpoint.latest(checkpoints)
            raise TrainingError(
                f"non-finite loss or gradient ({err}); the last good checkpoint is "
                f"{found or 'none (set train.save_every)'}: resume from it with a lower "
                "train.lr, or check the data"
            ) from None

    def take_window(self) -> tuple[dict, int, int, float]:
        """The window's sums, pairs, real tokens and seconds; a new window starts."""
        taken = (self.sums, self.pairs, self.real_tokens)
        seconds = time.perf_counter() - self.window_started
        self.sums, self.pairs, self.real_tokens = {}, 0, 0
        self.window_started = time.perf_counter()
        return (*taken, seconds)


def prepare_data(cfg, tokenizer, accelerator):
    """Tokenize train and held-out sets once (main process first, the rest hit the cache).
    Returns (train pairs, held-out pairs, data report, splits.json's record of both splits)."""
    with accelerator.main_process_first():
        raw = load_raw(cfg.data.path, *_reading(cfg.data))
        data, report = tokenize_dataset(raw, tokenizer, cfg.data)
        if cfg.data.heldout_path:
            heldout_raw = load_raw(cfg.data.heldout_path, *_reading(cfg.data))
            heldout, report["heldout"] = tokenize_dataset(heldout_raw, tokenizer, cfg.data)
        else:
            n_heldout = max(1, int(len(data) * cfg.data.heldout_fraction))
            split = data.train_test_split(test_size=n_heldout, seed=cfg.train.seed, shuffle=True)
            data, heldout = split["train"], split["test"]
    report.update(train_pairs=len(data), heldout_pairs=len(heldout))
    splits = splits_record(cfg, raw, data["record"], heldout["record"])
    return data, heldout, report, splits


def _reading(data_cfg) -> tuple:
    """load_raw's split, limit, on_invalid, format and fields to keep from a DataConfig."""
    keep = (data_cfg.pair_weight_field,) if data_cfg.pair_weight_field else ()
    return data_cfg.split, data_cfg.limit, data_cfg.on_invalid, data_cfg.format, keep


def _loader(dataset, batch_size, collate_batch, order=None, drop_last=True):
    subset = dataset if order is None else dataset.select(order)
    return DataLoader(
        subset.with_format(None),
        batch_size=batch_size,
        shuffle=False,
        drop_last=drop_last,
        collate_fn=collate_batch,
    )


def _total_steps(cfg, num_pairs: int, world: int) -> int:
    per_step = cfg.train.batch_size * world * cfg.train.grad_accumulation
    steps_per_epoch = num_pairs // per_step
    if steps_per_epoch == 0:
        raise TrainingError(
            f"{num_pairs} training pairs are fewer than one optimizer step of "
            f"{per_step}; lower train.batch_size or grad_accumulation"
        )
    return cfg.train.max_steps or steps_per_epoch * cfg.train.epochs


def _with_caches(cfg, parts: StepParts, ref_plan, tokenizer, datasets, progress) -> StepParts:
    """The step with the run's frozen trunk (train.trunk_cache) and cached reference values
    (train.ref_cache): the trunk first, since the reference's scoring pass reads it too."""
    if cfg.train.trunk_cache:
        parts = replace(parts, trunk=trunk.for_run(cfg, parts, tokenizer, datasets, progress))
    if ref_plan.cached:
        values = reference.load_or_score(
            cfg, ref_plan, parts.accelerator, tokenizer, datasets, progress, parts.trunk
        )
        parts = replace(parts, cached_values=values)
    return parts


def _check_weights(cfg, needs: Needs, heldout) -> None:
    if needs.weights and "chosen_weight" not in heldout.column_names:
        raise TrainingError(
            f"loss '{cfg.loss.name}' needs per-token weights (chosen_weight/rejected_weight) in "
            "every record of data.path and data.heldout_path: run `tokenratio tisdpo CONFIG`, "
            "which scores the data with two contrastive models and trains on it"
        )


def _write_run_files(accelerator, out: Path, cfg, report: dict, splits: dict) -> None:
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_json(out / "config.json", asdict(cfg))
        atomic.write_json(out / "data_report.json", report)
        atomic.write_json(out / SPLITS_NAME, splits, indent=None)


def train(
    cfg,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Run training from a Config; returns the final metrics. Writes into cfg.train.output_dir:
    metrics.jsonl, data_report.json, config.json, checkpoints/step-N/, final/ (from_pretrained-able,
    with a model card naming `command`, the command line that ran it; published complete or not
    at all). The directory's rules are rundir.py's: a directory holding
    a run needs `resume` or `overwrite`; a finished run resumed does nothing.
    """
    needs = LOSSES[cfg.loss.name].needs(cfg.loss.options)  # bad name/options: fail before loading
    _check_trackers(cfg.train.report_to)
    cfg, chosen = precision.resolved_config(cfg, runs_on_cpu(cfg.train))
    out = Path(cfg.train.output_dir)
    plan = rundir.inspect(out, cfg, resume=resume, overwrite=overwrite)  # before anything loads
    if plan.action == "finished":
        print(plan.note)
        return {**_last_evaluation(out), "finished_before": True}
    accelerator = make_accelerator(cfg, out)
    accelerator.wait_for_everyone()  # every process has inspected before the main one changes out
    if accelerator.is_main_process:
        rundir.claim(out, plan)
    try:
        return _train(cfg, accelerator, needs, plan, progress, chosen, command)
    finally:
        if accelerator.is_main_process:
            rundir.release(out)


def _train(
    cfg,
    accelerator,
    needs: Needs,
    plan: rundir.Plan,
    progress: bool,
    chosen: precision.Precision,
    command: str | None,
) -> dict:
    from accelerate.utils import set_seed

    out = Path(cfg.train.output_dir)
    if plan.note:
        accelerator.print(plan.note)
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    data, heldout, report, splits = prepare_data(cfg, tokenizer, accelerator)
    _check_weights(cfg, needs, heldout)
    ref_plan = reference.plan(cfg, needs, accelerator)
    accelerator.print(f"launch: {sharding.describe(accelerator)}")
    accelerator.print(f"precision: {chosen.describe()}")
    accelerator.print(f"reference: {ref_plan.reason}")
    total_steps = _total_steps(cfg, len(data), accelerator.num_processes)
    parts = prepare_step_parts(cfg, accelerator, total_steps, plan=ref_plan)
    parts = _with_caches(cfg, parts, ref_plan, tokenizer, (data, heldout), progress)
    state = _start_state(cfg, parts, plan, total_steps)
    _write_run_files(accelerator, out, cfg, report, splits)
    accelerator.init_trackers("tokenratio", config={"loss": cfg.loss.name, "beta": cfg.loss.beta})
    accelerator.print(f"data: {data_line(report)} (details: {out / 'data_report.json'})")
    pad_id = tokenizer.pad_token_id
    heldout_loader = accelerator.prepare_data_loader(
        _loader(
            heldout, cfg.train.eval_batch_size, batch_collator(cfg, parts, pad_id), drop_last=False
        )
    )
    if cfg.train.eval_every and state.optimizer_steps == 0:  # the curves start at the reference
        _log(accelerator, out / runlog.NAME, {"step": 0, **heldout_metrics(parts, heldout_loader)})
    started = time.perf_counter()
    with StopRequest(say=accelerator.print) as stop:
        try:
            last = _loop(
                cfg, parts, data, heldout_loader, pad_id, state, total_steps, progress, stop
            )
        except SignalStopError as err:  # the one line says how to continue
            raise SignalStopError(
                f"{err}; continue with: {_resumed(command)}", err.signal_name
            ) from None
    final_eval = heldout_metrics(parts, heldout_loader)
    n = state.optimizer_steps
    if _last_evaluation(out).get("step") != n:  # resumed after logging it: not twice
        _log(accelerator, out / runlog.NAME, {"step": n, **final_eval})
    accelerator.wait_for_everyone()
    gathered = None  # a sharded policy's full weights, gathered by every process for the main one
    if sharding.shards_models(accelerator):
        gathered = sharding.full_state_dict(accelerator, parts.policy)
    if accelerator.is_main_process:
        policy = accelerator.unwrap_model(parts.policy)
        card = _model_card(cfg, final_eval, len(heldout), command)
        try:
            save_final(policy, tokenizer, out / "final", cfg.train.save_merged, gathered, card)
        except WRITE_ERRORS as err:  # final.tmp/ is never published half-written
            raise TrainingError(
                f"could not write {out / 'final'} ({_reason(err)}); the last good checkpoint is "
                f"{checkpoint.latest(out / 'checkpoints') or 'none'}: free some space and run "
                "again with --resume"
            ) from None
    _draw_curves(accelerator, cfg)
    # Every process tears the group down together: a process that destroyed it while the main one
    # still wrote final/ aborted once at exit under gloo ("terminate called without an active
    # exception", tests/test_sharded.py's resumed run).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    seconds = time.perf_counter() - started
    return {**last, **final_eval, "data": report, "seconds": seconds, "step": n}


def _model_card(cfg, final_eval: dict, heldout_pairs: int, command: str | None) -> str:
    accuracy = final_eval.get("eval_reward_accuracy")
    interval = None if accuracy is None else accuracy_interval(accuracy, heldout_pairs)
    metrics = {**final_eval, "heldout_pairs": heldout_pairs}
    return model_card.render(cfg, metrics, interval, command)


def _resumed(command: str | None) -> str:
    """The command that continues a stopped run: its own with --resume (a study, which calls
    train without one, resumes its runs when run again)."""
    if not command:
        return "the same command (it resumes its runs)"
    words = [w for w in shlex.split(command) if w != "--resume"]
    return shlex.join([*words, "--resume"])


def _start_state(cfg, parts: StepParts, plan: rundir.Plan, total_steps: int) -> LoopState:
    """Step 0, or the resumed checkpoint's position with its scheduler and the configured lr."""
    if plan.action != "resume":
        return LoopState()
    accelerator = parts.accelerator
    position = checkpoint.load(
        accelerator, plan.checkpoint, parts.scheduler, total_steps, _launch(cfg, accelerator)
    )
    _set_learning_rates(parts, cfg)
    changed = f"; applied {plan.changes}" if plan.changes else ""
    accelerator.print(f"resumed from {plan.checkpoint} (step {position['step']}){changed}")
    return LoopState.resumed(position)


def _launch(cfg, accelerator) -> dict:
    """What a checkpoint's data position means: processes, engine, global batch (pairs a step)."""
    processes = accelerator.num_processes
    return {
        "processes": processes,
        "engine": sharding.engine(accelerator),
        "global_batch": cfg.train.batch_size * processes * cfg.train.grad_accumulation,
    }


def _check_trackers(names) -> None:
    """A requested tracker that is not installed is an error now, not a warning after loading."""
    import importlib.util

    for name in names:
        if name not in ("tensorboard", "wandb"):
            raise TrainingError(f"train.report_to: unknown tracker {name!r} (tensorboard or wandb)")
        if importlib.util.find_spec(name) is None:
            raise TrainingError(
                f"train.report_to asks for {name}, which is not installed: "
                f"pip install 'tokenratio[{name}]', or remove it from train.report_to"
            )


def _set_learning_rates(parts: StepParts, cfg) -> None:
    """After a resume: the configured peak lr at the schedule's restored position (a changed
    train.lr or train.head_lr takes effect here; an unchanged one is left as it was)."""
    scheduler = parts.scheduler
    scheduler.base_lrs = [cfg.train.lr for _ in scheduler.base_lrs]
    groups = parts.optimizers[0].param_groups
    factors = [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
    for group, factor in zip(groups, factors, strict=True):
        group["initial_lr"], group["lr"] = cfg.train.lr, cfg.train.lr * factor
    scheduler._last_lr = [group["lr"] for group in groups]
    for group in parts.optimizers[1].param_groups if len(parts.optimizers) > 1 else ():
        group["lr"] = cfg.train.head_lr


def _last_evaluation(out: Path) -> dict:
    """The final held-out metrics a finished run logged, and its step."""
    return runlog.last_evaluation(out / runlog.NAME)


def _epoch_batches(cfg, parts: StepParts, data, pad_id, state: LoopState):
    """This epoch's micro-batches, grouped into optimizer steps, from the resume position on."""
    seed = cfg.train.seed * 1000 + state.epoch
    if cfg.train.group_by_length:
        lengths = pair_lengths(data, shared=cfg.train.prefix_sharing)
        order = length_grouped_order(lengths, cfg.train.batch_size, seed)
    else:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    collate_batch = batch_collator(cfg, parts, pad_id, state.epoch)
    loader = parts.accelerator.prepare_data_loader(
        _loader(data, cfg.train.batch_size, collate_batch, order)
    )
    loader = parts.accelerator.skip_first_batches(loader, state.micro_batches)
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == cfg.train.grad_accumulation:
            yield group
            group = []
    # leftover micro-batches (fewer than grad_accumulation) at the epoch's end are dropped


def _loop(
    cfg, parts: StepParts, data, heldout_loader, pad_id, state, total_steps, progress, stop
) -> dict:
    """Optimizer steps until total_steps; logs, evaluates and checkpoints on their cadences, and
    stops at a step boundary with a checkpoint when `stop` (a StopRequest) was signalled."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=state.optimizer_steps,
        desc=f"train {cfg.loss.name}",
        disable=not (progress and parts.accelerator.is_main_process),
    )
    last = {}
    parts.policy.train()
    while state.optimizer_steps < total_steps:
        for group in _epoch_batches(cfg, parts, data, pad_id, state):
            state.add(train_step(parts, group), len(group))  # queued: nothing read back yet
            bar.update(1)
            last = _on_cadence(cfg, parts, heldout_loader, state, total_steps, bar) or last
            if state.optimizer_steps >= total_steps:
                break
            if stop.requested(parts.accelerator):
                bar.close()
                _stop_with_checkpoint(cfg, parts, state, total_steps, stop.signal_name)
        else:
            state.next_epoch()
    bar.close()
    state.check_finite(Path(cfg.train.output_dir) / "checkpoints")  # syncs: the last window
    return last


def _on_cadence(cfg, parts: StepParts, heldout_loader, state, total_steps, bar) -> dict | None:
    """Log, evaluate and checkpoint when this optimizer step is on their cadences; returns the
    logged record, if any."""
    out, n = Path(cfg.train.output_dir), state.optimizer_steps
    evaluating = cfg.train.eval_every and n % cfg.train.eval_every == 0 and n < total_steps
    saving = cfg.train.save_every and n % cfg.train.save_every == 0
    logging = n % cfg.train.log_every == 0 or n == total_steps
    if logging or evaluating or saving:
        state.check_finite(out / "checkpoints")  # syncs: reads the window's finite flags
    record = _log_window(parts, state, bar, out) if logging else None
    # the final evaluation runs after the loop: not twice when total_steps is on the cadence
    if evaluating:  # syncs: the held-out metrics are read to be logged
        _log(
            parts.accelerator,
            out / runlog.NAME,
            {"step": n, **heldout_metrics(parts, heldout_loader)},
        )
        _draw_curves(parts.accelerator, cfg)
    if saving:
        _save_checkpoint(cfg, parts, state, out / "checkpoints")
    return record


def _log_window(parts: StepParts, state: LoopState, bar, out: Path) -> dict:
    """The window's mean metrics and throughput, logged (syncs: the sums are read here)."""
    accelerator = parts.accelerator
    sums, pairs, tokens, elapsed = state.take_window()
    record = {
        "step": state.optimizer_steps,
        "epoch": state.epoch,
        "lr": parts.scheduler.get_last_lr()[0],
        **mean_metrics(accelerator, sums, pairs),
        "tokens_per_s": tokens * accelerator.num_processes / elapsed,
        "tokens": tokens * accelerator.num_processes,  # real tokens since the last record
        "seconds": elapsed,
    }
    bar.set_postfix(
        loss=f"{record['loss']:.4f}",
        acc=f"{record.get('reward_accuracy', float('nan')):.2f}",
        tok_s=f"{record['tokens_per_s']:.0f}",
    )
    _log(accelerator, out / runlog.NAME, record)
    return record


def _save_checkpoint(cfg, parts: StepParts, state: LoopState, root: Path) -> None:
    """A full disk (or any write error) stops the run with one line naming the last good
    checkpoint; the half-written one never replaces it (checkpoint.save renames only when done)."""
    n = state.optimizer_steps
    try:
        checkpoint.save(
            parts.accelerator,
            root,
            n,
            {**state.position(), "launch": _launch(cfg, parts.accelerator)},
            cfg.train.keep_checkpoints,
            parts.scheduler,
        )
    except WRITE_ERRORS as err:
        raise TrainingError(
            f"could not write the checkpoint of step {n} ({_reason(err)}); the "
            f"last good checkpoint is {checkpoint.latest(root) or 'none'}: free some space and "
            "run again with --resume"
        ) from None


# What a failed write raises: OSError, safetensors' own error, and torch's serializer's
# RuntimeError ("basic_ios::clear: iostream error" on a full disk).
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def _reason(err: Exception) -> str:
    """A write error in a few words: the OS's, else the first line of the library's."""
    lines = str(err).strip().splitlines()
    return getattr(err, "strerror", None) or (lines[0] if lines else type(err).__name__)


def _stop_with_checkpoint(cfg, parts, state: LoopState, total_steps: int, signal_name) -> None:
    """A checkpoint at this step (unless its cadence just wrote one), then SignalStopError, whose
    one line says the step, the checkpoint and the command that resumes."""
    root = Path(cfg.train.output_dir) / "checkpoints"
    n = state.optimizer_steps
    state.check_finite(root)
    saved = checkpoint.latest(root)
    if saved is None or saved != checkpoint.checkpoint_dir(root, n):
        _save_checkpoint(cfg, parts, state, root)
    raise SignalStopError(
        f"stopped by {signal_name or 'a signal on another process'} at step {n} of "
        f"{total_steps}; checkpoint: {checkpoint.checkpoint_dir(root, n)}",
        signal_name or "SIGTERM",
    )


def _draw_curves(accelerator, cfg) -> None:
    if accelerator.is_main_process:
        out = Path(cfg.train.output_dir)
        plot_run(out / "metrics.jsonl", out / "curves.png", f"{cfg.loss.name} in {out}")


def _log(accelerator, path: Path, record: dict) -> None:
    accelerator.log(
        {k: v for k, v in record.items() if isinstance(v, int | float)}, step=record.get("step")
    )
    if accelerator.is_main_process:
        runlog.append(path, record)
