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
"""

import os

FSDP_FLAG = "ACCELERATE_USE_FSDP"


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


def describe(accelerator) -> str:
    """One line for the start of a run: how many processes, under which engine."""
    count = accelerator.num_processes
    engine = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if is_fsdp2(accelerator):
        engine = "FSDP2 (parameters sharded per decoder layer)"
    return f"{count} process{'es' if count > 1 else ''}, {engine}"


def asked_for_fsdp(env=os.environ) -> bool:
    return str(env.get(FSDP_FLAG, "false")).lower() == "true"


def fsdp2_on_cpu(accelerator, env=os.environ) -> None:
    """Where the launch asked for FSDP2 and Accelerate set up a CPU process group (MULTI_CPU),
    turn Accelerate's FSDP2 path on as its GPU branch would. Anything else is left as it is
    (FSDP1 on a CPU is then refused by `step.check_launch`)."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if not asked_for_fsdp(env) or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    if str(env.get("FSDP_VERSION", "1")) != "2":  # Accelerate's default is FSDP1
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
    if shards_models(accelerator):
        return accelerator.prepare_model(module, evaluation_mode=True)
    return module.to(accelerator.device)


def full_state_dict(accelerator, module) -> dict:
    """The prepared module's full weights on the main process (gathered from the shards under
    FSDP and ZeRO-3; every process must call it), as `{name: tensor}` without wrapper prefixes."""
    return accelerator.get_state_dict(module)
