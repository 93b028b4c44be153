"""The one scoring path: model forward passes -> per-token log-probs -> the loss contract.

Everything that scores pairs or sequences goes through here: the trainer's step, the TRL integration,
the transformer benchmark and the perf harness (`score_pairs`), and eval, explain and TIS-DPO's
token contrasts (`score_batches`, frozen models over a dataset). What a loss needs (reference,
KL mode, baseline head, weights) comes from its registry entry (`losses.Loss.needs`), never from
its name.
"""

from collections.abc import Callable, Iterable, Iterator

import torch

from tokenratio.batch import PreferenceBatch, collate
from tokenratio.logprobs import (
    IGNORE_INDEX,
    sampled_k3,
    token_logps,
    token_logps_and_kl,
    token_logps_at,
)
from tokenratio.losses import Needs, TokenLogps, k3
from tokenratio.modeling import PolicyWithHead, response_logits

Tensor = torch.Tensor
# policy(batch, with_baseline) -> (logits (2B, T, V), baseline (2B, T) or None)
PolicyForward = Callable[[PreferenceBatch, bool], tuple[Tensor, Tensor | None]]
# reference(batch) -> logits (2B, T, V); called under no_grad
ReferenceForward = Callable[[PreferenceBatch], Tensor]


def label_logps_and_kl(logits, ref_logits, labels, *, kl: str | None, chunk_elements: int):
    """Policy and reference log-probs of the labels, and what `kl` asks for in the KL fields.

    With kl = "exact", `ref_logits` is consumed: after the backward it holds the policy's gradient.
    Without a reference (`ref_logits` None) its log-probs are zeros and kl must be None.

    Args:
        logits, ref_logits: (N, T, V) response-aligned logits of the policy and the reference.
        labels: (N, T) response tokens, IGNORE_INDEX beyond the response.
        kl: "exact" (full-vocabulary KL(ref || policy)), "k3" (a one-sample estimate) or None.

    Returns:
        (logps, ref_logps, kl values or None), each (N, T) float32.
    """
    if kl == "exact":  # one sweep over the reference logits gives its log-probs and the KL;
        # the backward builds the policy's gradient in their memory (nothing else reads them).
        logps, kl_values, ref_logps = token_logps_and_kl(
            logits,
            labels,
            ref_logits,
            chunk_elements=chunk_elements,
            return_ref_logps=True,
            consume_ref_logits=True,
        )
        return logps, ref_logps, kl_values
    logps = token_logps(logits, labels, chunk_elements=chunk_elements)
    if ref_logits is None:
        return logps, torch.zeros_like(logps), None
    ref_logps = token_logps(ref_logits, labels, chunk_elements=chunk_elements)
    kl_values = None
    if kl == "k3":
        kl_values = sampled_k3(logits, ref_logits, chunk_elements=chunk_elements)
    return logps, ref_logps, kl_values


def cached_logps_and_kl(logits, batch: PreferenceBatch, *, kl: str | None, chunk_elements: int):
    """Policy log-probs of the labels beside the cache's reference values (no reference
    forward). For k3 the policy's log-prob of each cached token a ~ pi_ref comes from the same
    sweep over the logits, and k3 = (rho - 1) - log rho with rho = pi_theta(a) / pi_ref(a)
    (docs/method.md, TBPO step 2): the same value as `sampled_k3` at those tokens.

    Returns:
        (logps, ref_logps, kl values or None), each (2B, T) float32.
    """
    if kl is None:
        return (
            token_logps(logits, batch.labels, chunk_elements=chunk_elements),
            batch.ref_logps,
            None,
        )
    if kl != "k3" or batch.ref_sample_tokens is None:
        raise ValueError(
            f"a {kl} KL needs the reference at every step, and this batch carries cached "
            "reference values only (reference.plan decides which a run gets)"
        )
    tokens = torch.stack([batch.labels, batch.ref_sample_tokens], -1)  # (2B, T, 2)
    both = token_logps_at(logits, tokens, chunk_elements=chunk_elements)
    return both[..., 0], batch.ref_logps, k3(both[..., 1] - batch.ref_sample_logps)


