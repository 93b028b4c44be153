"""`tokenratio train`: one explicit training loop on Hugging Face Accelerate.

batch -> policy forward -> reference forward (no grad) -> LOSSES[name] -> reduce -> backward -> step.
The optimizer step is one function, `train_step`, which `tokenratio perf` times as it is.
The same code runs on CPU, one GPU, and under `accelerate launch` / `torchrun` (DDP, FSDP, ZeRO).
Data order is a seeded permutation per epoch, identical on every process; each process takes every
n-th micro-batch, so N processes with batch b see the same global batches as one process with N*b.
"""

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tokenratio import checkpoint, reference, rundir, runlog
from tokenratio.curves import plot_run
from tokenratio.data import (
    collate,
    collate_shared,
    length_grouped_order,
    load_raw,
    pair_lengths,
    tokenize_dataset,
)
from tokenratio.losses import LOSSES, Loss, Needs, reduce
from tokenratio.modeling import (
    build_policy,
    has_accelerator,
    load_causal_lm,
    load_tokenizer,
    save_final,
    unwrap_peft,
)
from tokenratio.provenance import SPLITS_NAME, splits_record
from tokenratio.scoring import score_pairs


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, bad setup); the message says what to do."""


class NonFiniteStepError(TrainingError):
    """A non-finite loss or gradient, caught before the update."""


@dataclass
class Step:
    """Everything one optimizer step touches (built once by `prepare_step`)."""

    accelerator: object
    policy: object  # the Accelerate-prepared PolicyWithHead
    reference: object  # a ReferenceForward (`reference.forward`), or None when none runs
    optimizers: tuple  # the policy's optimizer, and the TBPO-Q head's when there is one
    scheduler: object
    loss: Loss
    options: dict
    needs: Needs
    beta: float
    chunk_elements: int
    max_grad_norm: float
    reference_plan: reference.Plan
    cached_values: reference.CachedValues | None = None  # what `reference_plan` "cached" reads


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
    """load_raw's split, limit, on_invalid and format from a DataConfig."""
    return data_cfg.split, data_cfg.limit, data_cfg.on_invalid, data_cfg.format


def collate_fn(cfg):
    """The batch layout cfg.train.prefix_sharing asks for (both give the same logits)."""
    return collate_shared if cfg.train.prefix_sharing else collate


def _loader(dataset, batch_size, collate_batch, order=None, drop_last=True):
    subset = dataset if order is None else dataset.select(order)
    return DataLoader(
        subset.with_format(None),
        batch_size=batch_size,
        shuffle=False,
        drop_last=drop_last,
        collate_fn=collate_batch,
    )


def batch_collator(cfg, step: "Step", pad_id: int, epoch: int = 0):
    """rows -> the PreferenceBatch the step reads: the configured layout, with the cached
    reference values of epoch `epoch` when the run reads them."""
    collate_pairs, values = collate_fn(cfg), step.cached_values
    if values is None:
        return lambda rows: collate_pairs(rows, pad_id)
    return lambda rows: values.fill(collate_pairs(rows, pad_id), rows, epoch)


def _fused(kind) -> dict:
    """AdamW's fused kernel: one kernel for all parameters, and its step counts stay on the
    device, so the update reads nothing back (the foreach one reads each count with .item())."""
    return {"fused": True} if kind is torch.optim.AdamW else {}


def _optimizers(cfg, policy):
    head_params = list(policy.head.parameters()) if policy.head is not None else []
    head_ids = {id(p) for p in head_params}
    params = [p for p in policy.parameters() if p.requires_grad and id(p) not in head_ids]
    kind = {"rmsprop": torch.optim.RMSprop, "adamw": torch.optim.AdamW}[cfg.train.optimizer]
    main = kind(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, **_fused(kind))
    # The head has its own AdamW (authors' code: lr 1e-3), trained only through the TBPO-Q loss.
    head = torch.optim.AdamW(head_params, lr=cfg.train.head_lr, fused=True) if head_params else None
    return main, head


