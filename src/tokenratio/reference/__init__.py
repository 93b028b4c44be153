"""The reference model: where a run's reference values come from, decided here and nowhere else.

`plan` says how a run gets them, with the reason in one line:
    "cached"   the batches carry the reference's per-token log-probs (and, for TBPO-A's k3, tokens
               a ~ pi_ref with their log-probs) from the cache (`cache.py`); the step never runs
               the reference, and no reference is built;
    "adapter"  LoRA: the policy with its adapter switched off, run in the step;
    "copy"     a frozen copy of the loaded model, taken before training, run in the step;
    "none"     the loss reads no reference (sft).
`frozen_copy` builds what "copy" needs, `forward` turns the plan into the step's reference
forward, and `cache.load_or_score` scores and reads the cache; `CachedValues.fill` puts its
values into a collated batch. The trainer, scoring and modeling ask this package and decide
nothing about the reference themselves.
"""

import copy
from dataclasses import dataclass

from tokenratio.reference.cache import CacheLocationError, load_or_score, score_rows
from tokenratio.reference.key import RevisionUnknownError, model_identity
from tokenratio.reference.store import CachedValues
from tokenratio.sharding import (
    is_fsdp2,
    shard_frozen,
    shards_models,
    uses_deepspeed,
    zero_partitioned,
)

__all__ = [
    "CacheLocationError",
    "CachedValues",
    "Plan",
    "forward",
    "frozen_copy",
    "load_or_score",
    "module_forward",
    "plan",
    "score_rows",
]


@dataclass(frozen=True)
class Plan:
    """How a run gets its reference values (module docstring)."""

    source: str  # cached | adapter | copy | none
    reason: str  # one line, printed at the start of a run
    samples: int = 0  # k3 tokens per response position the cache holds (cached k3 only)
    identity: str = ""  # the reference by content (key.model_identity), for the cache's key

    @property
    def cached(self) -> bool:
        return self.source == "cached"


def plan(cfg, needs, accelerator=None, identity: str | None = None) -> Plan:
    """How this run gets the reference values its loss needs (`needs`: the loss's Needs).
    `identity` stands for the reference's content (`key.model_identity`, read from its files
    otherwise): the perf harness's random-weight models have no files."""
    if not needs.reference:
        return Plan("none", f"none: {cfg.loss.name} reads no reference")
    live = "adapter" if cfg.model.lora_r > 0 else "copy"
    what = "the policy with its LoRA adapter off" if live == "adapter" else "a frozen copy"
    why_not, identity = _why_not_cached(cfg, needs, accelerator, identity)
    if why_not:
        return Plan(live, f"{what}, run every step: {why_not}")
    samples = cfg.train.k3_samples if needs.kl == "k3" else 0
    held = f" and {samples} k3 token(s) a ~ pi_ref per position" if samples else ""
    return Plan(
        "cached",
        f"cached per-token log-probs{held} (train.ref_cache); the step never runs it",
        samples,
        identity,
    )


def _why_not_cached(cfg, needs, accelerator, identity) -> tuple[str | None, str]:
    """(why the cache cannot serve this run, or None; the reference's identity when it can)."""
    if not cfg.train.ref_cache:
        return "train.ref_cache = false", ""
    if needs.kl == "exact":
        return (
            f"{cfg.loss.name}'s exact KL needs the reference's whole distribution (a k3 "
            "estimator, where the loss has one, reads the cache)",
            "",
        )
    if needs.kl not in (None, "k3"):
        return f"{cfg.loss.name} needs the reference's {needs.kl} at every step", ""
    sharded_pass = accelerator is None or is_fsdp2(accelerator) or uses_deepspeed(accelerator)
    if not sharded_pass and shards_models(accelerator):
        return (
            "the reference is sharded by an engine whose scoring pass would load it whole on "
            "every process (FSDP2's and DeepSpeed's are sharded)",
            "",
        )
    try:
        return None, identity or model_identity(cfg.model)
    except RevisionUnknownError as err:
        return f"{err}, so a cache could not tell its versions apart", ""


def frozen_copy(the_plan: Plan, model, reload=None):
    """The frozen reference plan "copy" runs (a PolicyWithHead without head), taken from `model`
    before it trains; None for every other plan. Weights that ZeRO-3 partitioned as they loaded
    cannot be copied: the reference is then loaded again (`reload`)."""
    if the_plan.source != "copy":
        return None
    from tokenratio.modeling import PolicyWithHead

    source = reload() if zero_partitioned(model) else copy.deepcopy(model)
    return PolicyWithHead(source).eval().requires_grad_(False)


def forward(the_plan: Plan, accelerator, policy, frozen=None):
    """The step's reference forward (batch -> response logits (2B, T, V)), or None when the
    plan runs no reference. `policy`: the prepared policy; `frozen`: `frozen_copy`'s module."""
    if the_plan.source == "copy":
        frozen = shard_frozen(accelerator, frozen)  # under FSDP2 sharded as the policy is

        def run_copy(batch):
            with accelerator.autocast():
                return frozen(batch)[0].float()

        return run_copy
    if the_plan.source == "adapter":
        unwrapped = accelerator.unwrap_model(policy)

        def run_adapter_off(batch):
            with unwrapped.model.disable_adapter():
                return policy(batch)[0]

        return run_adapter_off
    return None


def module_forward(module):
    """A frozen PolicyWithHead-like module as a reference forward (benchmarks and tests)."""
    return lambda batch: module(batch)[0]