def split_pairs(
    batch: PreferenceBatch, logps, ref_logps, kl_values=None, baseline=None
) -> TokenLogps:
    """(2B, T) rows, chosen first -> the loss contract's chosen/rejected halves."""
    B = batch.num_pairs

    def halves(x):
        return (None, None) if x is None else (x[:B], x[B:])

    mask = batch.labels != IGNORE_INDEX
    return TokenLogps(
        *halves(logps),
        *halves(ref_logps),
        *halves(mask),
        *halves(kl_values),
        *halves(None if baseline is None else baseline.float()),
        *halves(batch.weights),
    )


def score_pairs(
    policy: PolicyForward,
    reference: ReferenceForward | None,
    batch: PreferenceBatch,
    needs: Needs,
    *,
    chunk_elements: int,
) -> TokenLogps:
    """Policy forward (with grad) and, if the loss needs it, reference forward (without).

    Args:
        policy: the policy's forward, e.g. a (possibly Accelerate-wrapped) PolicyWithHead.
        reference: the reference's forward (`reference.forward`); unused when
            `needs.reference` is False or the batch carries cached `ref_logps`.
        batch: 2B rows, chosen first.
        needs: what the loss needs (`LOSSES[name].needs(options)`).
        chunk_elements: chunk size of the log-prob / KL kernels.
    """
    ref_logits = None
    if needs.reference and batch.ref_logps is None:
        if reference is None:
            raise ValueError(
                "the loss needs the reference's log-probs, but the batch carries none and no "
                "reference was built: with train.ref_cache, batches need their cached values "
                "(reference.CachedValues.fill)"
            )
        # Before the policy's forward: the reference's temporaries come and go on an allocator
        # that holds nothing else yet, instead of leaving holes between the policy's saved
        # activations (on a CPU glibc kept those holes resident: exact TBPO-A's peak RSS grew).
        with torch.no_grad():
            ref_logits = reference(batch)
    logits, baseline = policy(batch, needs.baseline)
    if needs.reference and batch.ref_logps is not None:  # cached: no reference forward at all
        values = cached_logps_and_kl(logits, batch, kl=needs.kl, chunk_elements=chunk_elements)
        return split_pairs(batch, *values, baseline)
    logps, ref_logps, kl_values = label_logps_and_kl(
        logits, ref_logits, batch.labels, kl=needs.kl, chunk_elements=chunk_elements
    )
    return split_pairs(batch, logps, ref_logps, kl_values, baseline)


def batches(rows: list, pad_id: int, batch_size: int, collate_fn=collate) -> Iterator:
    """Collated batches of `batch_size` rows (the last one may be smaller)."""
    for start in range(0, len(rows), batch_size):
        yield collate_fn(
            [rows[i] for i in range(start, min(start + batch_size, len(rows)))], pad_id
        )


@torch.no_grad()
def score_batches(
    models: list,
    batches: Iterable[PreferenceBatch],
    *,
    progress: bool = False,
    desc: str = "",
    total: int | None = None,
) -> Iterator[tuple[PreferenceBatch, list[tuple[Tensor, Tensor]]]]:
    """Frozen models over a dataset: each batch moved to the models' device, and each model's
    response-aligned (logits (N, T, V), hidden (N, T, H)) on it. `total`: the number of batches,
    for the progress bar's time left."""
    from tqdm.auto import tqdm

    device = next(models[0].parameters()).device
    bar = tqdm(batches, desc=desc or "scoring", total=total, disable=not progress, leave=False)
    for batch in bar:
        batch = batch.to(device)
        yield batch, [_response_logits(model, batch) for model in models]


def _response_logits(model, batch: PreferenceBatch):
    """A causal LM's (logits, hidden); a PolicyWithHead's (logits, None) through its own forward,
    where FSDP gathers the shards of a sharded one (the reference's scoring pass under FSDP2;
    under DeepSpeed the PolicyWithHead is its engine's `module`)."""
    if isinstance(getattr(model, "module", model), PolicyWithHead):
        return model(batch)[0], None
    return response_logits(model, batch)


def batch_contrasts(positive, negative, batch_iter, progress: bool = False):
    """Per batch: (batch, (2B, T) log pi+(y_t|s_t) - log pi-(y_t|s_t) of each response token, 0
    beyond the responses); `positive` and `negative` are causal LMs, scored by `score_batches`."""
    scored = score_batches(
        [positive, negative], batch_iter, progress=progress, desc="scoring tokens"
    )
    for batch, ((plus, _), (minus, _)) in scored:
        yield (
            batch,
            token_logps(plus.float(), batch.labels) - token_logps(minus.float(), batch.labels),
        )
