"""The one scoring path: model forward passes -> per-token log-probs -> the loss contract.

Everything that scores pairs or sequences goes through here: the trainer's step, the TRL integration,
the transformer benchmark and the perf harness (`score_pairs`), and eval, explain and TIS-DPO's
token contrasts (`score_batches`, frozen models over a dataset). What a loss needs (reference,
KL mode, baseline head, weights) comes from its registry entry (`losses.Loss.needs`), never from
its name.
"""

from collections.abc import Callable, Iterable, Iterator

import torch

from tokenratio.data import PreferenceBatch, collate
from tokenratio.logprobs import IGNORE_INDEX, sampled_k3, token_logps, token_logps_and_kl
from tokenratio.losses import Needs, TokenLogps
from tokenratio.modeling import response_logits

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
        reference: the reference's forward (`frozen_reference` or `adapter_reference`); unused
            when `needs.reference` is False or the batch carries cached `ref_logps`.
        batch: 2B rows, chosen first.
        needs: what the loss needs (`LOSSES[name].needs(options)`).
        chunk_elements: chunk size of the log-prob / KL kernels.
    """
    logits, baseline = policy(batch, needs.baseline)
    ref_logits = None
    if needs.reference and batch.ref_logps is None:
        if reference is None:
            raise ValueError(
                "the loss needs the reference's log-probs, but the batch carries none and no "
                "reference was built: with train.ref_cache, batches need their cached "
                "ref_logps (trainer.attach_reference_logps)"
            )
        with torch.no_grad():
            ref_logits = reference(batch)
    logps, ref_logps, kl_values = label_logps_and_kl(
        logits, ref_logits, batch.labels, kl=needs.kl, chunk_elements=chunk_elements
    )
    if batch.ref_logps is not None:  # cached (train.ref_cache): no reference forward at all
        ref_logps = batch.ref_logps
    return split_pairs(batch, logps, ref_logps, kl_values, baseline)


def frozen_reference(module) -> ReferenceForward:
    """A frozen PolicyWithHead-like module as the reference forward."""
    return lambda batch: module(batch)[0]


def adapter_reference(policy, unwrapped) -> ReferenceForward:
    """The LoRA policy as its own reference: the same weights with the adapter switched off."""

    def forward(batch):
        with unwrapped.model.disable_adapter():
            return policy(batch)[0]

    return forward


def batches(rows: list, pad_id: int, batch_size: int, collate_fn=collate) -> Iterator:
    """Collated batches of `batch_size` rows (the last one may be smaller)."""
    for start in range(0, len(rows), batch_size):
        yield collate_fn(
            [rows[i] for i in range(start, min(start + batch_size, len(rows)))], pad_id
        )


@torch.no_grad()
def score_batches(
    models: list, batches: Iterable[PreferenceBatch], *, progress: bool = False, desc: str = ""
) -> Iterator[tuple[PreferenceBatch, list[tuple[Tensor, Tensor]]]]:
    """Frozen models over a dataset: each batch moved to the models' device, and each model's
    response-aligned (logits (N, T, V), hidden (N, T, H)) on it."""
    from tqdm.auto import tqdm

    device = next(models[0].parameters()).device
    for batch in tqdm(batches, desc=desc or "scoring", disable=not progress, leave=False):
        batch = batch.to(device)
        yield batch, [response_logits(model, batch) for model in models]


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
