"""K samples a prompt from a causal LM at temperature 1 (no top-k, no top-p), the prompt's forward
pass shared: each prompt runs once, and its KV cache is expanded to its K rows
(`DynamicCache.batch_repeat_interleave`), where `generate(..., num_return_sequences=K)` runs the
prompt K times. Prompts are batched in groups of similar length, left-padded (attention mask and
position ids as `generate` makes them); each row stops at its end-of-sequence token (later tokens
of a finished row are dropped).

With a `reference`, it runs in lockstep over the same tokens (its own cache), and each sample
gets its scores from the two models' logits at every position it was drawn at (the end-of-sequence
token included: the sequence's probability includes stopping): "kl", the exact per-position
KL(pi(.|s_t) || pi_ref(.|s_t)) over the full vocabulary summed along the sample, "log_ratio",
the sampled log pi(y_t|s_t) - log pi_ref(y_t|s_t) summed, and "entropy", the policy's exact
entropy summed (evaluate.py's docstring says why the first). No second pass over the samples.

A row's tokens are drawn by `torch.multinomial` from softmax(logits) with one torch.Generator, so
a (model, prompts, K, seed, batch_rows) gives the same samples every time;
tests/frontier/test_sampling.py checks the first two tokens' distribution against exact
next-token probabilities, and the scores against evaluate.sequence_scores.
"""

from dataclasses import dataclass

import torch


@dataclass
class _Group:
    """A group's rows as they are drawn: tokens, and the scores' running sums."""

    tokens: list
    done: torch.Tensor
    kl: torch.Tensor
    log_ratio: torch.Tensor
    entropy: torch.Tensor


@torch.no_grad()
def sample(
    model,
    prompts: list[list[int]],
    k: int,
    max_new_tokens: int,
    eos_id: int | None,
    seed: int = 0,
    batch_rows: int = 64,
) -> list[list[list[int]]]:
    """[prompt][sample] -> response token ids (without the end-of-sequence token)."""
    drawn = sample_scored(model, None, prompts, k, max_new_tokens, eos_id, seed, batch_rows)
    return [[row["tokens"] for row in rows] for rows in drawn]


@torch.no_grad()
def sample_scored(
    model, reference, prompts, k: int, max_new_tokens: int, eos_id, seed=0, batch_rows=64
) -> list[list[dict]]:
    """[prompt][sample] -> {"tokens"} (without the end-of-sequence token), and with a reference
    also "kl", "log_ratio", "entropy" and "positions" (the module docstring)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    out: list[list[dict]] = [[] for _ in prompts]
    for indices in groups(prompts, max(1, batch_rows // k)):
        group = [prompts[i] for i in indices]
        rows = _sample_group(model, reference, group, k, max_new_tokens, eos_id, generator)
        for j, i in enumerate(indices):
            out[i] = rows[j * k : (j + 1) * k]
    return out


def groups(prompts: list[list[int]], size: int) -> list[list[int]]:
    """Indices of prompts, longest first, `size` a group: similar lengths pad little."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[start : start + size] for start in range(0, len(order), size)]


def left_padded(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


class _Stepper:
    """One model's cache over the group's rows: the prompt once, then a token at a time."""

    def __init__(self, model, ids, mask, k):
        from transformers import DynamicCache

        self.model, self.cache = model, DynamicCache()
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        out = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
            logits_to_keep=1, **_cache_argument(model, self.cache),
        )  # fmt: skip
        self.cache.batch_repeat_interleave(k)  # the prompt computed once, its keys/values K times
        self.mask = mask.repeat_interleave(k, dim=0)
        self.position = positions[:, -1:].repeat_interleave(k, dim=0)
        self.logits = out.logits[:, -1].float().repeat_interleave(k, dim=0)

    def step(self, tokens: torch.Tensor) -> None:
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], 1)
        self.position = self.position + 1
        out = self.model(
            input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.position,
            use_cache=True, **_cache_argument(self.model, self.cache),
        )  # fmt: skip
        self.logits = out.logits[:, -1].float()


def _sample_group(model, reference, prompts, k, max_new_tokens, eos_id, generator) -> list[dict]:
    device = next(model.parameters()).device
    ids, mask = left_padded(prompts, device)
    steppers = [_Stepper(m, ids, mask, k) for m in (model, reference) if m is not None]
    rows = len(prompts) * k
    sums = [torch.zeros(rows, dtype=torch.float64, device=device) for _ in range(3)]
    state = _Group([], torch.zeros(rows, dtype=torch.bool, device=device), *sums)
    lengths = torch.zeros(rows, dtype=torch.long, device=device)
    for step in range(max_new_tokens):
        log_p = steppers[0].logits.log_softmax(-1)
        next_tokens = torch.multinomial(log_p.exp(), 1, generator=generator)[:, 0]
        live = ~state.done
        lengths += live.long()
        if reference is not None:
            _add_scores(state, log_p, steppers[1].logits.log_softmax(-1), next_tokens, live)
        state.tokens.append(next_tokens)
        if eos_id is not None:
            state.done |= next_tokens == eos_id
        if bool(state.done.all()) or step == max_new_tokens - 1:
            break
        for stepper in steppers:
            stepper.step(next_tokens)
    drawn = torch.stack(state.tokens, 1).tolist()
    found = [{"tokens": _until_eos(row, eos_id)} for row in drawn]
    if reference is not None:
        for i, row in enumerate(found):
            row.update(
                kl=float(state.kl[i]), log_ratio=float(state.log_ratio[i]),
                entropy=float(state.entropy[i]), positions=int(lengths[i]),
            )  # fmt: skip
    return found


def _add_scores(state: _Group, log_p, log_q, tokens, live) -> None:
    """This position's exact KL, sampled log-ratio and entropy, added for rows still drawing."""
    p = log_p.exp()
    kl = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)  # 0 log 0 = 0
    ratio = (log_p - log_q).gather(-1, tokens[:, None])[:, 0]
    entropy = -torch.where(p > 0, p * log_p, 0.0).sum(-1)
    state.kl += torch.where(live, kl.double(), 0.0)
    state.log_ratio += torch.where(live, ratio.double(), 0.0)
    state.entropy += torch.where(live, entropy.double(), 0.0)


def _cache_argument(model, cache) -> dict:
    """transformers 5.2x names the cache `cache` (and deprecates `past_key_values`, the name of
    earlier releases): the keyword this model's forward takes."""
    import inspect

    accepted = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in accepted else {"past_key_values": cache}


def _until_eos(row: list[int], eos_id: int | None) -> list[int]:
    return row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row
