"""A frontier point: one policy's own samples on the held-out prompts, scored.

n samples a prompt (`sampling.sample_scored`, the reference in lockstep, the same seed for every
policy so their samples differ only by the policies: common random numbers), each sample's gold
reward, sequence KL(pi || pi_ref) (exact per-position KL summed; the sampled log-ratio kept
beside it) and entropy; per prompt, the means and the diversity of its samples (distinct-1/2,
self-BLEU). The samples go to samples/<name>.jsonl.gz (prompt id, response, gold reward, KL, ...)
so anyone can rescore them; the point to points/<name>.json; both written atomically. A point on
disk is read back only when its `key` is this one: the held-out settings' identity (prompts,
sampling settings, gold reward, the reference's content) and the policy's (its checkpoint's
content), so a changed setting or a retrained run is evaluated again, never silently reused.
"""

import gzip
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tokenratio import atomic
from tokenratio.frontier.evaluate import diversity
from tokenratio.frontier.pairs import Prompt, prompt_ids
from tokenratio.frontier.sampling import sample_scored

PER_PROMPT = ("kl", "log_ratio", "reward", "entropy", "length", "distinct_1", "distinct_2",
              "self_bleu")  # fmt: skip


@dataclass(frozen=True)
class Heldout:
    """What every point is measured on: the prompts, the reference, the gold reward, settings."""

    prompts: list[Prompt]
    reference: object
    tokenizer: object
    gold: object
    samples: int
    max_new_tokens: int
    batch_rows: int
    seed: int
    identity: str  # `heldout_identity`: what else decides every point's samples


def heldout_identity(prompts, gold, settings: dict, reference_digest: str) -> str:
    described = {
        "prompts": [[p.id, p.text] for p in prompts],
        "gold": gold.identity(),
        "settings": settings,
        "reference": reference_digest,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]


def evaluate_point(
    heldout: Heldout, load: Callable, name: str, meta: dict, out: Path, policy: str
) -> dict:
    """The point of the model `load()` returns (its `meta`: method, beta, seed, step; `policy`:
    its weights' identity), read from disk when made with this key."""
    point_path = out / "points" / f"{name}.json"
    key = hashlib.sha256(f"{heldout.identity}\0{policy}".encode()).hexdigest()[:20]
    if point_path.exists():
        stored = json.loads(point_path.read_text())
        if stored.get("key") == key:
            return stored
    records = _scored_samples(heldout, load())
    samples_path = out / "samples" / f"{name}.jsonl.gz"
    for directory in (samples_path.parent, point_path.parent):
        directory.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({**meta, **r}, ensure_ascii=False) + "\n" for r in records)
    atomic.write_bytes(samples_path, gzip.compress(lines.encode(), mtime=0))
    per_prompt = _per_prompt(records, len(heldout.prompts))
    point = {
        **meta,
        "name": name,
        "key": key,
        "kl": float(np.mean(per_prompt["kl"])),
        "reward": float(np.mean(per_prompt["reward"])),
        "n_samples": len(records),
        **{key: float(np.nanmean(per_prompt[key])) for key in PER_PROMPT[1:] if key != "reward"},
        "per_prompt": per_prompt,
        "samples": str(samples_path),
    }
    atomic.write_json(point_path, point)
    return point


def _scored_samples(heldout: Heldout, model) -> list[dict]:
    tokenizer = heldout.tokenizer
    ids = [prompt_ids(tokenizer, p.text) for p in heldout.prompts]
    drawn = sample_scored(
        model, heldout.reference, ids, heldout.samples, heldout.max_new_tokens,
        tokenizer.eos_token_id, heldout.seed, heldout.batch_rows,
    )  # fmt: skip
    records = []
    for index, (prompt, rows) in enumerate(zip(heldout.prompts, drawn, strict=True)):
        texts = [tokenizer.decode(r["tokens"], skip_special_tokens=True) for r in rows]
        rewards = heldout.gold.score(
            [prompt.text] * len(texts), texts, first=index * heldout.samples
        )
        for sample, (row, text, reward) in enumerate(zip(rows, texts, rewards, strict=True)):
            records.append(
                {
                    "prompt_id": prompt.id, "prompt_index": index, "sample": sample,
                    "response": text, "gold_reward": reward, "kl": row["kl"],
                    "log_ratio": row["log_ratio"], "entropy": row["entropy"],
                    "length": row["positions"],
                }
            )  # fmt: skip
    return records


def _per_prompt(records: list[dict], prompts: int) -> dict[str, list[float]]:
    """Each prompt's means over its samples (entropy per token) and its samples' diversity."""
    found = {key: [] for key in PER_PROMPT}
    for index in range(prompts):
        rows = [r for r in records if r["prompt_index"] == index]
        tokens = sum(r["length"] for r in rows)
        found["kl"].append(float(np.mean([r["kl"] for r in rows])))
        found["log_ratio"].append(float(np.mean([r["log_ratio"] for r in rows])))
        found["reward"].append(float(np.mean([r["gold_reward"] for r in rows])))
        found["entropy"].append(sum(r["entropy"] for r in rows) / max(tokens, 1))
        found["length"].append(tokens / len(rows))
        for key, value in diversity([r["response"] for r in rows]).items():
            found[key].append(float(value))
    return found
