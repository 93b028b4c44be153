"""One optimizer step, the function everything that trains calls: `tokenratio train`'s loop,
`tokenratio perf` (which times it as it is), the study and the tests.

    batch -> policy forward -> reference forward or cached values -> LOSSES[name] -> reduce
          -> backward -> clip -> update

`prepare_step_parts` builds what a step touches (`StepParts`: models, optimizers, scheduler, the
loss) once, through Accelerate; `train_step` runs one optimizer step over its micro-batches without
reading any tensor back from the device; `heldout_metrics` averages a loader's pair metrics over
every process.
"""

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenratio import precision, reference, sharding
from tokenratio.batch import collate, collate_shared
from tokenratio.losses import LOSSES, Loss, Needs, reduce
from tokenratio.modeling import build_policy, load_causal_lm, runs_on_cpu, unwrap_peft
from tokenratio.scoring import score_pairs


class TrainingError(RuntimeError):
    """The run cannot go on (non-finite loss, bad setup); the message says what to do."""


class NonFiniteStepError(TrainingError):
    """A non-finite loss or gradient, caught before the update."""


@dataclass(frozen=True)
class StepParts:
    """Everything one optimizer step touches (built by `prepare_step_parts`; the run's caches
    are added with `dataclasses.replace`, never by mutation)."""

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
    trunk: object = None  # a trunk.TrunkCache (train.trunk_cache), or None: the whole model runs


def collate_fn(cfg):
    """The batch layout cfg.train.prefix_sharing asks for (both give the same logits)."""
    return collate_shared if cfg.train.prefix_sharing else collate


def batch_collator(cfg, parts: StepParts, pad_id: int, epoch: int = 0):
    """rows -> the PreferenceBatch the step reads: the configured layout, with the frozen
    trunk's states and the cached reference values of epoch `epoch` when the run reads them."""
    collate_pairs, values, trunk = collate_fn(cfg), parts.cached_values, parts.trunk

    def collate_batch(rows):
        batch = collate_pairs(rows, pad_id)
        if trunk is not None:
            batch = trunk.fill(batch, rows)
        return batch if values is None else values.fill(batch, rows, epoch)

    return collate_batch


def _fused(kind) -> dict:
    """AdamW's fused kernel: one kernel for all parameters, and its step counts stay on the
    device, so the update reads nothing back (the foreach one reads each count with .item())."""
    return {"fused": True} if kind is torch.optim.AdamW else {}


def _optimizers(cfg, policy, one: bool = False):
    """The policy's optimizer, and the TBPO-Q head's (its own AdamW: authors' code, lr 1e-3,
    trained only through the TBPO-Q loss). `one` (sharded runs: Accelerate's FSDP saves one
    optimizer per model) puts the head into a second param group of the policy's AdamW, with the
    same settings its own would have: the same updates."""
    head_params = list(policy.head.parameters()) if policy.head is not None else []
    head_ids = {id(p) for p in head_params}
    params = [p for p in policy.parameters() if p.requires_grad and id(p) not in head_ids]
    kind = {"rmsprop": torch.optim.RMSprop, "adamw": torch.optim.AdamW}[cfg.train.optimizer]
    head_group = {"params": head_params, "lr": cfg.train.head_lr, "weight_decay": HEAD_DECAY}
    if one and head_params:
        groups = [{"params": params, "weight_decay": cfg.train.weight_decay}, head_group]
        return torch.optim.AdamW(groups, lr=cfg.train.lr, **_fused(kind)), None
    main = kind(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, **_fused(kind))
    head = torch.optim.AdamW([head_group], fused=True) if head_params else None
    return main, head


HEAD_DECAY = 0.01  # torch's AdamW default, which the head's own optimizer has always had


def _scheduler(cfg, optimizer, total_steps):
    """The configured schedule for the policy's parameters; a second param group (the TBPO-Q
    head's, in sharded runs) keeps its lr, as the head's own optimizer does."""
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_scheduler

    name = {"cosine": "cosine", "constant": "constant_with_warmup"}[cfg.train.schedule]
    warmup = math.ceil(cfg.train.warmup_ratio * total_steps)
    scheduler = get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    if len(optimizer.param_groups) == 1:
        return scheduler
    return LambdaLR(optimizer, [scheduler.lr_lambdas[0], _constant])


def _constant(step: int) -> float:
    return 1.0