def _scheduler(cfg, optimizer, total_steps):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "constant": "constant_with_warmup"}[cfg.train.schedule]
    warmup = math.ceil(cfg.train.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def prepare_step(
    cfg, accelerator, total_steps: int, model=None, plan=None, cached_values=None
) -> Step:
    """Models, optimizers and scheduler for `cfg`, prepared by Accelerate (`model`: skip loading).

    The reference is `plan`'s (default `reference.plan(...)`): with a cached plan none is built
    and the batches carry its values (`cached_values`, from `reference.load_or_score`). With
    train.compile the transformer body is compiled in place (its parameter names, and so
    checkpoints, stay as they are)."""
    loss = LOSSES[cfg.loss.name]
    needs = loss.needs(cfg.loss.options)
    plan = plan or reference.plan(cfg, needs, accelerator)
    model = load_causal_lm(cfg.model) if model is None else model
    frozen = reference.frozen_copy(plan, model)
    policy = build_policy(cfg.model, needs, model)
    if cfg.train.compile:
        unwrap_peft(policy.model).base_model.compile(dynamic=True)
    optimizer, head_optimizer = _optimizers(cfg, policy)
    scheduler = _scheduler(cfg, optimizer, total_steps)
    optimizers = (optimizer, head_optimizer) if head_optimizer else (optimizer,)
    policy, *optimizers = accelerator.prepare(policy, *optimizers)
    return Step(
        accelerator,
        policy,
        reference.forward(plan, accelerator, policy, frozen),
        tuple(optimizers),
        scheduler,
        loss,
        dict(cfg.loss.options),
        needs,
        cfg.loss.beta,
        cfg.train.logprob_chunk_elements,
        cfg.train.max_grad_norm or float("inf"),
        plan,
        cached_values,
    )


def _add_metrics(sums: dict, losses, metrics) -> None:
    """Per-pair sums, kept on the device: read only when logging."""
    for key, value in {"loss": losses, **metrics}.items():
        sums[key] = sums.get(key, 0.0) + value.detach().float().sum()


def step_losses(step: Step, batch):
    """Per-pair losses (B,) and metrics of one batch, through the one scoring path."""
    token_logps = score_pairs(
        step.policy, step.reference, batch, step.needs, chunk_elements=step.chunk_elements
    )
    return step.loss(token_logps, beta=step.beta, **step.options)


def train_step(step: Step, micro_batches: list) -> dict:
    """One optimizer step over `micro_batches` (gradient accumulation): forward, loss, backward,
    clip, update, without waiting for the device: nothing here reads a tensor's value.

    Returns:
        the per-pair metric sums (device tensors), "pairs" and "real_tokens" (ints counted on
        the CPU when collated) and "finite" (a device bool: were the loss and the gradient
        finite). The caller reads "finite" (`check_finite`) before it logs, evaluates or saves,
        so no checkpoint ever holds the weights of a non-finite step.
    """
    accelerator, policy = step.accelerator, step.policy
    sums = {}
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(policy):
            losses, metrics = step_losses(step, batch)
            accelerator.backward(reduce(losses) / len(micro_batches))
        _add_metrics(sums, losses, metrics)
    grad_norm = accelerator.clip_grad_norm_(policy.parameters(), step.max_grad_norm)
    # A device flag, read with the metrics (`check_finite`), never here: reading it would make
    # every step wait for the device.
    finite = torch.isfinite(grad_norm) & torch.isfinite(sums["loss"])
    for optimizer in step.optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    step.scheduler.step()
    sums["pairs"] = sum(b.num_pairs for b in micro_batches)
    sums["real_tokens"] = sum(b.real_tokens for b in micro_batches)
    sums["finite"] = finite
    return sums


def check_finite(flags: list) -> None:
    """Raise NonFiniteStepError naming the first step whose loss or gradient was not finite.

    Args:
        flags: (step number, device bool from `train_step`) of the steps since the last check;
            read here, at log, evaluation and checkpoint time, in one transfer.
    """
    if not flags:
        return
    ok = torch.stack([flag for _, flag in flags]).cpu()
    if not bool(ok.all()):
        first = flags[int((~ok).nonzero()[0])][0]
        raise NonFiniteStepError(f"first at step {first}")


def evaluate(step: Step, loader) -> dict:
    """Held-out loss and pair metrics (implicit-reward accuracy and margins), all processes."""
    step.policy.eval()
    sums, count = {}, 0
    with torch.no_grad():
        for batch in loader:
            losses, metrics = step_losses(step, batch)
            _add_metrics(sums, losses, metrics)
            count += losses.shape[0]
    step.policy.train()
    return {f"eval_{k}": v for k, v in _mean_metrics(step.accelerator, sums, count).items()}


def _mean_metrics(accelerator, sums: dict, count: int) -> dict:
    """Average per-pair metric sums over all processes."""
    if not sums:
        return {}
    keys = sorted(sums)
    device = accelerator.device
    values = [torch.as_tensor(sums[k], device=device) for k in keys]
    stacked = torch.stack([*values, torch.tensor(float(count), device=device)])
    total = accelerator.reduce(stacked, reduction="sum")
    return {k: float(total[i] / total[-1]) for i, k in enumerate(keys)}


def make_accelerator(cfg, out: Path | None = None):
    from accelerate import Accelerator

    return Accelerator(
        cpu=cfg.train.cpu or not has_accelerator(),
        mixed_precision=cfg.train.mixed_precision,
        log_with=list(cfg.train.report_to) or None,
        project_dir=None if out is None else str(out),
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
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=list))
        (out / "data_report.json").write_text(json.dumps(report, indent=1))
        (out / SPLITS_NAME).write_text(json.dumps(splits))


