"""A policy's own samples on held-out prompts, scored: each sample's gold reward, its sequence
KL(pi || pi_ref) and the diversity of a prompt's samples.

The KL of a sample y is the exact per-position KL summed along its own positions,
sum_t KL(pi(.|s_t) || pi_ref(.|s_t)) over the full vocabulary: its mean over y ~ pi is exactly
KL(pi(y|x) || pi_ref(y|x)) (the chain rule), with far less variance than the sampled log-ratio
sum_t log pi(y_t|s_t) - log pi_ref(y_t|s_t), which is kept beside it (the estimator DPO's
frontier plots used). tests/frontier/test_evaluate.py checks both against an enumeration.
"""

import torch

from tokenratio.batch import collate_rows
from tokenratio.eval.metrics import distinct_n, predictive_entropy, self_bleu


@torch.no_grad()
def sequence_scores(policy, reference, prompt_ids, responses, pad_id: int) -> list[dict]:
    """Per (prompt ids, response ids): "kl", the exact per-position KL summed along the response,
    "log_ratio", the sampled log-ratio sum, and "entropy", the policy's predictive entropy over
    the response's positions (top-20, as eval's)."""
    rows = list(zip(prompt_ids, responses, strict=True))
    batch = collate_rows([(p, r) if r else (p, [pad_id]) for p, r in rows], pad_id)
    log_p = _response_log_probs(policy, batch)
    log_q = _response_log_probs(reference, batch)
    mask = torch.tensor([[j < len(r) for j in range(batch.labels.shape[1])] for _, r in rows])
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # (N, T)
    labels = batch.labels.clamp_min(0)[..., None]
    ratio = (log_p.gather(-1, labels) - log_q.gather(-1, labels))[..., 0]
    found = []
    for i in range(len(rows)):
        entropy = predictive_entropy(log_p[i], mask[i]) if mask[i].any() else 0.0
        found.append(
            {
                "kl": float((kl[i] * mask[i]).sum()),
                "log_ratio": float((ratio[i] * mask[i]).sum()),
                "entropy": entropy,
            }
        )
    return found


def _response_log_probs(model, batch) -> torch.Tensor:
    """(N, T, V) float32 log-probs of the next token at each response position."""
    device = next(model.parameters()).device
    out = model(
        input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
    )
    positions = batch.positions.to(device)
    logits = out.logits.gather(1, positions[..., None].expand(-1, -1, out.logits.shape[-1]))
    return logits.float().log_softmax(-1).cpu()


def diversity(texts: list[str]) -> dict:
    """A prompt's samples: distinct-1 and distinct-2 (each sample's, averaged) and self-BLEU."""
    return {
        "distinct_1": sum(distinct_n(t, 1) for t in texts) / len(texts),
        "distinct_2": sum(distinct_n(t, 2) for t in texts) / len(texts),
        "self_bleu": self_bleu(texts) if len(texts) > 1 else float("nan"),
    }
