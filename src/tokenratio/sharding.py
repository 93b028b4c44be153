"""Sharded engines (FSDP, DeepSpeed ZeRO) under Accelerate: which one a run has, FSDP2 on a CPU
process group, the frozen reference sharded like the policy, and the full weights gathered back.

Accelerate 1.15 turns FSDP on only for GPU-type distributed types (`AcceleratorState`'s
MULTI_GPU branch); on a CPU process group it drops the plugin and wraps the model in DDP without a
word. FSDP2's `fully_shard` itself runs on CPUs over gloo, so where a launch asks for FSDP2 on a
CPU group, `fsdp2_on_cpu` sets Accelerate's state as that branch would (the plugin from the
launch's FSDP_* variables, its precision, the distributed type). From there on every step is
Accelerate's own FSDP2 path, as on GPUs: `prepare` shards the policy per decoder layer
(`fsdp2_prepare_model`), `save_state` writes DCP shards, `get_state_dict` gathers the full weights.
That is how tests/test_sharded.py trains under FSDP2 on a CPU (docs/training.md, "Scale-out").

DeepSpeed likewise: Accelerate runs it only on GPU backends, and DeepSpeed itself runs ZeRO on
CPUs (`DS_ACCELERATOR=cpu`, gloo, a torch optimizer). `deepspeed_on_cpu` selects the launch's
DeepSpeedPlugin as Accelerate's GPU branch does, and from there `prepare` builds the policy's
DeepSpeed engine, `save_state` writes its ZeRO checkpoint and `get_state_dict` gathers the full
weights (`zero3_save_16bit_model`). `step.train_step` drives the engine itself: Accelerate's
`backward` would step it after every micro-batch.
"""

import math
import os

FSDP_FLAG = "ACCELERATE_USE_FSDP"
DEEPSPEED_FLAG = "ACCELERATE_USE_DEEPSPEED"


def shards_models(accelerator) -> bool:
    """Does this run shard its models' parameters over the processes (FSDP, ZeRO, Megatron)?"""
    from accelerate.utils import DistributedType

    sharding = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    return accelerator.distributed_type in sharding


def is_fsdp2(accelerator) -> bool:
    return bool(getattr(accelerator, "is_fsdp2", False))


def zero_stage(accelerator) -> int:
    """DeepSpeed's ZeRO stage in this run (0 when DeepSpeed does not run it)."""
    plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
    return int(getattr(plugin, "zero_stage", 0) or 0) if shards_models(accelerator) else 0


# Accelerate's distributed types, in words for the run's `launch:` line.
IN_WORDS = {
    "NO": "no distributed engine",
    "MULTI_CPU": "DDP over CPU processes (gloo)",
    "MULTI_GPU": "DDP over GPUs",
    "MULTI_XPU": "DDP over XPUs",
    "MULTI_NPU": "DDP over NPUs",
    "MULTI_MLU": "DDP over MLUs",
    "MULTI_HPU": "DDP over HPUs",
    "FSDP": "FSDP (parameters sharded)",
    "XLA": "XLA",
}


def engine(accelerator) -> str:
    """The engine this run is under, in words (a checkpoint records it too)."""
    if is_fsdp2(accelerator):
        return "FSDP2 (parameters sharded per decoder layer)"
    if uses_deepspeed(accelerator):
        stage = zero_stage(accelerator)
        return f"DeepSpeed ZeRO-{stage}" + (" (parameters partitioned)" if stage == 3 else "")
    given = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    return IN_WORDS.get(given, given)


def describe(accelerator) -> str:
    """One line for the start of a run: how many processes, under which engine, in words."""
    count = accelerator.num_processes
    return f"{count} process{'es' if count > 1 else ''}, {engine(accelerator)}"


def asked_for_fsdp(env=os.environ) -> bool:
    return str(env.get(FSDP_FLAG, "false")).lower() == "true"


def fsdp_version(env=os.environ) -> str:
    """The FSDP version a launch asks for (FSDP_VERSION; Accelerate's default is FSDP1)."""
    return str(env.get("FSDP_VERSION", "1"))