def train(cfg, *, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """Run training from a Config; returns the final metrics. Writes into cfg.train.output_dir:
    metrics.jsonl, data_report.json, config.json, checkpoints/step-N/, final/ (from_pretrained-able,
    published complete or not at all). The directory's rules are rundir.py's: a directory holding
    a run needs `resume` or `overwrite`; a finished run resumed does nothing.
    """
    needs = LOSSES[cfg.loss.name].needs(cfg.loss.options)  # bad name/options: fail before loading
    _check_trackers(cfg.train.report_to)
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
        return _train(cfg, accelerator, needs, plan, progress)
    finally:
        if accelerator.is_main_process:
            rundir.release(out)


def _train(cfg, accelerator, needs: Needs, plan: rundir.Plan, progress: bool) -> dict:
    from accelerate.utils import set_seed

    out = Path(cfg.train.output_dir)
    if plan.note:
        accelerator.print(plan.note)
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    data, heldout, report, splits = prepare_data(cfg, tokenizer, accelerator)
    _check_weights(cfg, needs, heldout)
    ref_plan = reference.plan(cfg, needs, accelerator)
    accelerator.print(f"reference: {ref_plan.reason}")
    values = None
    if ref_plan.cached:
        values = reference.load_or_score(
            cfg, ref_plan, accelerator, tokenizer, (data, heldout), progress=progress
        )
    total_steps = _total_steps(cfg, len(data), accelerator.num_processes)
    step = prepare_step(cfg, accelerator, total_steps, plan=ref_plan, cached_values=values)
    state = {"step": 0, "epoch": 0, "micro_batch": 0}
    if plan.action == "resume":
        state = checkpoint.load(accelerator, plan.checkpoint, step.scheduler, total_steps)
        _set_learning_rates(step, cfg)
        changed = f"; applied {plan.changes}" if plan.changes else ""
        accelerator.print(f"resumed from {plan.checkpoint} (step {state['step']}){changed}")
    _write_run_files(accelerator, out, cfg, report, splits)
    accelerator.init_trackers("tokenratio", config={"loss": cfg.loss.name, "beta": cfg.loss.beta})
    accelerator.print(f"data: {json.dumps(report)}")
    pad_id = tokenizer.pad_token_id
    heldout_loader = accelerator.prepare_data_loader(
        _loader(
            heldout, cfg.train.eval_batch_size, batch_collator(cfg, step, pad_id), drop_last=False
        )
    )
    started = time.perf_counter()
    last = _loop(cfg, step, data, heldout_loader, pad_id, state, total_steps, progress)
    final_eval = evaluate(step, heldout_loader)
    if _last_evaluation(out).get("step") != state["step"]:  # resumed after logging it: not twice
        _log(accelerator, out / "metrics.jsonl", {"step": state["step"], **final_eval})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final(accelerator.unwrap_model(step.policy), tokenizer, out / "final")
    _draw_curves(accelerator, cfg)
    accelerator.end_training()
    seconds = time.perf_counter() - started
    return {**last, **final_eval, "data": report, "seconds": seconds, "step": state["step"]}


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


def _set_learning_rates(step: Step, cfg) -> None:
    """After a resume: the configured peak lr at the schedule's restored position (a changed
    train.lr or train.head_lr takes effect here; an unchanged one is left as it was)."""
    scheduler = step.scheduler
    scheduler.base_lrs = [cfg.train.lr for _ in scheduler.base_lrs]
    groups = step.optimizers[0].param_groups
    factors = [f(scheduler.last_epoch) for f in scheduler.lr_lambdas]
    for group, factor in zip(groups, factors, strict=True):
        group["initial_lr"], group["lr"] = cfg.train.lr, cfg.train.lr * factor
    scheduler._last_lr = [group["lr"] for group in groups]
    for group in step.optimizers[1].param_groups if len(step.optimizers) > 1 else ():
        group["lr"] = cfg.train.head_lr


def _last_evaluation(out: Path) -> dict:
    """The final held-out metrics a finished run logged, and its step."""
    return runlog.last_evaluation(out / runlog.NAME)


def _epoch_batches(cfg, step: Step, data, pad_id, state):
    """This epoch's micro-batches, grouped into optimizer steps, from the resume position on."""
    seed = cfg.train.seed * 1000 + state["epoch"]
    if cfg.train.group_by_length:
        lengths = pair_lengths(data, shared=cfg.train.prefix_sharing)
        order = length_grouped_order(lengths, cfg.train.batch_size, seed)
    else:
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
    collate_batch = batch_collator(cfg, step, pad_id, state["epoch"])
    loader = step.accelerator.prepare_data_loader(
        _loader(data, cfg.train.batch_size, collate_batch, order)
    )
    loader = step.accelerator.skip_first_batches(loader, state["micro_batch"])
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == cfg.train.grad_accumulation:
            yield group
            group = []
    # leftover micro-batches (fewer than grad_accumulation) at the epoch's end are dropped


def _loop(cfg, step: Step, data, heldout_loader, pad_id, state, total_steps, progress) -> dict:
    """Optimizer steps until total_steps; logs, evaluates and checkpoints on their cadences."""
    from tqdm.auto import tqdm

    accelerator, out = step.accelerator, Path(cfg.train.output_dir)
    bar = tqdm(
        total=total_steps,
        initial=state["step"],
        desc=f"train {cfg.loss.name}",
        disable=not (progress and accelerator.is_main_process),
    )
    window = {"sums": {}, "flags": [], "started": time.perf_counter()}
    last = {}
    step.policy.train()
    while state["step"] < total_steps:
        for group in _epoch_batches(cfg, step, data, pad_id, state):
            _run_step(step, group, state, window)
            bar.update(1)
            last = _after_step(cfg, step, heldout_loader, state, total_steps, window, bar) or last
            if state["step"] >= total_steps:
                break
        else:
            state["epoch"] += 1
            state["micro_batch"] = 0
    bar.close()
    _check_window(window, out / "checkpoints")
    return last


def _run_step(step: Step, group, state, window: dict) -> None:
    """One optimizer step; its metric sums stay on the device in `window` until log time."""
    sums = train_step(step, group)
    state["micro_batch"] += len(group)
    state["step"] += 1
    window["flags"].append((state["step"], sums.pop("finite")))
    for key, value in sums.items():
        window["sums"][key] = window["sums"].get(key, 0) + value


def _check_window(window: dict, ckpt_root: Path) -> None:
    """Before anything reads or saves the weights: were the steps since the last check finite?"""
    flags, window["flags"] = window["flags"], []
    try:
        check_finite(flags)
    except NonFiniteStepError as err:
        found = checkpoint.latest(ckpt_root)
        raise TrainingError(
            f"non-finite loss or gradient ({err}); the last good checkpoint is "
            f"{found or 'none (set train.save_every)'}: resume from it with a lower train.lr, "
            "or check the data"
        ) from None


def _after_step(cfg, step: Step, heldout_loader, state, total_steps, window, bar) -> dict | None:
    """Log, evaluate and checkpoint on their cadences; returns the logged record, if any."""
    accelerator, out, n = step.accelerator, Path(cfg.train.output_dir), state["step"]
    record = None
    evaluating = cfg.train.eval_every and n % cfg.train.eval_every == 0 and n < total_steps
    saving = cfg.train.save_every and n % cfg.train.save_every == 0
    logging = n % cfg.train.log_every == 0 or n == total_steps
    if logging or evaluating or saving:
        _check_window(window, out / "checkpoints")
    if logging:
        sums = dict(window["sums"])
        pairs, tokens = sums.pop("pairs"), sums.pop("real_tokens")
        elapsed = time.perf_counter() - window["started"]
        record = {
            "step": n,
            "epoch": state["epoch"],
            "lr": step.scheduler.get_last_lr()[0],
            **_mean_metrics(accelerator, sums, pairs),
            "tokens_per_s": tokens * accelerator.num_processes / elapsed,
            "tokens": tokens * accelerator.num_processes,  # real tokens since the last record
            "seconds": elapsed,
        }
        bar.set_postfix(
            loss=f"{record['loss']:.4f}",
            acc=f"{record.get('reward_accuracy', float('nan')):.2f}",
            tok_s=f"{record['tokens_per_s']:.0f}",
        )
        _log(accelerator, out / "metrics.jsonl", record)
        window.update(sums={}, started=time.perf_counter())
    # the final evaluation runs after the loop: not twice when total_steps is on the cadence
    if evaluating:
        _log(accelerator, out / "metrics.jsonl", {"step": n, **evaluate(step, heldout_loader)})
        _draw_curves(accelerator, cfg)
    if saving:
        _save_checkpoint(cfg, step, state, out / "checkpoints")
    return record


def _save_checkpoint(cfg, step: Step, state: dict, root: Path) -> None:
    """A full disk (or any write error) stops the run with one line naming the last good
    checkpoint; the half-written one never replaces it (checkpoint.save renames only when done)."""
    try:
        checkpoint.save(
            step.accelerator, root, state["step"], state, cfg.train.keep_checkpoints, step.scheduler
        )
    except OSError as err:
        raise TrainingError(
            f"could not write the checkpoint of step {state['step']} ({err.strerror or err}); the "
            f"last good checkpoint is {checkpoint.latest(root) or 'none'}: free some space and "
            "run again with --resume"
        ) from None


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
