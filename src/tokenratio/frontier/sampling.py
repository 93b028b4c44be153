"""K samples a prompt from a causal LM at temperature 1 (no top-k, no top-p), the prompt's forward
pass shared: each prompt runs once, and its KV cache is expanded to its K rows
(`DynamicCache.batch_repeat_interleave`), where `generate(..., num_return_sequences=K)` runs the
prompt K times. Prompts of one length are batched together (no padding, so no attention mask);
each row stops at its end-of-sequence token (later tokens of a finished row are dropped).

A row's tokens are drawn by `torch.multinomial` from softmax(logits) with one torch.Generator, so
a (model, prompts, K, seed) gives the same samples every time; tests/frontier/test_sampling.py
checks the first two tokens' distribution against exact next-token probabilities.
"""

from collections import defaultdict

import torch


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
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    out: list[list[list[int]]] = [[] for _ in prompts]
    for indices in _groups(prompts, max(1, batch_rows // k)):
        rows = _sample_group(
            model, [prompts[i] for i in indices], k, max_new_tokens, eos_id, generator
        )
        for j, i in enumerate(indices):
            out[i] = rows[j * k : (j + 1) * k]
    return out


def _groups(prompts: list[list[int]], size: int) -> list[list[int]]:
    """Indices of prompts of one length, at most `size` a group, longest first."""
    by_length = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    groups = []
    for length in sorted(by_length, reverse=True):
        same = by_length[length]
        groups += [same[start : start + size] for start in range(0, len(same), size)]
    return groups


def _sample_group(model, prompts, k, max_new_tokens, eos_id, generator) -> list[list[int]]:
    from transformers import DynamicCache

    device = next(model.parameters()).device
    input_ids = torch.tensor(prompts, device=device)
    cache = DynamicCache()
    out = model(
        input_ids=input_ids, use_cache=True, logits_to_keep=1, **_cache_argument(model, cache)
    )
    cache.batch_repeat_interleave(k)  # the prompt computed once, its keys and values K times
    logits = out.logits[:, -1].float().repeat_interleave(k, dim=0)
    tokens, done = [], torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        next_tokens = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        tokens.append(next_tokens)
        if eos_id is not None:
            done |= next_tokens == eos_id
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        out = model(input_ids=next_tokens[:, None], use_cache=True, **_cache_argument(model, cache))
        logits = out.logits[:, -1].float()
    drawn = torch.stack(tokens, 1).tolist()
    return [_until_eos(row, eos_id) for row in drawn]


def _cache_argument(model, cache) -> dict:
    """transformers 5.2x names the cache `cache` (and deprecates `past_key_values`, the name of
    earlier releases): the keyword this model's forward takes."""
    import inspect

    accepted = inspect.signature(model.forward).parameters
    return {"cache": cache} if "cache" in accepted else {"past_key_values": cache}


def _until_eos(row: list[int], eos_id: int | None) -> list[int]:
    return row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row
