"""The benchmark's second policy class: a tiny transformer LM on the same token-level MDP.

The tabular policy can represent every optimum exactly; a transformer has to generalise across states,
like a real model. Token ids: response tokens 0..V-1, prompt x is the single token V + x. The LM is a
2-layer Llama whose next-token distribution is read on the V response tokens only. It is first
fitted to pi_ref by SFT on responses sampled from pi_ref (the fit is reported as KL(LM || pi_ref)),
then a copy is trained with each loss through the same code a real model uses
(`modeling.batch_token_logps`: response-only LM head, chunked log-probs and KL, the TBPO-Q head), with
the SFT model as the frozen reference (TIS-DPO's contrast models are trained the same way, with DPO
on the pairs and on the flipped pairs). Metrics are estimated by sampling responses from the trained
LM: expected true return, KL(pi || pi_ref), KL(pi || pi*_seq), KL(pi || pi*_tok), each as mean ± 95%
confidence half-width, since log pi(y) is known exactly for every sampled y.
"""

import copy
import math

import torch
from torch import nn

from tokenratio import synthetic
from tokenratio.baseline import StateBaselineHead
from tokenratio.bench import with_contrast_weights
from tokenratio.data import PreferenceBatch
from tokenratio.losses import LOSSES, reduce
from tokenratio.modeling import PolicyWithHead
from tokenratio.scoring import frozen_reference, score_pairs
from tokenratio.tisdpo import batch_contrasts


class ResponseVocabLM(nn.Module):
    """A causal LM whose output distribution is restricted to the V response tokens."""

    def __init__(self, mdp: synthetic.TokenMDP, hidden: int = 64, seed: int = 0):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        self.V = mdp.vocab_size
        config = LlamaConfig(
            vocab_size=mdp.vocab_size + mdp.num_prompts,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=mdp.length + 2,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        self.lm = LlamaForCausalLM(config)

    # PolicyWithHead / response_logits read these attributes of a transformers model.
    @property
    def config(self):
        return self.lm.config

    @property
    def base_model(self):
        return self.lm.model

    def get_output_embeddings(self):
        head = self.lm.get_output_embeddings()
        V = self.V
        return lambda hidden: head(hidden)[..., :V]  # only response tokens can be produced


def _batch(mdp, prompts: torch.Tensor, responses: torch.Tensor) -> PreferenceBatch:
    """Rows [V + x, y_1..y_T] with every response token predicted by the position before it."""
    n, T = responses.shape
    input_ids = torch.cat([(mdp.vocab_size + prompts)[:, None], responses], 1)
    positions = torch.arange(T)[None].expand(n, T)
    return PreferenceBatch(
        input_ids, torch.ones_like(input_ids), positions.contiguous(), responses.clone()
    )


@torch.no_grad()
def sequence_logps(policy: PolicyWithHead, mdp, prompts, responses) -> torch.Tensor:
    logits, _ = policy(_batch(mdp, prompts, responses))
    return logits.log_softmax(-1).gather(-1, responses[..., None]).squeeze(-1).sum(-1)


@torch.no_grad()
def sample(policy: PolicyWithHead, mdp, prompts, generator) -> torch.Tensor:
    """Ancestral sampling, one token at a time (T is tiny)."""
    responses = torch.zeros(len(prompts), 0, dtype=torch.long)
    for _ in range(mdp.length):
        padded = torch.cat([responses, torch.zeros(len(prompts), 1, dtype=torch.long)], 1)
        logits, _ = policy(_batch(mdp, prompts, padded))
        probs = logits[:, responses.shape[1]].softmax(-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        responses = torch.cat([responses, nxt], 1)
    return responses


def fit_reference(mdp, steps: int = 400, batch: int = 512, lr: float = 3e-3, seed: int = 0):
    """SFT on responses sampled from pi_ref; returns the frozen LM reference."""
    policy = PolicyWithHead(ResponseVocabLM(mdp, seed=seed))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        prompts = torch.randint(0, mdp.num_prompts, (batch,), generator=g)
        responses = synthetic.sample_responses(mdp.ref_logps, prompts, g)
        logits, _ = policy(_batch(mdp, prompts, responses))
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, mdp.vocab_size), responses.reshape(-1)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return policy.eval().requires_grad_(False)


def _pairs_batch(mdp, pairs) -> PreferenceBatch:
    chosen = _batch(mdp, pairs.prompts, pairs.chosen)
    rejected = _batch(mdp, pairs.prompts, pairs.rejected)
    batch = PreferenceBatch(
        *(
            torch.cat([getattr(chosen, f), getattr(rejected, f)])
            for f in ("input_ids", "attention_mask", "positions", "labels")
        )
    )
    if pairs.chosen_weight is not None:  # (2B, T) token weights, chosen rows first
        batch.weights = torch.cat([pairs.chosen_weight, pairs.rejected_weight]).float()
    return batch


def contrast_weighted_lm(mdp, reference, beta, pairs, **train_options):
    """TIS-DPO's pipeline on the transformer: pi+ and pi- trained with DPO on the pairs and on the
    flipped pairs, then every pair weighted through the real-model scoring path."""
    positive = train_lm(mdp, reference, "dpo", beta, pairs, **train_options).model
    negative = train_lm(mdp, reference, "dpo", beta, pairs.flipped(), **train_options).model
    _, contrast = next(batch_contrasts(positive, negative, [_pairs_batch(mdp, pairs)]))
    contrast = contrast.double()  # (2N, T)
    N = len(pairs)
    return with_contrast_weights(pairs, contrast[:N], contrast[N:])


def train_lm(
    mdp,
    reference,
    loss: str,
    beta: float,
    pairs,
    steps: int = 150,
    lr: float = 3e-3,
    batch: int = 256,
    seed: int = 0,
) -> PolicyWithHead:
    """A copy of the SFT reference trained with `loss` on sampled pairs (mini-batch AdamW)."""
    needs = LOSSES[loss].needs()
    head = StateBaselineHead(reference.model.config.hidden_size) if needs.baseline else None
    policy = PolicyWithHead(copy.deepcopy(reference.model).requires_grad_(True), head).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(pairs), (batch,), generator=g)
        sub = synthetic.PreferencePairs(
            pairs.prompts[rows],
            pairs.chosen[rows],
            pairs.rejected[rows],
            chosen_weight=None if pairs.chosen_weight is None else pairs.chosen_weight[rows],
            rejected_weight=None if pairs.rejected_weight is None else pairs.rejected_weight[rows],
        )
        tl = score_pairs(
            policy,
            frozen_reference(reference),
            _pairs_batch(mdp, sub),
            needs,
            chunk_elements=1 << 20,
        )
        total = reduce(LOSSES[loss](tl, beta=beta)[0])
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
    return policy.eval()


