"""The cache on disk and in memory: shards of per-token reference values, checked on every read.

A cache is a directory named by its key (`key.cache_key`) holding shard files, each a safetensors
file (plain tensors, nothing to unpickle, so a crafted file runs nothing) with:
    keys (n, 16) uint8            each pair's key (`pair_key`: its token ids)
    chosen_len, rejected_len (n,) response lengths
    chosen_logps, rejected_logps  log pi_ref of each response token, concatenated (float32)
    chosen_tokens, rejected_tokens (tokens, m) int64 and chosen_token_logps, ... (tokens, m)
                                  with m = k3 samples > 0: tokens a ~ pi_ref and log pi_ref(a)
and in its metadata the format, the cache key, m and a sha256 of the tensors. A shard that is
damaged, foreign, of another format or whose values are impossible (non-finite, a log-prob > 0,
a token outside the vocabulary) is dropped with one line naming it and why: its pairs are scored
again. Shards are written as scoring goes (`ShardWriter`, about one a minute), so a kill loses at
most the last minute; each shard is published by `atomic.write_bytes`, and temporary files left
by killed writers are removed.
"""

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from tokenratio import shards
from tokenratio.logprobs import IGNORE_INDEX
from tokenratio.reference.key import FORMAT
from tokenratio.shards import DamagedShardError, pair_key, remove_leftovers

SIDES = ("chosen", "rejected")
SHARD_SECONDS = shards.SHARD_SECONDS
LOGP_SLACK = 1e-3  # log-probs computed in low precision may round a little above 0
__all__ = ["DamagedShardError", "pair_key", "remove_leftovers"]  # the store's, kept in shards


def pack(entries: list[tuple[bytes, dict]], samples: int) -> dict:
    """Scored pairs -> one shard's tensors. An entry: (pair key, {"chosen_logps": (C,), ...,
    with samples also "chosen_tokens": (C, m), "chosen_token_logps": (C, m), ...})."""
    keys = torch.tensor(np.frombuffer(b"".join(k for k, _ in entries), np.uint8).reshape(-1, 16))
    tensors = {"keys": keys}
    fields = ["logps"] + (["tokens", "token_logps"] if samples else [])
    for side in SIDES:
        tensors[f"{side}_len"] = torch.tensor([len(v[f"{side}_logps"]) for _, v in entries])
        for field in fields:
            name = f"{side}_{field}"
            tensors[name] = torch.cat([v[name] for _, v in entries]).contiguous()
    return tensors


def _metadata(cache_key: str, samples: int) -> dict:
    return {"format": FORMAT, "key": cache_key, "samples": str(samples)}


def write_shard(directory: Path, tensors: dict, cache_key: str, samples: int) -> Path:
    """One shard, complete or not at all (`shards.write_shard`)."""
    return shards.write_shard(directory, tensors, _metadata(cache_key, samples))


def read_shard(path: Path, cache_key: str, samples: int, vocab_size: int) -> dict:
    """A shard's tensors, checked (DamagedShardError says what is wrong)."""
    expected = _metadata(cache_key, samples)
    tensors = shards.read_shard(path, expected, "reference, data or setting")
    _check_values(tensors, samples, vocab_size)
    return tensors


def _check_values(tensors: dict, samples: int, vocab_size: int) -> None:
    n = tensors["keys"].shape[0] if "keys" in tensors else -1
    if n < 0 or tensors["keys"].shape != (n, 16) or tensors["keys"].dtype != torch.uint8:
        raise DamagedShardError("no (n, 16) uint8 pair keys")
    for side in SIDES:
        lengths, logps = tensors.get(f"{side}_len"), tensors.get(f"{side}_logps")
        if lengths is None or logps is None or lengths.shape != (n,) or logps.ndim != 1:
            raise DamagedShardError(f"{side} entries missing or of the wrong shape")
        if logps.dtype != torch.float32 or int(lengths.sum()) != logps.shape[0]:
            raise DamagedShardError(f"{side} log-probs do not match their lengths")
        if not bool(torch.isfinite(logps).all()) or bool((logps > LOGP_SLACK).any()):
            raise DamagedShardError(
                f"{side} log-probs that no distribution gives (> 0 or non-finite)"
            )
        if samples:
            tokens = tensors.get(f"{side}_tokens")
            token_logps = tensors.get(f"{side}_token_logps")
            shape = (logps.shape[0], samples)
            if tokens is None or token_logps is None or tokens.shape != shape:
                raise DamagedShardError(f"{side} sampled tokens missing or of the wrong shape")
            if token_logps.shape != shape or not bool(torch.isfinite(token_logps).all()):
                raise DamagedShardError(f"{side} sampled tokens' log-probs missing or non-finite")
            if bool(((tokens < 0) | (tokens >= vocab_size)).any()):
                raise DamagedShardError(f"{side} sampled tokens outside the vocabulary")


