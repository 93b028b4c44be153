"""Preference pairs sampled from the reference and labelled by a gold reward.

For each prompt, K samples from the starting model (`sampling.sample`: temperature 1, no top-k or
top-p, `max_new_tokens`), each scored by the gold reward; every one of the K(K-1)/2 pairs is a
preference (the higher reward wins), except pairs whose rewards differ by `tie_margin` or less,
which are dropped and counted. The result is an ordinary preference file that `tokenratio train`
reads (TRL's conversational format: the prompt a user turn, each response an assistant turn), each
record also carrying its gold rewards, prompt id, sample ids, seed, the model's content hash and
the gold reward's name and version.

It is keyed by content, like the reference cache: the model's files, the prompts, the gold reward
and every sampling setting make the key (`pairs_key`), and the file is `pairs-<key>.jsonl`, so a
changed one is generated again, never reused. Samples are written in parts of `PART_PROMPTS`
prompts (`.parts-<key>/`, each part published atomically), so a killed run resumes from its last
part; the pairs file and its report are published atomically at the end.
"""

import hashlib
import json
from dataclasses import asdict, dataclass
from itertools import combinations
from pathlib import Path

from tokenratio import atomic
from tokenratio.frontier.gold import GoldReward

PART_PROMPTS = 16  # prompts a part: what a kill can lose
FORMAT = "tokenratio-frontier-pairs/1"


@dataclass(frozen=True)
class PairSettings:
    samples: int = 4  # K, per prompt (DPO's sentiment experiment: 4)
    max_new_tokens: int = 48
    tie_margin: float = 0.0  # pairs whose gold rewards differ by at most this are dropped
    seed: int = 0
    batch_rows: int = 64  # sampled rows a forward pass


@dataclass(frozen=True)
class Prompt:
    id: str  # stable: the source file and record, e.g. "harmless-base-test.jsonl.gz:17"
    text: str  # the user turn


def pairs_key(model_hash: str, prompts: list[Prompt], gold: GoldReward, settings) -> str:
    """What decides the pairs: the model's content, the prompts, the gold reward, the settings."""
    described = {
        "format": FORMAT,
        "model": model_hash,
        "prompts": hashlib.sha256(
            json.dumps([asdict(p) for p in prompts], ensure_ascii=False).encode()
        ).hexdigest(),
        "gold": gold.identity(),
        "settings": asdict(settings),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:20]


def label_pairs(prompt: Prompt, samples: list[str], rewards: list[float], tie_margin: float):
    """(pairs, ties dropped): every two samples of a prompt, the higher gold reward chosen."""
    pairs, ties = [], 0
    for i, j in combinations(range(len(samples)), 2):
        if abs(rewards[i] - rewards[j]) <= tie_margin:
            ties += 1
            continue
        win, lose = (i, j) if rewards[i] > rewards[j] else (j, i)
        pairs.append(
            {
                "prompt": [{"role": "user", "content": prompt.text}],
                "chosen": [{"role": "assistant", "content": samples[win]}],
                "rejected": [{"role": "assistant", "content": samples[lose]}],
                "prompt_id": prompt.id,
                "chosen_sample": win,
                "rejected_sample": lose,
                "gold_chosen": rewards[win],
                "gold_rejected": rewards[lose],
            }
        )
    return pairs, ties


def generate_pairs(
    model_dir: str,
    prompts: list[Prompt],
    gold: GoldReward,
    settings: PairSettings,
    out: Path,
    progress: bool = True,
) -> dict:
    """The pairs file for these inputs under `out` (made, resumed, or found); returns its report
    (where it is, the key, and the counts of prompts, samples, pairs and ties dropped)."""
    from tokenratio.study.reuse import digest

    model_hash = "dir:" + digest(model_dir)  # hashed once per content stamp: the runner's too
    key = pairs_key(model_hash, prompts, gold, settings)
    path, report_path = out / f"pairs-{key}.jsonl", out / f"pairs-{key}.json"
    if path.exists() and report_path.exists():
        return json.loads(report_path.read_text())
    parts = out / f".parts-{key}"
    parts.mkdir(parents=True, exist_ok=True)
    _sample_missing_parts(model_dir, prompts, gold, settings, parts, progress)
    records, ties = [], 0
    stamp = {"seed": settings.seed, "model": model_hash, "gold_reward": gold.identity()}
    for start in range(0, len(prompts), PART_PROMPTS):
        for row in json.loads((parts / f"part-{start:07d}.json").read_text()):
            found, dropped = label_pairs(
                Prompt(row["id"], row["text"]), row["samples"], row["rewards"], settings.tie_margin
            )
            records += [{**pair, **stamp} for pair in found]
            ties += dropped
    atomic.write_jsonl(path, records)
    report = {
        "path": str(path),
        "key": key,
        "prompts": len(prompts),
        "samples": len(prompts) * settings.samples,
        "pairs": len(records),
        "ties_dropped": ties,
        "settings": asdict(settings),
        **stamp,
    }
    atomic.write_json(report_path, report)
    return report


def _sample_missing_parts(model_dir, prompts, gold, settings, parts: Path, progress) -> None:
    """Each part of PART_PROMPTS prompts not yet on disk: sampled, scored, published whole."""
    from tqdm.auto import tqdm

    from tokenratio.frontier.sampling import sample

    starts = range(0, len(prompts), PART_PROMPTS)
    missing = [s for s in starts if not (parts / f"part-{s:07d}.json").exists()]
    if not missing:
        return
    model, tokenizer = _load(model_dir)
    bar = tqdm(total=len(prompts), initial=(len(starts) - len(missing)) * PART_PROMPTS,
               desc="sampling pairs", unit="prompt", disable=not progress)  # fmt: skip
    for start in missing:
        chunk = prompts[start : start + PART_PROMPTS]
        ids = [prompt_ids(tokenizer, p.text) for p in chunk]
        seed = settings.seed * 1_000_003 + start  # a part's samples do not depend on the others
        drawn = sample(
            model, ids, settings.samples, settings.max_new_tokens, tokenizer.eos_token_id,
            seed=seed, batch_rows=settings.batch_rows,
        )  # fmt: skip
        rows = []
        for offset, (p, texts) in enumerate(zip(chunk, _decode(tokenizer, drawn), strict=True)):
            rewards = gold.score([p.text] * len(texts), texts, first=(start + offset) * len(texts))
            rows.append({"id": p.id, "text": p.text, "samples": texts, "rewards": rewards})
        atomic.write_json(parts / f"part-{start:07d}.json", rows)
        bar.update(len(chunk))
    bar.close()


def _load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="float32").eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def prompt_ids(tokenizer, text: str) -> list[int]:
    """The user turn through the chat template with the assistant's cue, as training renders it."""
    messages = [{"role": "user", "content": text}]
    if getattr(tokenizer, "chat_template", None):
        from tokenratio.formats import render_template

        rendered = render_template(tokenizer, messages, add_generation_prompt=True)
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def _decode(tokenizer, drawn: list[list[list[int]]]) -> list[list[str]]:
    return [[tokenizer.decode(row, skip_special_tokens=True) for row in rows] for rows in drawn]
