"""The scoring pass: the frozen reference over the pairs the cache lacks, longest first, in
batches of similar length with the prompt shared (`batch.collate_shared`), and, for TBPO-A's k3,
`samples` tokens a ~ pi_ref per response position drawn by Gumbel-max from a generator seeded
by the pair's key (so a pair's samples never depend on batching, sharding or order)."""

from collections.abc import Iterator

import torch

from tokenratio.shards import keyed_rows, missing_longest_first

__all__ = ["keyed_rows"]  # kept in shards, with the store

SAMPLE_SEED = 0x7B90A  # mixed into each pair's seed: the samples are the cache's, not the run's


def missing(keyed_rows, values) -> dict:
    """{pair key: token ids} of the distinct pairs that `values` lacks, longest first
    (`shards.missing_longest_first`); `keyed_rows`: (pair_key(row), row)."""
    return missing_longest_first(keyed_rows, values)


def shard(pairs: dict, index: int, count: int) -> dict:
    """Process `index`'s share of `pairs` (longest first, as `missing` orders them; of `count`):
    every count-th pair, so each process gets long and short pairs alike."""
    return dict(list(pairs.items())[index::count])


def _generator(key: bytes, side: int, device) -> torch.Generator:
    seed = (int.from_bytes(key[:8], "little") ^ SAMPLE_SEED) + side
    return torch.Generator(device=device).manual_seed(seed % (1 << 63))


def _samples(logits: torch.Tensor, key: bytes, side: int, samples: int) -> tuple:
    """`samples` tokens a ~ softmax(logits) per row of (n, V) logits and their log-probs."""
    from tokenratio.logprobs import sample_tokens, token_logps_at

    generator = _generator(key, side, logits.device)
    tokens = torch.stack([sample_tokens(logits, generator=generator) for _ in range(samples)], 1)
    logps = token_logps_at(logits, tokens)
    return tokens.cpu(), logps.cpu()


@torch.no_grad()
def score(
    model, pairs: dict, pad_id: int, batch_size: int, samples: int, progress: bool, trunk=None
):
    """Score `pairs` ({key: token ids}) with the frozen reference; yields each batch's entries
    (pair key, {"chosen_logps": (C,) float32, ...}) as `store.pack` takes them. With `trunk`
    (a trunk.TrunkCache holding the pairs) the reference runs only above the frozen trunk."""
    from tokenratio.batch import collate_shared
    from tokenratio.logprobs import token_logps
    from tokenratio.scoring import batches, score_batches

    keys, rows = list(pairs), list(pairs.values())
    collate_pairs = collate_shared
    if trunk is not None:

        def collate_pairs(chunk, pad):
            return trunk.fill(collate_shared(chunk, pad), chunk)

    scored = score_batches(
        [model],
        batches(rows, pad_id, batch_size, collate_pairs),
        progress=progress,
        desc="reference",
        total=-(-len(rows) // batch_size),
    )
    done = 0
    for batch, [(logits, _)] in scored:
        logps = token_logps(logits.float(), batch.labels).cpu()
        yield list(_entries(keys, rows, done, batch.num_pairs, logits, logps, samples))
        done += batch.num_pairs


@torch.no_grad()
def idle_passes(model, filler: dict, pad_id: int, count: int) -> None:
    """`count` forward passes over one pair (`filler`: its token ids), their results dropped:
    under sharding a process with fewer batches keeps in step with the others this way."""
    from tokenratio.batch import collate_shared
    from tokenratio.scoring import score_batches

    for _ in score_batches([model], [collate_shared([filler], pad_id)] * max(count, 0)):
        pass


def _entries(keys, rows, done, B, logits, logps, samples) -> Iterator:
    for i in range(B):
        key, row, entry = keys[done + i], rows[done + i], {}
        for side, (name, offset) in enumerate((("chosen", 0), ("rejected", B))):
            n = len(row[f"{name}_ids"])
            entry[f"{name}_logps"] = logps[offset + i, :n].clone()
            if samples:
                tokens, token_logps = _samples(logits[offset + i, :n], key, side, samples)
                entry[f"{name}_tokens"], entry[f"{name}_token_logps"] = tokens, token_logps
        yield key, entry
