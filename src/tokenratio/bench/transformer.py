"""The benchmark's second policy class: a tiny transformer LM on the same token-level MDP.

The tabular policy can represent every optimum exactly; a transformer has to generalise across states,
like a real model. Token ids: response tokens 0..V-1, prompt x is the single token V + x. The LM is a
2-layer Llama whose next-token distribution is read on the V response tokens only. It is first
fitted to pi_ref by SFT on responses sampled from pi_ref (the fit is reported as KL(LM || pi_ref)),
then a copy is trained with each loss through the same code a real model uses
(`scoring.score_pairs`: response-only LM head, chunked log-probs and KL, the TBPO-Q head), with
the SFT model as the frozen reference (TIS-DPO's contrast models are trained the same way, with DPO
on the pairs and on the flipped pairs). Metrics are estimated by sampling responses from the trained
LM: expected true return, KL(pi || pi_ref), KL(pi || pi*_seq), KL(pi || pi*_tok), each as mean ± 95%
confidence half-width, since log pi(y) is known exactly for every sampled y.
"""

import copy
import math

import torch
from torch import nn

from tokenratio.baseline import StateBaselineHead
from tokenratio.batch import PreferenceBatch
from tokenratio.bench import task
from tokenratio.bench.report import format_table, write_report
from tokenratio.bench.tabular import resolve, with_contrast_weights
from tokenratio.logprobs import token_logps
from tokenratio.losses import reduce
from tokenratio.modeling import PolicyWithHead
from tokenratio.reference import module_forward
from tokenratio.scoring import batch_contrasts, score_pairs


class ResponseVocabLM(nn.Module):
    """A causal LM whose output distribution is restricted to the V response tokens."""

    def __init__(self, mdp: task.TokenMDP, hidden: int = 64, seed: int = 0):
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
        return _FirstRows(self.lm.get_output_embeddings(), self.V)


class _FirstRows(nn.Module):
    """The LM head cut to its first V rows: only response tokens can be produced (the fused head
    reads `weight` and `bias`; the unfused path calls it)."""

    bias = None

    def __init__(self, head: nn.Linear, rows: int):
        super().__init__()
        self.head, self.rows = head, rows

    @property
    def weight(self) -> torch.Tensor:
        return self.head.weight[: self.rows]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)[..., : self.rows]


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
    return token_logps(logits, responses).sum(-1)


@torch.no_grad()
def sample(policy: PolicyWithHead, mdp, prompts, generator) -> torch.Tensor:
    """Ancestral sampling, one token at a time (T is tiny)."""
    responses = torch.zeros(len(prompts), 0, dtype=torch.long)
    for _ in range(mdp.length):
        padded = torch.cat([responses, torch.zeros(len(prompts), 1, dtype=torch.long)], 1)
        logits, _ = policy(_batch(mdp, prompts, padded))
        rows = logits[:, responses.shape[1]]  # a few rows: materialised for multinomial
        probs = (rows.materialize() if hasattr(rows, "materialize") else rows).softmax(-1)
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
        responses = task.sample_responses(mdp.ref_logps, prompts, g)
        logits, _ = policy(_batch(mdp, prompts, responses))
        loss = -token_logps(logits, responses).mean()  # cross-entropy
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
    options: dict | None = None,
) -> PolicyWithHead:
    """A copy of the SFT reference trained with `loss` (and its `options`) on sampled pairs
    (mini-batch AdamW)."""
    entry, options = resolve(loss, options)
    needs = entry.needs(options)
    head = StateBaselineHead(reference.model.config.hidden_size) if needs.baseline else None
    policy = PolicyWithHead(copy.deepcopy(reference.model).requires_grad_(True), head).train()
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(pairs), (batch,), generator=g)
        sub = task.PreferencePairs(
            pairs.prompts[rows],
            pairs.chosen[rows],
            pairs.rejected[rows],
            chosen_weight=None if pairs.chosen_weight is None else pairs.chosen_weight[rows],
            rejected_weight=None if pairs.rejected_weight is None else pairs.rejected_weight[rows],
        )
        tl = score_pairs(
            policy,
            module_forward(reference),
            _pairs_batch(mdp, sub),
            needs,
            chunk_elements=1 << 20,
        )
        total = reduce(entry(tl, beta=beta, **options)[0])
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
        "return": task.sequence_returns(mdp, prompts, responses),
        "kl_ref": log_pi - task.sequence_logps(mdp.ref_logps, prompts, responses),
        "kl_seq": log_pi
        - task.sequence_logps(task.sequence_optimum(mdp, beta), prompts, responses),
        "kl_tok": log_pi - task.sequence_logps(task.token_optimum(mdp, beta), prompts, responses),
    }
    return {
        k: (float(v.mean()), 1.96 * float(v.std()) / math.sqrt(len(v))) for k, v in values.items()
    }


def run_transformer(
    losses,
    beta: float = 1.0,
    num_pairs: int = 3000,
    seed: int = 0,
    sft_steps: int = 400,
    train_steps: int = 150,
    num_samples: int = 2000,
    progress: bool = True,
    loss_options: dict | None = None,
    out=None,
) -> dict:
    """SFT reference, then each loss (with its options from `loss_options`); sampled metrics of
    every policy and of the reference. With `out`, writes transformer.json and transformer.txt."""
    from tqdm.auto import tqdm

    loss_options = loss_options or {}
    mdp = task.make_mdp()
    reference = fit_reference(mdp, steps=sft_steps, seed=seed)
    pairs = task.sample_pairs(mdp, num_pairs, seed=seed + 1)
    rows = {"sft-reference": sampled_metrics(reference, mdp, beta, num_samples, seed=seed)}
    for loss in tqdm(losses, desc="bench (transformer)", disable=not progress):
        data = pairs
        if resolve(loss)[0].weights:
            data = contrast_weighted_lm(mdp, reference, beta, pairs, steps=train_steps, seed=seed)
        options = loss_options.get(loss, {})
        policy = train_lm(mdp, reference, loss, beta, data, train_steps, seed=seed, options=options)
        rows[loss] = sampled_metrics(policy, mdp, beta, num_samples, seed=seed)
    result = {"beta": beta, "reference_fit_kl": rows["sft-reference"]["kl_ref"], "rows": rows}
    if out is not None:
        write_report(out, "transformer", result, format_transformer(result))
    return result


def format_transformer(result: dict) -> str:
    """Sampled metrics per method, mean±95% half-width, under a line on the SFT fit."""
    fit_kl = result["reference_fit_kl"]
    title = (
        f"transformer policy, beta {result['beta']:g}; SFT fit KL(LM || pi_ref) = "
        f"{fit_kl[0]:.3f} ± {fit_kl[1]:.3f}"
    )
    rows = [{"method": name, **metrics} for name, metrics in result["rows"].items()]
    columns = [("method", ""), *((k, ".3f") for k in ("return", "kl_ref", "kl_seq", "kl_tok"))]
    return title + "\n" + format_table(rows, columns)