class CachedValues:
    """The cache's values in memory: shards as read, and each pair key's place in them."""

    def __init__(self, samples: int):
        self.samples = samples
        self.shards: list[dict] = []
        self.where: dict[bytes, tuple[int, int]] = {}  # pair key -> (shard, entry)
        self.paths: list[Path | None] = []  # each shard's file (None: scored in memory)
        self.spans: list[dict] = []  # per shard and side: (starts, lengths) as Python lists

    def __len__(self) -> int:
        return len(self.where)

    def __contains__(self, key: bytes) -> bool:
        return key in self.where

    def add(self, tensors: dict, path: Path | None = None) -> None:
        """One shard's tensors (checked, from `path`, or freshly scored)."""
        spans = {}
        for side in SIDES:
            lengths = tensors[f"{side}_len"]
            spans[side] = ((torch.cumsum(lengths, 0) - lengths).tolist(), lengths.tolist())
        number = len(self.shards)
        self.shards.append(tensors)
        self.paths.append(path)
        self.spans.append(spans)
        for i, key in enumerate(tensors["keys"].numpy()):
            self.where[key.tobytes()] = (number, i)

    def length(self, key: bytes, side: str) -> int:
        shard, i = self.where[key]
        return self.spans[shard][side][1][i]

    def entry(self, key: bytes, side: str, field: str = "logps") -> torch.Tensor:
        shard, i = self.where[key]
        starts, lengths = self.spans[shard][side]
        return self.shards[shard][f"{side}_{field}"][starts[i] : starts[i] + lengths[i]]

    def drop_mismatched(self, keyed_rows: Iterable[tuple[bytes, dict]]) -> list:
        """Drop every shard holding an entry whose lengths differ from its pair's (a shard
        consistent in itself but not with the data); returns the dropped shards' paths.
        `keyed_rows`: (pair_key(row), row)."""
        bad = set()
        for key, row in keyed_rows:
            if key not in self.where:
                continue
            for side in SIDES:
                if self.length(key, side) != len(row[f"{side}_ids"]):
                    bad.add(self.where[key][0])
        self.where = {k: v for k, v in self.where.items() if v[0] not in bad}
        return [self.paths[number] for number in sorted(bad)]

    def fill(self, batch, rows: list[dict], epoch: int = 0):
        """The collated `batch` of `rows` with the cached values: ref_logps and, with samples,
        the tokens of sample `epoch mod m` and their log-probs (IGNORE_INDEX beyond a response)."""
        shape = batch.labels.shape
        batch.ref_logps = torch.zeros(shape, dtype=torch.float32)
        if self.samples:
            batch.ref_sample_tokens = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
            batch.ref_sample_logps = torch.zeros(shape, dtype=torch.float32)
        column = epoch % max(1, self.samples)
        B = len(rows)
        for i, row in enumerate(rows):
            key = pair_key(row)
            for offset, side in ((0, "chosen"), (B, "rejected")):
                values = self.entry(key, side)
                batch.ref_logps[offset + i, : len(values)] = values
                if self.samples:
                    tokens = self.entry(key, side, "tokens")[:, column]
                    batch.ref_sample_tokens[offset + i, : len(tokens)] = tokens
                    logps = self.entry(key, side, "token_logps")[:, column]
                    batch.ref_sample_logps[offset + i, : len(logps)] = logps
        return batch


class ShardWriter(shards.ShardWriter):
    """Scored pairs to shard files as they come: one shard about every SHARD_SECONDS."""

    def __init__(self, directory: Path | None, cache_key: str, samples: int):
        self.samples = samples  # k3 samples a response position, which the scoring pass draws
        super().__init__(
            directory,
            lambda entries: pack(entries, samples),
            _metadata(cache_key, samples),
            seconds=SHARD_SECONDS,
        )
