"""Preference data: load through `datasets`, validate, tokenize once (cached), collate.

PreferenceExample (text) -> tokenize -> {prompt_ids, chosen_ids, rejected_ids} -> collate -> PreferenceBatch

Length policy (reported after tokenization as counts):
- prompt + response longer than `max_length`: the response is cut to fit ("truncated").
- prompt longer than `max_prompt_length`, however long: its last max_prompt_length tokens are kept,
  where the question usually is, as TRL does ("prompt_truncated"); max_prompt_length < max_length
  leaves room for the response.
- invalid records (a malformed line, a missing field, an empty prompt or response, chosen identical
  to rejected) stop the run with an error naming the file, line (or record index) and field; with
  `on_invalid = "skip"` they are skipped and counted.

TIS-DPO's per-token weights travel with the records (`chosen_weight`/`rejected_weight`, one number per
response token under the tokenizer and max_length they were scored with; `tokenratio tisdpo` writes
them) into `PreferenceBatch.weights`.
"""

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenratio.formats import TEMPLATED, WEIGHT_FIELDS, RecordError, detect_format, to_text
from tokenratio.jsonlines import is_json_array, read_records
from tokenratio.logprobs import IGNORE_INDEX

JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


class DataError(ValueError):
    """Bad input data; the message names the file, the line or record, and the field."""


@dataclass
class PreferenceBatch:
    """A collated batch of B pairs as 2B rows: rows [0, B) chosen, rows [B, 2B) rejected.

    Fields:
        input_ids: (2B, L) int64, prompt then response, right-padded.
        attention_mask: (2B, L) int64, 1 on real tokens.
        positions: (2B, T) int64, index into L of the hidden state whose logits predict response
            token j (prompt_length + j - 1); 0 where there is no token j.
        labels: (2B, T) int64, response token j of each row, IGNORE_INDEX beyond the response.
        weights: (2B, T) float32 or None, TIS-DPO's weight of response token j, 0 beyond the
            response; None when the data carries no weights.
        segments: None, or in the prefix-shared layout (`collate_shared`) (B, L) int64: 0 prompt,
            1 chosen, 2 rejected, 3 padding. Then the batch has B input rows, each prompt + chosen
            + rejected, and `positions` index into row `source_rows[i]` of the 2B output rows.
        position_ids: (B, L) int64 in the prefix-shared layout (the rejected response restarts
            after the prompt), else None (0..L-1).
        source_rows: (2B,) int64 in the prefix-shared layout: the input row of each output row.
        ref_logps: (2B, T) float32 or None: the reference's log-prob of each response token, from
            the cache (`reference.CachedValues.fill`, train.ref_cache), 0 beyond the response.
        ref_sample_tokens, ref_sample_logps: (2B, T) int64 and float32, or None: the cache's token
            a ~ pi_ref at each response position and log pi_ref(a) (TBPO-A's k3), IGNORE_INDEX
            and 0 beyond the response.
        real_tokens: the pairs' tokens as two rows each would hold them (prompt counted once per
            side, padding not): counted on the CPU when collated, so reading it never waits for
            the device.
    Response-aligned: column j of `labels` is response token j of every row (the loss contract).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    positions: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor | None = None
    segments: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    source_rows: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None
    ref_sample_tokens: torch.Tensor | None = None
    ref_sample_logps: torch.Tensor | None = None
    real_tokens: int = 0

    @property
    def num_pairs(self) -> int:
        return self.labels.shape[0] // 2

    def to(self, device, non_blocking: bool = False) -> "PreferenceBatch":
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device, non_blocking=non_blocking)
            return value

        return PreferenceBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def _scan_json_array(path: Path) -> list[int]:
    """A JSON array file: one record per element (numbered from 1), or DataError."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8-sig") as handle:
            return list(range(1, len(json.load(handle)) + 1))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise DataError(f"{path}: invalid JSON: {err}") from None