def sampled_metrics(policy, mdp, beta: float, num_samples: int = 2000, seed: int = 0) -> dict:
    """Return and KLs estimated from samples y ~ pi (mean, 95% half-width)."""
    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, mdp.num_prompts, (num_samples,), generator=g)
    responses = sample(policy, mdp, prompts, g)
    log_pi = sequence_logps(policy, mdp, prompts, responses)
    values = {
        "return": synthetic.sequence_returns(mdp, prompts, responses),
        "kl_ref": log_pi - synthetic.sequence_logps(mdp.ref_logps, prompts, responses),
        "kl_seq": log_pi
        - synthetic.sequence_logps(synthetic.sequence_optimum(mdp, beta), prompts, responses),
        "kl_tok": log_pi
        - synthetic.sequence_logps(synthetic.token_optimum(mdp, beta), prompts, responses),
    }
    return {
        k: (float(v.mean()), 1.96 * float(v.std()) / math.sqrt(len(v))) for k, v in values.items()
    }


def run_lm_bench(
    losses,
    beta: float = 1.0,
    num_pairs: int = 3000,
    seed: int = 0,
    sft_steps: int = 400,
    train_steps: int = 150,
    num_samples: int = 2000,
    progress: bool = True,
) -> dict:
    """SFT reference, then each loss; sampled metrics of every policy (and of the reference)."""
    from tqdm.auto import tqdm

    mdp = synthetic.make_mdp()
    reference = fit_reference(mdp, steps=sft_steps, seed=seed)
    pairs = synthetic.sample_pairs(mdp, num_pairs, seed=seed + 1)
    rows = {"sft-reference": sampled_metrics(reference, mdp, beta, num_samples, seed=seed)}
    for loss in tqdm(losses, desc="bench (transformer)", disable=not progress):
        data = pairs
        if LOSSES[loss].weights:
            data = contrast_weighted_lm(mdp, reference, beta, pairs, steps=train_steps, seed=seed)
        policy = train_lm(mdp, reference, loss, beta, data, steps=train_steps, seed=seed)
        rows[loss] = sampled_metrics(policy, mdp, beta, num_samples, seed=seed)
    return {"beta": beta, "reference_fit_kl": rows["sft-reference"]["kl_ref"], "rows": rows}


def format_lm(result: dict) -> str:
    lines = [
        f"transformer policy, beta {result['beta']:g}; SFT fit KL(LM || pi_ref) = "
        f"{result['reference_fit_kl'][0]:.3f} ± {result['reference_fit_kl'][1]:.3f}",
        f"{'method':>14} " + " ".join(f"{k:>16}" for k in ("return", "kl_ref", "kl_seq", "kl_tok")),
    ]
    for name, metrics in result["rows"].items():
        cells = " ".join(f"{m:>8.3f} ± {h:<5.3f}" for m, h in metrics.values())
        lines.append(f"{name:>14} {cells}")
    return "\n".join(lines)
