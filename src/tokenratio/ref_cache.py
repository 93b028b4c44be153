"""`train.ref_cache`: the reference's per-token log-probs of the response tokens, scored once and
kept on disk, so later runs, seeds and evaluations never load or run the reference.

Only losses that read the reference through the log-probs of the response tokens can use it
(`Needs.reference` without a KL: DPO, IPO, BPO, TBPO-Q, TIS-DPO); a KL needs the reference's full
distribution at every position. TRL's `precompute_ref_log_probs` keeps one number per sequence,
which token-level losses cannot use.

The cache file is named by a hash of what decides the values: the model directory's files (name,
size, modification time), its dtype, the data file (size, modification time) and every data
setting. It lies in $TOKENRATIO_REF_CACHE_DIR when that is set, else beside the data file
(`<data>.ref-logps/`) or, where that directory is not writable, in
~/.cache/tokenratio/ref-logps/. Inside, each pair is found by a hash of its token ids,
so a pair is never given another pair's values, whatever the order or the split.
"""

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from tokenratio.atomic import write_bytes

FIELDS = ("chosen_ref_logps", "rejected_ref_logps")


def applies(needs) -> bool:
    """Whether a loss with these needs can train from cached reference log-probs."""
    return needs.reference and needs.kl is None


def _file_stamp(path: Path) -> list:
    stat = path.stat()
    return [path.name, stat.st_size, stat.st_mtime_ns]


def cache_key(cfg) -> str:
    """What decides the cached values: model files, dtype, data file and data settings."""
    model = Path(cfg.model.name_or_path)
    files = sorted(p for p in model.iterdir() if p.is_file()) if model.is_dir() else []
    parts = {
        "model": cfg.model.name_or_path if not files else [_file_stamp(p) for p in files],
        "gguf": cfg.model.gguf_file,
        "dtype": cfg.model.dtype,
        "data": [_file_stamp(Path(p)) for p in (cfg.data.path, cfg.data.heldout_path) if p],
        "settings": asdict(cfg.data),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def cache_path(cfg) -> Path:
    """$TOKENRATIO_REF_CACHE_DIR if set, else beside the data file, else the user's cache."""
    beside = Path(cfg.data.path).resolve().parent
    root = beside / f"{Path(cfg.data.path).name}.ref-logps"
    if os.environ.get("TOKENRATIO_REF_CACHE_DIR"):
        root = Path(os.environ["TOKENRATIO_REF_CACHE_DIR"])
    elif not os.access(beside, os.W_OK):
        root = Path.home() / ".cache" / "tokenratio" / "ref-logps"
    return root / f"{cache_key(cfg)}.pt"


def pair_key(row: dict) -> str:
    ids = [row["prompt_ids"], row["chosen_ids"], row["rejected_ids"]]
    return hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:24]


def load(path: Path) -> dict:
    """{pair key: (chosen (C,) float32, rejected (R,) float32)}; empty when there is no file."""
    return torch.load(path, weights_only=True) if path.exists() else {}


def save(path: Path, cache: dict) -> None:
    import io

    buffer = io.BytesIO()
    torch.save(cache, buffer)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, buffer.getvalue())


def missing(rows: list[dict], cache: dict) -> dict:
    """{pair key: the pair's token ids} of the distinct pairs in `rows` that `cache` lacks."""
    keys = {}
    for row in rows:
        key = pair_key(row)
        if key not in cache:
            keys[key] = {k: row[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
    return keys


def longest_first(pairs: dict) -> dict:
    """The pairs ordered by their prefix-shared row length, longest first: batches of similar
    length (little padding), and the largest batch first, so memory runs out at once if it will."""
    return dict(sorted(pairs.items(), key=lambda kv: -sum(len(ids) for ids in kv[1].values())))


def shard(pairs: dict, index: int, count: int) -> dict:
    """Process `index`'s share of `pairs` (of `count` processes), every count-th pair of the
    length order, so each process gets long and short pairs alike."""
    ordered = list(longest_first(pairs).items())
    return dict(ordered[index::count])


@torch.no_grad()
def score_into(
    model, pairs: dict, cache: dict, pad_id: int, batch_size: int, progress: bool = True
) -> None:
    """Score `pairs` ({key: token ids}, from `missing`) with the frozen reference into `cache`:
    longest first, in batches of similar length, the prompt computed once per pair
    (`data.collate_shared`); a progress bar with `progress`."""
    from tokenratio.data import collate_shared
    from tokenratio.logprobs import token_logps
    from tokenratio.scoring import batches, score_batches

    pairs = longest_first(pairs)
    keys, rows = list(pairs), list(pairs.values())
    scored = score_batches(
        [model],
        batches(rows, pad_id, batch_size, collate_shared),
        progress=progress,
        desc="reference",
    )
    done = 0
    for batch, [(logits, _)] in scored:
        logps = token_logps(logits.float(), batch.labels).cpu()
        B = batch.num_pairs
        for i in range(B):
            row = rows[done + i]
            chosen = logps[i, : len(row["chosen_ids"])].clone()
            rejected = logps[B + i, : len(row["rejected_ids"])].clone()
            cache[keys[done + i]] = (chosen, rejected)
        done += B


def score_missing(model, rows: list[dict], cache: dict, pad_id: int, batch_size: int) -> int:
    """Score the rows whose pair `cache` lacks into it; returns how many pairs that was."""
    todo = missing(rows, cache)
    score_into(model, todo, cache, pad_id, batch_size)
    return len(todo)


def attach(dataset, cache: dict):
    """The dataset with FIELDS columns: each pair's cached reference log-probs."""

    def add(row):
        chosen, rejected = cache[pair_key(row)]
        return {FIELDS[0]: chosen.tolist(), FIELDS[1]: rejected.tolist()}

    return dataset.map(add, desc="reference log-probs")