def prepare_step_parts(
    cfg, accelerator, total_steps: int, model=None, plan=None, cached_values=None
) -> StepParts:
    """Models, optimizers and scheduler for `cfg`, prepared by Accelerate (`model`: skip loading).

    The reference is `plan`'s (default `reference.plan(...)`): with a cached plan none is built
    and the batches carry its values (`cached_values`, from `reference.load_or_score`). With
    train.compile the transformer body is compiled in place (its parameter names, and so
    checkpoints, stay as they are)."""
    loss = LOSSES[cfg.loss.name]
    needs = loss.needs(cfg.loss.options)
    plan = plan or reference.plan(cfg, needs, accelerator)
    model = load_causal_lm(cfg.model) if model is None else model
    frozen = reference.frozen_copy(plan, model, lambda: load_causal_lm(cfg.model))
    policy = build_policy(cfg.model, needs, model)
    for module in (policy, frozen) if frozen is not None else (policy,):
        module.use_head_settings(cfg.train)
    if cfg.train.compile:
        unwrap_peft(policy.model).base_model.compile(dynamic=True)
    optimizer, head_optimizer = _optimizers(cfg, policy, sharding.shards_models(accelerator))
    sharding.configure_deepspeed(accelerator, cfg.train.batch_size, cfg.train.max_grad_norm)
    scheduler = _scheduler(cfg, optimizer, total_steps)
    optimizers = (optimizer, head_optimizer) if head_optimizer else (optimizer,)
    policy, *optimizers = accelerator.prepare(policy, *optimizers)
    return StepParts(
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


def step_losses(parts: StepParts, batch):
    """Per-pair losses (B,) and metrics of one batch, through the one scoring path."""
    token_logps = score_pairs(
        parts.policy, parts.reference, batch, parts.needs, chunk_elements=parts.chunk_elements
    )
    return parts.loss(token_logps, beta=parts.beta, **parts.options)


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step reports. `sums`: the per-pair metric sums (device tensors);
    `pairs` and `real_tokens`: counted on the CPU when collated; `finite`: a device bool, were
    the loss and the gradient finite. The caller reads `finite` (`check_finite`) before it logs,
    evaluates or saves, so no checkpoint ever holds the weights of a non-finite step."""

    sums: dict
    pairs: int
    real_tokens: int
    finite: torch.Tensor


def train_step(parts: StepParts, micro_batches: list) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation): forward, loss, backward,
    clip, update, without waiting for the device: nothing here reads a tensor's value."""
    accelerator, policy = parts.accelerator, parts.policy
    engine = policy if sharding.uses_deepspeed(accelerator) else None
    sums = {}
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(policy):
            losses, metrics = step_losses(parts, batch)
            loss = reduce(losses, weights=batch.pair_weights) / len(micro_batches)
            _backward(accelerator, engine, loss, last)
        _add_metrics(sums, losses, metrics)
    grad_norm = _clip_and_update(parts, engine)
    # A device flag, read with the metrics (`check_finite`), never here: reading it would make
    # every step wait for the device.
    finite = torch.isfinite(grad_norm) & torch.isfinite(sums["loss"])
    parts.scheduler.step()
    return StepResult(
        sums,
        pairs=sum(b.num_pairs for b in micro_batches),
        real_tokens=sum(b.real_tokens for b in micro_batches),
        finite=finite,
    )


def _backward(accelerator, engine, loss, last: bool) -> None:
    """Accelerate's backward; a DeepSpeed engine is told where the accumulation ends itself
    (Accelerate would mark every micro-batch a boundary) and divides by nothing (its config
    counts one micro-batch per step: `sharding.configure_deepspeed`)."""
    if engine is None:
        accelerator.backward(loss)
        return
    engine.set_gradient_accumulation_boundary(is_boundary=last)
    engine.backward(loss)


def _clip_and_update(parts: StepParts, engine):
    """Clip and update; the gradient norm before clipping, a device tensor. A DeepSpeed engine
    clips and updates in its own step (the norm is its record of it), so a non-finite step is
    caught only after its update: the trainer still stops before that step is saved."""
    if engine is not None:
        engine.step()
        norm = engine.get_global_grad_norm()  # None without ZeRO (stage 0): the loss is checked
        return torch.as_tensor(0.0 if norm is None else norm, dtype=torch.float32)
    grad_norm = parts.accelerator.clip_grad_norm_(parts.policy.parameters(), parts.max_grad_norm)
    for optimizer in parts.optimizers:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return grad_norm


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


def heldout_metrics(parts: StepParts, loader) -> dict:
    """Held-out loss and pair metrics (implicit-reward accuracy and margins) over every held-out
    pair once: each batch's per-pair values are gathered from all processes with Accelerate's
    `gather_for_metrics`, which drops the pairs a prepared loader repeats to even out the last
    batch (counted, they would bias a multi-process evaluation)."""
    accelerator = parts.accelerator
    parts.policy.eval()
    sums, count = {}, 0
    with torch.no_grad():
        for batch in loader:
            losses, metrics = step_losses(parts, batch)
            every = accelerator.gather_for_metrics({"loss": losses, **metrics})
            count += every["loss"].shape[0]
            _add_metrics(sums, every.pop("loss"), every)
    parts.policy.train()
    return {f"eval_{k}": float(v) / count for k, v in sorted(sums.items())} if count else {}


def mean_metrics(accelerator, sums: dict, count: int) -> dict:
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
    """The run's Accelerator, checked against what the launch asked for (`check_launch`); FSDP2
    asked for on a CPU process group is given (`sharding.fsdp2_on_cpu`)."""
    import os

    from accelerate import Accelerator

    cpu = runs_on_cpu(cfg.train)
    mixed_precision = precision.resolve(cfg.train.mixed_precision, cpu).mode  # "auto" resolved
    _forget_other_precision(mixed_precision)
    if cpu:  # before DeepSpeed (imported by Accelerate and transformers where installed) looks
        # for an accelerator: it would warn "Setting accelerator to CPU" on every run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    version = sharding.fsdp_version()
    if cpu and sharding.asked_for_fsdp() and version != "2":  # Accelerate would raise on it
        raise TrainingError(
            f"the launch asked for FSDP version {version} ({sharding.FSDP_FLAG}=true) on a CPU: "
            f"{ON_A_CPU['FSDP']}"
        )
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=mixed_precision,
        log_with=list(cfg.train.report_to) or None,
        project_dir=None if out is None else str(out),
    )
    sharding.fsdp2_on_cpu(accelerator)
    sharding.deepspeed_on_cpu(accelerator)
    check_launch(os.environ, str(accelerator.distributed_type), accelerator.num_processes)
    check_sharded(cfg, accelerator)
    return accelerator


