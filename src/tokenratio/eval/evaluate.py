"""`tokenratio eval`: the paper's metrics on trained checkpoints, side by side.

Per model:
- preference metrics without generation, on held-out pairs: accuracy of the implicit reward
  beta * sum_t r_t, mean reward margin, and KL(pi || pi_ref) summed over each held-out response
  (teacher-forced, full vocabulary), each with its standard error;
- generation with the paper's settings (temperature 1.0, top-p 0.95, 128 new tokens, 5 samples per
  prompt, seeded) and its diversity metrics: predictive entropy (top-20, renormalised), self-BLEU over
  a prompt's samples, distinct-1 of the first sample;
- win rate and length-controlled win rate of the first sample against the dataset's reference
  response (or another model's first sample), with a judge from `judges.py`.
Results: results.json and results.md (a Markdown table: held-out accuracy with its Wilson 95%
interval, as `tokenratio train` reports it; every other metric as mean ± standard error).
"""

import json
import math
import sys
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from tokenratio import precision
from tokenratio.atomic import write_text
from tokenratio.batch import collate, collate_rows
from tokenratio.config import DataConfig
from tokenratio.data import load_raw, tokenize_dataset
from tokenratio.eval import metrics
from tokenratio.formats import to_text
from tokenratio.intervals import accuracy_interval
from tokenratio.logprobs import IGNORE_INDEX, token_logps_and_kl
from tokenratio.losses import preference_accuracy
from tokenratio.modeling import load_pretrained
from tokenratio.provenance import run_dir_of, trained_on
from tokenratio.scoring import batches, score_batches


@dataclass(frozen=True)
class EvalConfig:
    models: tuple[tuple[str, str], ...]  # (name, path) pairs, compared side by side
    data: str
    reference: str | None = None  # the reference policy (for implicit rewards and KL)
    records: tuple[int, ...] | None = None  # which records of `data` (a run's held-out split)
    offset: int = 0  # else records offset, offset + 1, ... of `data`
    data_format: str = "auto"
    split: str = "train"  # of a directory or hub dataset with several
    num_prompts: int = 20
    num_pairs: int | None = None  # None: every selected record (a run's whole held-out split)
    samples_per_prompt: int = 5  # paper: 5
    max_new_tokens: int = 128  # paper: 128
    temperature: float = 1.0  # paper: 1.0
    top_p: float = 0.95  # paper: 0.95
    seed: int = 0
    beta: float = 0.1
    batch_size: int = 8
    max_length: int = 512
    max_prompt_length: int = 384
    on_invalid: str = "error"  # error | skip, as data.on_invalid: skipped records are counted
    chat_template: bool | None = None  # data.chat_template: HH through the chat template
    judge: str | None = None  # reward-model:PATH | openai:URL
    judge_options: dict = field(default_factory=dict)  # model, api_key, timeout, retries
    versus: str = "dataset"  # "dataset" (its chosen response) or the name of one of the models
    # Pair scoring above the frozen trunk the model shares with the reference (trunk.py): the
    # leading layers both hold identically (a LoRA-on-the-last-layers model and its base) run
    # once per pair, cached beside the data.
    trunk_cache: bool = False
    # auto | no | bf16: scoring and generation under bf16 autocast; auto as train's (precision.py)
    mixed_precision: str = "auto"
    progress: bool = True  # a bar per stage (scoring, generation) on stderr


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def _bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


def autocast(precision: str):
    """bf16 autocast on the models' device type for "bf16", else nothing."""
    import contextlib

    if precision == "no":
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=dtype)


def _trunk_batches(pairs, pad_id: int, batch_size: int, trunk):
    """`batches` of `pairs`, each with the frozen trunk's cached states when `trunk` is given."""
    if trunk is None:
        return batches(pairs, pad_id, batch_size)
    rows = [pairs[i] for i in range(len(pairs))]
    return (
        trunk.fill(collate(rows[i : i + batch_size], pad_id), rows[i : i + batch_size])
        for i in range(0, len(rows), batch_size)
    )