def asked_for_deepspeed(env=os.environ) -> bool:
    return str(env.get(DEEPSPEED_FLAG, "false")).lower() == "true"


def uses_deepspeed(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def deepspeed_on_cpu(accelerator, env=os.environ) -> None:
    """Where the launch asked for DeepSpeed and Accelerate set up a CPU process group
    (MULTI_CPU), turn Accelerate's DeepSpeed path on as its GPU branch would: the plugin from
    the launch's ACCELERATE_DEEPSPEED_* variables, selected (which also tells transformers to
    partition ZeRO-3 weights at load), and the distributed type. DeepSpeed's CPU accelerator
    must be chosen before DeepSpeed first asks for one (`step.make_accelerator` sets it)."""
    from accelerate.state import PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    if not asked_for_deepspeed(env) or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = DeepSpeedPlugin()  # reads the launch's ACCELERATE_DEEPSPEED_* variables
    state = accelerator.state
    plugin.set_mixed_precision(state.mixed_precision)
    plugin.select(_from_accelerator_state=True)
    state.deepspeed_plugins = plugin
    state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED  # as Accelerate does


def configure_deepspeed(accelerator, micro_batch: int, max_grad_norm: float) -> None:
    """The run's own settings into DeepSpeed's config before `prepare`: the micro-batch, one
    micro-batch per engine step (the step marks the accumulation boundary itself, and divides
    the loss by its micro-batches, so the engine must not divide again) and train.max_grad_norm
    (DeepSpeed clips inside its step; 0 is no clipping there)."""
    if not uses_deepspeed(accelerator):
        return
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["train_batch_size"] = micro_batch * accelerator.num_processes
    config["gradient_accumulation_steps"] = 1
    config["gradient_clipping"] = max_grad_norm if math.isfinite(max_grad_norm) else 0.0


def zero_partitioned(model) -> bool:
    """Were `model`'s weights partitioned as they loaded (ZeRO-3's zero.Init, which Accelerate's
    plugin asks transformers for)? Such a model cannot be deep-copied into a reference."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def fsdp2_on_cpu(accelerator, env=os.environ) -> None:
    """Where the launch asked for FSDP2 and Accelerate set up a CPU process group (MULTI_CPU),
    turn Accelerate's FSDP2 path on as its GPU branch would. Anything else is left as it is
    (FSDP1 on a CPU is then refused by `step.check_launch`)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not asked_for_fsdp(env) or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    if fsdp_version(env) != "2":
        return
    plugin = FullyShardedDataParallelPlugin()  # reads the launch's FSDP_* variables
    state = accelerator.state
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # as Accelerate does


def shard_frozen(accelerator, module):
    """A frozen module (the reference: a PolicyWithHead without head) placed for this run: under
    FSDP2 sharded per decoder layer exactly as the policy is (`fsdp2_prepare_model`: evaluation
    mode of `prepare_model` would keep it whole on every process); otherwise Accelerate's
    evaluation-mode preparation (device and precision)."""
    if is_fsdp2(accelerator):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, module).eval()
    if uses_deepspeed(accelerator):
        return _frozen_engine(accelerator, module)
    if shards_models(accelerator):
        return accelerator.prepare_model(module, evaluation_mode=True)
    return module.to(accelerator.device)


def _frozen_engine(accelerator, module):
    """The frozen module in its own DeepSpeed engine, without optimizer (as TRL prepares its
    reference): partitioned over the processes under ZeRO-3, whole on each (stage 0) under
    ZeRO-1/2, which shard no parameters. Not one of Accelerate's models, so no checkpoint holds
    it. Called after the policy's `prepare`, whose config it copies."""
    import copy

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    if config["zero_optimization"]["stage"] != 3:
        config["zero_optimization"]["stage"] = 0
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()  # DeepSpeedEngine.eval returns None, not the engine
    return engine


def full_state_dict(accelerator, module) -> dict:
    """The prepared module's full weights on the main process (gathered from the shards under
    FSDP and ZeRO-3; every process must call it), as `{name: tensor}` without wrapper prefixes."""
    return accelerator.get_state_dict(module)