def _forget_other_precision(mixed_precision: str) -> None:
    """Accelerate keeps one process-wide state and refuses an Accelerator whose precision differs
    from an earlier one's; a single process that trains twice (a study whose runs follow another
    training, a notebook) may ask for another. Only there is the old state dropped: a process
    group's state stays as it is."""
    from accelerate.state import AcceleratorState, PartialState

    if not AcceleratorState._shared_state or PartialState().num_processes > 1:
        return
    if str(AcceleratorState().mixed_precision) != mixed_precision:
        AcceleratorState._reset_state()


ENGINES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DEEPSPEED"}
ON_A_CPU = {  # what to do when a CPU launch asked for an engine it could not get
    "FSDP": "on a CPU only FSDP2 runs (fsdp_version: 2 in the launch file, as "
    "configs/accelerate/fsdp.yaml has it), over a process group of 2 or more",
    "DEEPSPEED": "DeepSpeed runs over the process group a DeepSpeed launch file starts "
    "(accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml)",
}


def check_launch(env, distributed_type: str, num_processes: int) -> None:
    """Stop before any model loads when the launch asked for an engine (FSDP, DeepSpeed) that
    Accelerate did not give, or started several processes that did not form one group: Accelerate
    1.15 drops an FSDP or DeepSpeed plugin on a CPU without a word (the model then trains under
    DDP, or each process alone), which would be a different run than the one asked for. (FSDP2
    on a CPU group is given by `sharding.fsdp2_on_cpu` before this check.)"""
    given = distributed_type.rsplit(".", 1)[-1]
    for variable, engine in ENGINES.items():
        if str(env.get(variable, "false")).lower() == "true" and given != engine:
            raise TrainingError(
                f"the launch asked for {engine} ({variable}=true) but Accelerate set up {given} "
                f"with {num_processes} process(es): {ON_A_CPU[engine]}"
            )
    world = int(env.get("WORLD_SIZE", "1") or 1)
    if world > 1 and num_processes != world:
        raise TrainingError(
            f"the launch started {world} processes (WORLD_SIZE={world}) but Accelerate sees "
            f"{num_processes} in its group ({given}): each would train alone. On a CPU set "
            "train.cpu = true (or launch with torchrun / `accelerate launch --cpu`)"
        )


def check_sharded(cfg, accelerator) -> None:
    """What a sharded run (FSDP, ZeRO) cannot do yet, refused before any model loads."""
    if not sharding.shards_models(accelerator):
        return
    engine = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if cfg.model.lora_r > 0:
        raise TrainingError(
            f"LoRA under {engine} is not supported: shard full fine-tuning (model.lora_r = 0, as "
            "configs/accelerate/fsdp.yaml says), or train LoRA data-parallel "
            "(configs/accelerate/ddp.yaml), where the frozen base stays whole"
        )
    if cfg.train.fused_head and sharding.zero_stage(accelerator) == 3:
        raise TrainingError(
            "DeepSpeed ZeRO-3 gathers a parameter only inside its module's forward, and the fused "
            "head reads the LM head's weight without calling it: set train.fused_head = false "
            "under ZeRO-3 (the logits are then built whole), or shard with FSDP2"
        )
    if LOSSES[cfg.loss.name].needs(cfg.loss.options).baseline and cfg.train.optimizer != "adamw":
        raise TrainingError(
            f"{cfg.loss.name}'s head shares the policy's optimizer under {engine} (Accelerate "
            f"saves one optimizer per sharded model): set train.optimizer = adamw, not "
            f"{cfg.train.optimizer}"
        )
