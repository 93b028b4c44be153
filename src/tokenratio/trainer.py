"""`tokenratio train`: one explicit training loop on Hugging Face Accelerate.

batch -> policy forward -> reference forward (no grad) -> LOSSES[name] -> reduce -> backward -> step.
The same code runs on CPU, one GPU, and under `accelerate launch` / `torchrun` (DDP, FSDP, ZeRO).
Data order is a seeded permutation per epoch, identical on every process; each process takes every
n-th micro-batch, so N processes with batch b see the same global batches as one process with N*b.
"""

import contextlib
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from tokenratio import checkpoint
from tokenratio.data import collate, load_raw, tokenize_dataset
from tokenratio.losses import LOSSES, NEEDS_BASELINE, NEEDS_WEIGHTS, kl_fields, reduce
from tokenratio.modeling import batch_token_logps, build_models, load_tokenizer, save_final


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, bad setup); the message says what to do."""


def prepare_data(cfg, tokenizer, accelerator):
    """Tokenize train and held-out sets once (main process first, the rest hit the cache)."""
    with accelerator.main_process_first():
        raw = load_raw(cfg.data.path, cfg.data.split, cfg.data.limit)
        data, report = tokenize_dataset(raw, tokenizer, cfg.data)
        if cfg.data.heldout_path:
            heldout_raw = load_raw(cfg.data.heldout_path, cfg.data.split, cfg.data.limit)
            heldout, report["heldout"] = tokenize_dataset(heldout_raw, tokenizer, cfg.data)
        else:
            n_heldout = max(1, int(len(data) * cfg.data.heldout_fraction))
            split = data.train_test_split(test_size=n_heldout, seed=cfg.train.seed, shuffle=True)
            data, heldout = split["train"], split["test"]
    report.update(train_pairs=len(data), heldout_pairs=len(heldout))
    return data, heldout, report


def _loader(dataset, batch_size, pad_id, order=None, drop_last=True):
    subset = dataset if order is None else dataset.select(order)
    return DataLoader(
        subset.with_format(None),
        batch_size=batch_size,
        shuffle=False,
        drop_last=drop_last,
        collate_fn=lambda rows: collate(rows, pad_id),
    )


def _optimizers(cfg, policy):
    head_params = list(policy.head.parameters()) if policy.head is not None else []
    head_ids = {id(p) for p in head_params}
    params = [p for p in policy.parameters() if p.requires_grad and id(p) not in head_ids]
    kind = {"rmsprop": torch.optim.RMSprop, "adamw": torch.optim.AdamW}[cfg.train.optimizer]
    main = kind(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    # The head has its own AdamW (authors' code: lr 1e-3), trained only through the TBPO-Q loss.
    head = torch.optim.AdamW(head_params, lr=cfg.train.head_lr) if head_params else None
    return main, head


def _scheduler(cfg, optimizer, total_steps):
    from transformers import get_scheduler

    name = {"cosine": "cosine", "constant": "constant_with_warmup"}[cfg.train.schedule]
    warmup = math.ceil(cfg.train.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _mean_metrics(accelerator, sums: dict, count: int) -> dict:
    """Average per-pair metric sums over all processes."""
    if not sums:
        return {}
    keys = sorted(sums)
    stacked = torch.stack([sums[k] for k in keys] + [torch.tensor(float(count))]).to(
        accelerator.device
    )
    total = accelerator.reduce(stacked, reduction="sum")
    return {k: float(total[i] / total[-1]) for i, k in enumerate(keys)}


def evaluate(cfg, accelerator, policy, reference, loader, unwrapped) -> dict:
    """Held-out loss and pair metrics (implicit-reward accuracy and margins), all processes."""
    policy.eval()
    sums, count = {}, 0
    options = dict(cfg.loss.options)
    with torch.no_grad():
        for batch in loader:
            tl = batch_token_logps(
                policy,
                reference,
                batch,
                kl=kl_fields(cfg.loss.name, options),
                with_baseline=cfg.loss.name in NEEDS_BASELINE,
                chunk_elements=cfg.train.logprob_chunk_elements,
                unwrapped_policy=unwrapped,
            )
            losses, metrics = LOSSES[cfg.loss.name](tl, beta=cfg.loss.beta, **options)
            for key, value in {"loss": losses, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float().sum().cpu()
            count += losses.shape[0]
    policy.train()
    return {f"eval_{k}": v for k, v in _mean_metrics(accelerator, sums, count).items()}


def train(cfg, *, resume: bool = False, progress: bool = True) -> dict:
    """Run training from a Config; returns the final metrics. Writes into cfg.train.output_dir:
    metrics.jsonl, data_report.json, config.json, checkpoints/step-N/, final/ (from_pretrained-able).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    LOSSES[cfg.loss.name]  # unknown loss: fail before loading anything
    out = Path(cfg.train.output_dir)
    accelerator = Accelerator(
        cpu=cfg.train.cpu or not _has_accelerator(),
        mixed_precision=cfg.train.mixed_precision,
        log_with=list(cfg.train.report_to) or None,
        project_dir=str(out),
    )
    set_seed(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model)
    data, heldout, report = prepare_data(cfg, tokenizer, accelerator)
    if cfg.loss.name in NEEDS_WEIGHTS and "chosen_weight" not in heldout.column_names:
        raise TrainingError(
            f"loss '{cfg.loss.name}' needs per-token weights (chosen_weight/rejected_weight) in "
            "every record of data.path and data.heldout_path: run `tokenratio tisdpo CONFIG`, "
            "which scores the data with two contrastive models and trains on it"
        )
    with_head = cfg.loss.name in NEEDS_BASELINE
    policy, reference = build_models(cfg.model, with_head)
    optimizer, head_optimizer = _optimizers(cfg, policy)

    world, accum, b = accelerator.num_processes, cfg.train.grad_accumulation, cfg.train.batch_size
    steps_per_epoch = len(data) // (b * world * accum)
    if steps_per_epoch == 0:
        raise TrainingError(
            f"{len(data)} training pairs are fewer than one optimizer step of "
            f"{b * world * accum}; lower train.batch_size or grad_accumulation"
        )
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    scheduler = _scheduler(cfg, optimizer, total_steps)
    prepared = accelerator.prepare(policy, optimizer, *([head_optimizer] if head_optimizer else []))
    policy, optimizer = prepared[0], prepared[1]
    head_optimizer = prepared[2] if head_optimizer else None
    accelerator.register_for_checkpointing(scheduler)
    if reference is not None:
        reference = accelerator.prepare_model(reference, evaluation_mode=True)
    unwrapped = accelerator.unwrap_model(policy)
    pad_id = tokenizer.pad_token_id
    heldout_loader = accelerator.prepare_data_loader(
        _loader(heldout, cfg.train.eval_batch_size, pad_id, drop_last=False)
    )

    state = {"step": 0, "epoch": 0, "micro_batch": 0}
    ckpt_root = out / "checkpoints"
    if resume and (found := checkpoint.latest(ckpt_root)):
        state = checkpoint.load(accelerator, found)
        accelerator.print(f"resumed from {found} (step {state['step']})")
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1, default=list))
        (out / "data_report.json").write_text(json.dumps(report, indent=1))
    accelerator.init_trackers("tokenratio", config={"loss": cfg.loss.name, "beta": cfg.loss.beta})
    accelerator.print(f"data: {json.dumps(report)}")

    options = dict(cfg.loss.options)
    kl = kl_fields(cfg.loss.name, options)
    log_path = out / "metrics.jsonl"
    bar = tqdm(
        total=total_steps,
        initial=state["step"],
        desc=f"train {cfg.loss.name}",
        disable=not (progress and accelerator.is_main_process),
    )
    sums, pairs, tokens, started, last = {}, 0, 0, time.perf_counter(), {}
    policy.train()
    while state["step"] < total_steps:
        order = torch.randperm(
            len(data),
            generator=torch.Generator().manual_seed(cfg.train.seed * 1000 + state["epoch"]),
        ).tolist()
        loader = accelerator.prepare_data_loader(_loader(data, b, pad_id, order))
        loader = accelerator.skip_first_batches(loader, state["micro_batch"])
        for batch in loader:
            state["micro_batch"] += 1
            sync = state["micro_batch"] % accum == 0
            with contextlib.nullcontext() if sync else accelerator.no_sync(policy):
                tl = batch_token_logps(
                    policy,
                    reference,
                    batch,
                    kl=kl,
                    with_baseline=with_head,
                    chunk_elements=cfg.train.logprob_chunk_elements,
                    unwrapped_policy=unwrapped,
                )
                losses, metrics = LOSSES[cfg.loss.name](tl, beta=cfg.loss.beta, **options)
                loss = reduce(losses) / accum
                accelerator.backward(loss)
            for key, value in {"loss": losses, **metrics}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float().sum().cpu()
            pairs += losses.shape[0]
            tokens += int(batch.attention_mask.sum())
            if not sync:
                continue
            grad_norm = accelerator.clip_grad_norm_(
                policy.parameters(), cfg.train.max_grad_norm or float("inf")
            )
            if not (torch.isfinite(grad_norm) and torch.isfinite(sums["loss"])):
                # Raised before the update, so no checkpoint ever holds non-finite weights.
                found = checkpoint.latest(ckpt_root)
                raise TrainingError(
                    f"non-finite loss or gradient at step {state['step'] + 1} (loss sum "
                    f"{float(sums['loss'])}, grad norm {float(grad_norm)}); the last good "
                    f"checkpoint is {found or 'none (set train.save_every)'}: resume from it "
                    "with a lower train.lr, or check the data"
                )
            for opt in (optimizer, head_optimizer):
                if opt is not None:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
            scheduler.step()
            state["step"] += 1
            bar.update(1)
            if state["step"] % cfg.train.log_every == 0 or state["step"] == total_steps:
                elapsed = time.perf_counter() - started
                last = {
                    "step": state["step"],
                    "epoch": state["epoch"],
                    "lr": scheduler.get_last_lr()[0],
                    **_mean_metrics(accelerator, sums, pairs),
                    "tokens_per_s": tokens * accelerator.num_processes / elapsed,
                }
                bar.set_postfix(
                    loss=f"{last['loss']:.4f}",
                    acc=f"{last.get('reward_accuracy', float('nan')):.2f}",
                    tok_s=f"{last['tokens_per_s']:.0f}",
                )
                _log(accelerator, log_path, last)
                sums, pairs, tokens, started = {}, 0, 0, time.perf_counter()
            if cfg.train.eval_every and state["step"] % cfg.train.eval_every == 0:
                _log(
                    accelerator,
                    log_path,
                    {
                        "step": state["step"],
                        **evaluate(cfg, accelerator, policy, reference, heldout_loader, unwrapped),
                    },
                )
            if cfg.train.save_every and state["step"] % cfg.train.save_every == 0:
                checkpoint.save(
                    accelerator, ckpt_root, state["step"], state, cfg.train.keep_checkpoints
                )
            if state["step"] >= total_steps:
                break
        else:  # epoch finished: leftover micro-batches (fewer than grad_accumulation) are dropped
            for opt in (optimizer, head_optimizer):
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            state["epoch"] += 1
            state["micro_batch"] = 0
    bar.close()
    final_eval = evaluate(cfg, accelerator, policy, reference, heldout_loader, unwrapped)
    _log(accelerator, log_path, {"step": state["step"], **final_eval})
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final(accelerator.unwrap_model(policy), tokenizer, out / "final")
    accelerator.end_training()
    return {**last, **final_eval, "data": report}


def _has_accelerator() -> bool:
    """Without one, Accelerate must be told `cpu=True`, or torchrun workers run as separate
    single-process jobs instead of one gloo process group."""
    xpu = getattr(torch, "xpu", None)
    return (
        torch.cuda.is_available()
        or torch.backends.mps.is_available()
        or bool(xpu and xpu.is_available())
    )


def _log(accelerator, path: Path, record: dict) -> None:
    accelerator.log(
        {k: v for k, v in record.items() if isinstance(v, int | float)}, step=record.get("step")
    )
    if accelerator.is_main_process:
        with path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