@dataclass
class RawData:
    """Records as a `datasets.Dataset`, with where each came from for error messages."""

    dataset: object
    source: str
    lines: list[int] | None  # line number of record i, for JSON-lines files
    skipped: list = field(default_factory=list)  # (reason, where) of lines skipped while reading

    def select(self, indices) -> "RawData":
        """The records at `indices`, in that order (their line numbers kept)."""
        indices = [int(i) for i in indices]
        lines = None if self.lines is None else [self.lines[i] for i in indices]
        return RawData(self.dataset.select(indices), self.source, lines, self.skipped)

    def where(self, index: int) -> str:
        if self.lines is not None and index < len(self.lines):
            return f"{self.source}, line {self.lines[index]}"
        return f"{self.source}, record {index}"


def load_raw(
    path: str,
    split: str = "train",
    limit: int | None = None,
    on_invalid: str = "error",
    fmt: str = "auto",
) -> RawData:
    """Load preference records from a local file, a local directory or a hub dataset name.
    JSON-lines files are read line by line (jsonlines.py): a broken line stops the load with its
    file, line and reason, or with on_invalid="skip" is skipped and counted in RawData.skipped."""
    import datasets

    local = Path(path)
    lines, skipped = None, []
    if local.is_file() and local.name.endswith(JSON_SUFFIXES) and not is_json_array(local):
        records, lines, skipped = read_records(local, fmt, on_invalid, DataError, limit)
        dataset = _arrow(records, local)
    elif local.is_file() and local.name.endswith(JSON_SUFFIXES):
        lines = _scan_json_array(local)
        dataset = datasets.load_dataset("json", data_files=str(local), split="train")
    elif local.is_file() and local.suffix in (".parquet", ".csv"):
        dataset = datasets.load_dataset(local.suffix[1:], data_files=str(local), split="train")
    elif local.is_file():
        raise DataError(
            f"{path}: a {local.suffix or 'suffix-less'} file is not a format tokenratio reads: "
            "use JSON lines (.jsonl, .jsonl.gz), a JSON array (.json), Parquet (.parquet), CSV "
            "(.csv) or a directory that `datasets` loads"
        )
    elif local.is_dir() and (local / "dataset_info.json").exists():
        dataset = datasets.load_from_disk(str(local))
    elif local.is_dir():
        dataset = datasets.load_dataset(str(local))  # every split: a missing one is named below
    elif local.suffix or "/" not in path or path.startswith((".", "/")):
        raise DataError(f"{path}: no such file or directory")
    else:
        dataset = datasets.load_dataset(path, split=split)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(
                f"{path}: no split {split!r}, it has {sorted(dataset)}: choose one with "
                "data.split (train) or --split (eval)"
            )
        dataset = dataset[split]
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    if len(dataset) == 0:
        reasons = (
            f" ({len(skipped)} invalid: {_reasons(skipped)}; first: {skipped[0][1]})"
            if skipped
            else ""
        )
        raise DataError(f"{path}: no usable records{reasons}")
    return RawData(dataset, str(path), lines, skipped)


def _arrow(records: list[dict], path: Path):
    import datasets
    import pyarrow

    try:
        return datasets.Dataset.from_list(records)
    except (pyarrow.ArrowInvalid, pyarrow.ArrowTypeError, TypeError) as err:
        raise DataError(
            f"{path}: records give one field different types ({err}); e.g. text in some records "
            "and message lists in others: keep one shape per file"
        ) from None


def _reasons(skipped: list) -> str:
    counts = Counter(reason for reason, _ in skipped)
    return ", ".join(f"{n} {reason}" for reason, n in counts.most_common())


def _token_weights(record: dict, field: str, kept: int, full: int) -> list[float]:
    """A record's per-token weights for a response of `full` tokens of which `kept` survive the
    length policy: at least `kept` and at most `full` finite numbers >= 0, cut to `kept`."""
    values = record.get(field)
    if not isinstance(values, list) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    ):
        raise RecordError(field, f"expected a list of numbers, got {values!r:.60}")
    if not kept <= len(values) <= full:
        raise RecordError(
            field,
            f"{len(values)} weights for a response of {full} tokens ({kept} kept): the weights were "
            "scored with another tokenizer or data.max_length; score again with `tokenratio tisdpo`",
        )
    if not all(0 <= v < float("inf") for v in values):
        raise RecordError(field, "weights must be finite and >= 0")
    return [float(v) for v in values[:kept]]