@torch.no_grad()
def preference_metrics(
    model,
    reference,
    pairs,
    pad_id: int,
    beta: float,
    batch_size: int,
    progress: bool = False,
    trunk=None,
) -> dict:
    """Implicit-reward accuracy and margin, and KL(pi || pi_ref) per response, on held-out pairs;
    "per_pair" keeps each pair's record, correctness and margin (the study's paired tests)."""
    accuracy, margin, kl, kl_token = [], [], [], []
    scored = score_batches([model, reference], _trunk_batches(pairs, pad_id, batch_size, trunk))
    bar = _bar(len(pairs), "eval: scoring pairs", progress)
    for batch, ((logits, _), (ref_logits, _)) in scored:
        bar.update(batch.num_pairs)
        mask = batch.labels != IGNORE_INDEX
        # One pass over both models' logits (tiles of the head, response tokens only): the roles
        # swapped, token_logps_and_kl's KL(first's ref || first) is KL(pi || pi_ref) here.
        ref_logps, per_token_kl, logps = token_logps_and_kl(
            ref_logits.float(), batch.labels, logits.float(), return_ref_logps=True
        )
        reward = beta * ((logps - ref_logps) * mask).sum(-1)  # (2B,)
        B = batch.num_pairs
        accuracy += preference_accuracy(reward[:B], reward[B:]).tolist()
        margin += (reward[:B] - reward[B:]).tolist()
        per_response = (per_token_kl * mask).sum(-1)  # (2B,)
        kl += per_response.tolist()
        kl_token += (per_response / mask.sum(-1).clamp_min(1)).tolist()
    bar.close()
    return {
        "pref_accuracy": mean_se(accuracy),
        "pref_accuracy_interval": accuracy_interval(sum(accuracy) / len(accuracy), len(accuracy)),
        "pairs": len(accuracy),
        "reward_margin": mean_se(margin),
        "kl_to_ref": mean_se(kl),
        "kl_per_token": mean_se(kl_token),
        "per_pair": {
            "record": list(pairs["record"]) if "record" in pairs.column_names else [],
            "correct": accuracy,
            "margin": margin,
        },
    }


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], cfg: EvalConfig) -> list[list[list[int]]]:
    """Sampled responses (token ids, cut at EOS): [prompt][sample] -> ids. Seeded, batched."""
    from transformers import GenerationConfig

    torch.manual_seed(cfg.seed)
    gen = GenerationConfig(
        do_sample=True,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        max_new_tokens=cfg.max_new_tokens,
        num_return_sequences=cfg.samples_per_prompt,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    out = []
    bar = _bar(len(prompts), f"eval: generating {cfg.samples_per_prompt} samples", cfg.progress)
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        sequences = model.generate(
            input_ids=ids.to(model.device),
            attention_mask=mask.to(model.device),
            generation_config=gen,
        ).cpu()
        new = sequences[:, width:].tolist()
        for i in range(len(chunk)):
            samples = []
            for row in new[i * cfg.samples_per_prompt : (i + 1) * cfg.samples_per_prompt]:
                if tokenizer.eos_token_id in row:
                    row = row[: row.index(tokenizer.eos_token_id) + 1]
                samples.append(row)
            out.append(samples)
        bar.update(len(chunk))
    bar.close()
    return out


@torch.no_grad()
def entropy_per_prompt(model, prompts, samples, pad_id: int, batch_size: int) -> list[float]:
    """Predictive entropy (top-20, renormalised) of each prompt's samples, teacher-forced."""
    rows = [(p, s) for p, group in zip(prompts, samples, strict=True) for s in group if s]
    per_row = []
    for batch, [(logits, _)] in score_batches(
        [model], batches(rows, pad_id, batch_size, collate_rows)
    ):
        logits = logits.float()
        mask = batch.labels != IGNORE_INDEX
        per_row += [metrics.predictive_entropy(logits[i], mask[i]) for i in range(len(mask))]
    k = len(samples[0]) if samples else 1
    return [sum(per_row[i : i + k]) / k for i in range(0, len(per_row), k)]


def evaluate_model(name, path, reference, raw, cfg: EvalConfig) -> dict:
    """Everything but the judge for one model; keeps the texts for judging."""
    model, tokenizer, _ = load_pretrained(path)
    data_cfg = DataConfig(
        path=cfg.data,
        format=cfg.data_format,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        chat_template=cfg.chat_template,
        on_invalid="skip",
    )
    pairs, report = tokenize_dataset(raw, tokenizer, data_cfg)
    result = {"name": name, "path": path, "data": report}
    wanted = len(pairs) if cfg.num_pairs is None else min(cfg.num_pairs, len(pairs))
    held_out = pairs.select(range(wanted))
    with autocast(cfg.mixed_precision):
        if reference is not None:
            trunk = _shared_trunk(model, reference, held_out, tokenizer, cfg)
            result.update(
                preference_metrics(
                    model,
                    reference,
                    held_out,
                    tokenizer.pad_token_id,
                    cfg.beta,
                    cfg.batch_size,
                    cfg.progress,
                    trunk,
                )
            )
        if cfg.num_prompts:
            result.update(generation_metrics(model, tokenizer, pairs, raw, report, cfg))
    return result


def _shared_trunk(model, reference, pairs, tokenizer, cfg: EvalConfig):
    """The frozen trunk `model` and `reference` share, over `pairs` (cfg.trunk_cache), or None."""
    if not cfg.trunk_cache:
        return None
    from tokenratio import trunk
    from tokenratio.modeling import unwrap_peft

    layers = trunk.shared_layers(model, reference)
    if layers == 0:
        return None
    inner = unwrap_peft(reference)
    dtype = str(next(inner.parameters()).dtype).removeprefix("torch.")
    device = next(inner.parameters()).device
    key = trunk.identity(inner, layers, f"{dtype}/{cfg.mixed_precision}", device.type)
    rows = [pairs[i] for i in range(len(pairs))]
    compute = (tokenizer.pad_token_id, cfg.batch_size, lambda: autocast(cfg.mixed_precision))
    return trunk.load_or_compute(inner, layers, key, rows, compute, cfg.progress)


def generation_metrics(model, tokenizer, pairs, raw, report: dict, cfg: EvalConfig) -> dict:
    """Samples with the paper's settings, their diversity and length; keeps the texts (and the
    dataset's prompt and chosen response) for judging."""
    prompts = [pairs[i]["prompt_ids"] for i in range(min(cfg.num_prompts, len(pairs)))]
    samples = generate(model, tokenizer, prompts, cfg)
    texts = [[tokenizer.decode(s, skip_special_tokens=True) for s in group] for group in samples]
    pad_id = tokenizer.pad_token_id
    rendered = [
        to_text(raw.dataset[pairs[i]["record"]], report["format"], tokenizer)
        for i in range(len(prompts))
    ]
    return {
        "entropy": mean_se(entropy_per_prompt(model, prompts, samples, pad_id, cfg.batch_size)),
        "self_bleu": mean_se([metrics.self_bleu(group) for group in texts]),
        "distinct_1": mean_se([metrics.distinct_n(group[0]) for group in texts]),
        "response_tokens": mean_se([sum(map(len, group)) / len(group) for group in samples]),
        "samples": texts,
        "prompt_texts": [r[0] for r in rendered],
        "reference_texts": [r[1] for r in rendered],  # the dataset's chosen response
    }


def judge_all(results: list[dict], cfg: EvalConfig) -> None:
    """Win rate and length-controlled win rate of each model's first samples vs the baseline."""
    from tokenratio.eval.judges import make_judge

    judge = make_judge(cfg.judge, **cfg.judge_options)
    by_name = {r["name"]: r for r in results}
    if cfg.versus != "dataset" and cfg.versus not in by_name:
        raise ValueError(f"--versus {cfg.versus!r} is neither 'dataset' nor a model name")
    for result in results:
        if cfg.versus == result["name"]:
            continue
        if cfg.versus == "dataset":
            baseline = result["reference_texts"]
        else:
            baseline = [group[0] for group in by_name[cfg.versus]["samples"]]
        ours = [group[0] for group in result["samples"]]
        unparsed_before = getattr(judge, "unparsed", 0)
        outcomes = [
            judge.compare(prompt, a, b)
            for prompt, a, b in zip(result["prompt_texts"], ours, baseline, strict=True)
        ]
        _check_verdicts(result, getattr(judge, "unparsed", 0) - unparsed_before, len(outcomes))
        result["win_rate"] = metrics.win_rate(outcomes)
        result["lc_win_rate"] = metrics.length_controlled_win_rate(
            outcomes,
            [len(metrics.words(a)) for a in ours],
            [len(metrics.words(b)) for b in baseline],
        )


MAX_UNPARSED = 0.2  # more unparseable verdicts than this fraction fails the judging


def _check_verdicts(result: dict, unparsed: int, total: int) -> None:
    """Verdicts that were neither A nor B counted as ties: recorded, warned, fatal past 20%."""
    from tokenratio.eval.judges import JudgeError

    result["judge_unparsed"] = unparsed
    if unparsed:
        print(
            f"WARNING: {unparsed} of {total} judge verdicts for {result['name']} were neither A "
            "nor B (counted as ties)",
            file=sys.stderr,
        )
    if unparsed > MAX_UNPARSED * total:
        raise JudgeError(
            f"{unparsed} of {total} judge verdicts for {result['name']} were unparseable; check "
            "that the judge answers A or B (the metrics without the judge are written)"
        )


COLUMNS = [
    ("pref_accuracy", "pref. acc.", 3),
    ("reward_margin", "margin", 3),
    ("kl_to_ref", "KL(pi||ref)", 2),
    ("kl_per_token", "KL/token", 4),
    ("entropy", "entropy", 3),
    ("response_tokens", "length", 1),
    ("self_bleu", "self-BLEU", 1),
    ("distinct_1", "distinct-1", 3),
    ("win_rate", "win %", 1),
    ("lc_win_rate", "LC win %", 1),
]


def markdown_table(results: list[dict]) -> str:
    """A GitHub Markdown table (a `|` inside a cell escaped), then a line saying what it holds."""
    present = [c for c in COLUMNS if any(c[0] in r for r in results)]
    lines = [
        "| model | " + " | ".join(_cell(c[1]) for c in present) + " |",
        "|---|" + "---|" * len(present),
    ]
    for r in results:
        cells = [_cell(r["name"])] + [_value(r, key, digits) for key, _, digits in present]
        lines.append("| " + " | ".join(cells) + " |")
    pairs = sorted({r["pairs"] for r in results if "pairs" in r})
    on = f" on {', '.join(map(str, pairs))} held-out pairs" if pairs else ""
    note = (
        f"\npref. acc.: implicit-reward accuracy{on} (ties count half) with its 95% Wilson "
        "interval, as `tokenratio train` reports it; other columns: mean ± standard error."
    )
    return "\n".join(lines) + "\n" + note


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _value(result: dict, key: str, digits: int) -> str:
    mean, se = result.get(key, (float("nan"), float("nan")))
    if key == "pref_accuracy" and "pref_accuracy_interval" in result:
        low, high = result["pref_accuracy_interval"]
        return f"{mean:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def evaluated_records(cfg: EvalConfig):
    """The records of cfg.data this evaluation reads: the listed ones, else from the offset on."""
    raw = load_raw(cfg.data, cfg.split, on_invalid=cfg.on_invalid, fmt=cfg.data_format)
    total = len(raw.dataset)
    wanted = total if cfg.num_pairs is None else max(cfg.num_prompts, cfg.num_pairs)
    if cfg.records is not None:
        return raw.select(cfg.records[:wanted])
    if cfg.offset >= total:
        raise ValueError(f"--offset {cfg.offset}: {cfg.data} has {total} records")
    return raw.select(range(cfg.offset, min(cfg.offset + wanted, total)))


EVAL_ADVICE = "Evaluate the run without --data (its own held-out split) or choose other records."


def check_training_overlap(raw, models, advice: str = EVAL_ADVICE) -> dict[str, int]:
    """Per trained run among `models`: how many evaluated records it trained on, said loudly,
    with `advice` (what the calling command's flags can do about it)."""
    counts = {}
    for name, path in models:
        run = run_dir_of(path)
        if run is None:
            continue
        counts[name] = trained_on(raw, run)
        if counts[name]:
            print(
                f"WARNING: {counts[name]} of the {len(raw.dataset)} evaluated records are in the "
                f"training data of {name} ({run}): its numbers here are NOT held-out. {advice}",
                file=sys.stderr,
            )
    return counts


def skipped_by_reason(raw) -> dict[str, int]:
    """Records load_raw skipped (on_invalid = "skip"), counted by reason, said on stdout."""
    counts = dict(Counter(reason for reason, _ in raw.skipped))
    if counts:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))
        total, first = sum(counts.values()), raw.skipped[0][1]
        print(f"eval: skipped {total} invalid records of {raw.source} ({reasons}; first: {first})")
    return counts


def run_eval(cfg: EvalConfig, out: Path) -> list[dict]:
    chosen = precision.resolve(cfg.mixed_precision, not torch.cuda.is_available())
    cfg = replace(cfg, mixed_precision=chosen.mode)
    print(f"precision: {chosen.describe()}")
    raw = evaluated_records(cfg)
    skipped = skipped_by_reason(raw)
    overlap = check_training_overlap(raw, cfg.models)
    reference = load_pretrained(cfg.reference)[0] if cfg.reference else None
    results = [evaluate_model(name, path, reference, raw, cfg) for name, path in cfg.models]
    for result in results:
        result["skipped_records"] = skipped
        if result["name"] in overlap:
            result["trained_on_records"] = overlap[result["name"]]
    write_results(cfg, results, out)  # first without the judge: a judge failure loses nothing
    if cfg.judge:
        judge_all(results, cfg)
        write_results(cfg, results, out)
    return results


def write_results(cfg: EvalConfig, results: list[dict], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text(
        out / "results.json", json.dumps({"config": asdict(cfg), "results": results}, indent=1)
    )
    write_text(out / "results.md", markdown_table(results) + "\n")