CHARS_PER_TOKEN = 256  # more than any token of a real vocabulary spans


def tokenize_record(
    record: dict,
    fmt: str,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    with_weights: bool = False,
    swap: bool = False,
):
    """Text -> token ids with the length policy. Raises RecordError for invalid records.

    with_weights: also carry the record's TIS-DPO weights, cut like the responses. swap: exchange
    chosen and rejected (and their weights), to train on flipped preferences.
    """
    prompt, chosen, rejected = to_text(record, fmt, tokenizer)
    templated = fmt in TEMPLATED or isinstance(record.get("prompt"), list)
    # Text far beyond what the length policy keeps is cut before tokenizing (an enormous record
    # would otherwise cost gigabytes): CHARS_PER_TOKEN characters a kept token, so the cut lies
    # beyond every kept token and changes none of them.
    limit = CHARS_PER_TOKEN * max_length
    prompt_ids = tokenizer(prompt[-limit:], add_special_tokens=not templated)["input_ids"]
    if not prompt_ids:  # the first response token needs a hidden state to be predicted from
        raise RecordError("prompt", "empty prompt (and the tokenizer adds no BOS token)")
    prompt_truncated = len(prompt_ids) > max_prompt_length
    prompt_ids = prompt_ids[-max_prompt_length:]
    budget = max_length - len(prompt_ids)
    out = {"prompt_ids": prompt_ids, "prompt_truncated": prompt_truncated, "truncated": False}
    sides = [("chosen", chosen, "chosen"), ("rejected", rejected, "rejected")]
    if swap:
        sides = [("chosen", rejected, "rejected"), ("rejected", chosen, "chosen")]
    for name, text, source in sides:
        ids = tokenizer(text[:limit], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None and len(text) <= limit:
            ids = [*ids, tokenizer.eos_token_id]
        out["truncated"] |= len(ids) > budget or len(text) > limit
        out[f"{name}_ids"] = ids[:budget]
        if with_weights:
            kept = len(out[f"{name}_ids"])
            full = len(ids) if len(text) <= limit else float("inf")  # cut: its length unknown
            out[f"{name}_weight"] = _token_weights(record, f"{source}_weight", kept, full)
    if out["chosen_ids"] == out["rejected_ids"]:
        raise RecordError("rejected", "identical to chosen after tokenization and truncation")
    return out


def uses_chat_template(cfg, tokenizer, fmt: str) -> bool:
    """Whether HH dialogues are rendered with the chat template: data.chat_template, or when it is
    unset (None), whenever the tokenizer has one. Other formats decide by their own shape."""
    if fmt != "hh":
        return False
    has = bool(getattr(tokenizer, "chat_template", None))
    wanted = has if cfg.chat_template is None else cfg.chat_template
    if wanted and not has:
        raise DataError("data.chat_template = true, but the tokenizer has no chat template")
    return wanted


def tokenize_dataset(raw: RawData, tokenizer, cfg) -> tuple[object, dict]:
    """Tokenize every record once (cached by `datasets`), applying the validation policy.

    Args:
        raw: records from `load_raw`.
        tokenizer: a Hugging Face tokenizer.
        cfg: a DataConfig.

    Returns:
        (dataset with prompt_ids/chosen_ids/rejected_ids and `record`, the index of the source
        record; counts: records, invalid, truncated, prompt_truncated).
    """
    first = raw.dataset[0]
    try:
        fmt = cfg.format if cfg.format != "auto" else detect_format(first)
    except RecordError as err:
        raise DataError(f"{raw.where(0)}: {err}") from None
    chat = uses_chat_template(cfg, tokenizer, fmt)
    fmt = "hh-chat" if chat else fmt
    if cfg.max_prompt_length >= cfg.max_length:
        raise DataError(
            f"data.max_prompt_length ({cfg.max_prompt_length}) must be below data.max_length "
            f"({cfg.max_length})"
        )
    present = [f for f in WEIGHT_FIELDS if f in raw.dataset.column_names]
    if len(present) == 1:
        raise DataError(f"{raw.source}: has '{present[0]}' but not its twin; score both responses")
    with_weights = bool(present)

    def convert(record, index):
        try:
            out = tokenize_record(
                record,
                fmt,
                tokenizer,
                cfg.max_length,
                cfg.max_prompt_length,
                with_weights=with_weights,
                swap=cfg.swap_preferences,
            )
            return {**out, "error": "", "reason": "", "record": index}
        except RecordError as err:
            message = f"{raw.where(index)}: {err}"
            if cfg.on_invalid == "error":
                raise DataError(
                    f"{message} (set data.on_invalid=skip to skip and count invalid records)"
                ) from None
            empty = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
            if with_weights:
                empty.update(chosen_weight=[], rejected_weight=[])
            return {
                **empty,
                "truncated": False,
                "prompt_truncated": False,
                "error": message,
                "reason": err.reason,
                "record": index,
            }

    tokenized = raw.dataset.map(
        convert,
        with_indices=True,
        remove_columns=raw.dataset.column_names,
        desc=f"tokenizing ({fmt})",
    )
    invalid = raw.skipped + [
        (r, e) for r, e in zip(tokenized["reason"], tokenized["error"], strict=True) if e
    ]
    counts = {
        "format": fmt,
        "chat_template": chat or fmt in TEMPLATED,
        "records": len(tokenized) + len(raw.skipped),
        "invalid": len(invalid),
        "truncated": int(sum(tokenized["truncated"])),
        "prompt_truncated": int(sum(tokenized["prompt_truncated"])),
        "first_invalid": [where for _, where in invalid[:3]],
        **invalid_by_reason(invalid),
    }
    valid = tokenized.filter(lambda e: not e, input_columns="error")
    if len(valid) == 0:
        raise DataError(f"{raw.source}: no valid records ({counts['invalid']} invalid)")
    return valid.remove_columns(["error", "reason", "truncated", "prompt_truncated"]), counts


def invalid_by_reason(invalid: list[tuple[str, str]], examples: int = 3) -> dict:
    """data_report.json's audit of skipped records: a count per reason, and the first few
    'file, line N: ...' of each."""
    by_reason: dict[str, list[str]] = {}
    for reason, where in invalid:
        by_reason.setdefault(reason, []).append(where)
    ordered = sorted(by_reason.items(), key=lambda item: -len(item[1]))
    return {
        "invalid_by_reason": {reason: len(found) for reason, found in ordered},
        "invalid_examples": {reason: found[:examples] for reason, found in ordered},
    }


def length_grouped_order(lengths: list[int], batch_size: int, seed: int, window: int = 50) -> list:
    """A shuffled order of the pairs in which consecutive runs of `batch_size` have similar
    lengths: windows of `window` batches, each sorted by length and cut into batches, which are
    then shuffled. Which pairs share a window is random, and so is the order of the batches;
    padding shrinks inside each batch.
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=generator).tolist()
    size = batch_size * window
    batches = []
    for start in range(0, len(order), size):
        ranked = sorted(order[start : start + size], key=lambda i: -lengths[i])
        batches += [ranked[i : i + batch_size] for i in range(0, len(ranked), batch_size)]
    short = batches.pop() if batches and len(batches[-1]) < batch_size else []
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [i for b in shuffled for i in batches[b]] + short  # a short batch stays last


def pair_lengths(dataset, shared: bool = False) -> list[int]:
    """Each pair's longest row in tokens: prompt plus its longer response, or with `shared`
    (`collate_shared`'s layout) prompt plus both responses."""
    # all three columns in one read: `dataset[name]` iterates row by row (16 s at 50k pairs)
    columns = dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
    columns = columns.with_format(None)[:]
    return [
        len(p) + (len(c) + len(r) if shared else max(len(c), len(r)))
        for p, c, r in zip(
            columns["prompt_ids"], columns["chosen_ids"], columns["rejected_ids"], strict=True
        )
    ]


def collate(examples: list[dict], pad_token_id: int) -> PreferenceBatch:
    """Pairs -> one PreferenceBatch of 2B right-padded rows (chosen rows first)."""
    rows = [(e["prompt_ids"], e["chosen_ids"]) for e in examples]
    rows += [(e["prompt_ids"], e["rejected_ids"]) for e in examples]
    batch = collate_rows(rows, pad_token_id)
    _collate_token_values(batch, examples)
    return batch


TOKEN_VALUES = {  # batch field: the (chosen, rejected) per-token fields of a pair that fill it
    "weights": ("chosen_weight", "rejected_weight"),  # TIS-DPO
}


def _collate_token_values(batch: PreferenceBatch, examples: list[dict]) -> None:
    """Per-token values the pairs carry -> (2B, T) float32 batch fields, chosen rows first, 0
    beyond each response; fields the data does not carry stay None."""
    for name, (chosen, rejected) in TOKEN_VALUES.items():
        if chosen not in examples[0]:
            continue
        rows = [e[chosen] for e in examples] + [e[rejected] for e in examples]
        values = torch.zeros(batch.labels.shape, dtype=torch.float32)
        for i, row in enumerate(rows):
            values[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
        setattr(batch, name, values)


def collate_rows(rows: list[tuple[list[int], list[int]]], pad_token_id: int) -> PreferenceBatch:
    """(prompt ids, response ids) rows -> right-padded, response-aligned tensors (any row count)."""
    L = max(len(p) + len(r) for p, r in rows)
    T = max(1, max(len(r) for _, r in rows))
    n = len(rows)
    input_ids = torch.full((n, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, L), dtype=torch.long)
    positions = torch.zeros((n, T), dtype=torch.long)
    labels = torch.full((n, T), IGNORE_INDEX, dtype=torch.long)
    for i, (prompt, response) in enumerate(rows):
        ids = list(prompt) + list(response)
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        positions[i, : len(response)] = torch.arange(len(response)) + len(prompt) - 1
        labels[i, : len(response)] = torch.tensor(response, dtype=torch.long)
    real_tokens = sum(len(p) + len(r) for p, r in rows)
    return PreferenceBatch(input_ids, attention_mask, positions, labels, real_tokens=real_tokens)


def collate_shared(examples: list[dict], pad_token_id: int) -> PreferenceBatch:
    """Pairs -> the prefix-shared layout (docs/method.md, "Prefix sharing"): one row per pair,
    prompt + chosen + rejected, so the prompt is computed once for both responses. The rejected
    response sees the prompt but not the chosen one (`segments`, turned into an attention mask
    by `modeling.response_logits`) and its position ids restart after the prompt, so every
    response token gets exactly the logits it gets in its own row of `collate`.
    """
    B = len(examples)
    sides = [(e["prompt_ids"], e["chosen_ids"], e["rejected_ids"]) for e in examples]
    L = max(len(p) + len(c) + len(r) for p, c, r in sides)
    T = max(1, max(max(len(c), len(r)) for _, c, r in sides))
    input_ids = torch.full((B, L), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((B, L), dtype=torch.long)
    segments = torch.full((B, L), 3, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    positions = torch.zeros((2 * B, T), dtype=torch.long)
    labels = torch.full((2 * B, T), IGNORE_INDEX, dtype=torch.long)
    for b, (prompt, chosen, rejected) in enumerate(sides):
        P, C, R = len(prompt), len(chosen), len(rejected)
        input_ids[b, : P + C + R] = torch.tensor([*prompt, *chosen, *rejected])
        attention_mask[b, : P + C + R] = 1
        segments[b, : P + C + R] = torch.tensor([0] * P + [1] * C + [2] * R)
        position_ids[b, : P + C + R] = torch.cat([torch.arange(P + C), torch.arange(P, P + R)])
        positions[b, :C] = torch.arange(C) + P - 1
        # rejected token 0 is predicted from the prompt's last token, token j > 0 from its own j - 1
        positions[B + b, :R] = torch.cat([torch.tensor([P - 1]), torch.arange(1, R) + P + C - 1])[
            :R
        ]
        labels[b, :C] = torch.tensor(chosen, dtype=torch.long)
        labels[B + b, :R] = torch.tensor(rejected, dtype=torch.long)
    batch = PreferenceBatch(
        input_ids,
        attention_mask,
        positions,
        labels,
        segments=segments,
        position_ids=position_ids,
        source_rows=torch.arange(2 * B) % B,
        real_tokens=sum(2 * len(p) + len(c) + len(r) for p, c, r in sides),
    )
    _collate_token_values(batch, examples)
    return batch
