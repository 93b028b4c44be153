"""Preference data: load through `datasets`, validate, tokenize once (cached).

PreferenceExample (text) -> tokenize -> {prompt_ids, chosen_ids, rejected_ids}; batch.py collates
those into the PreferenceBatch the model side reads.

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
them) into `batch.PreferenceBatch.weights`.
"""

import gzip
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tokenratio.formats import (
    TEMPLATED,
    WEIGHT_FIELDS,
    RecordError,
    detect_format,
    pair_weight,
    to_text,
)
from tokenratio.jsonlines import is_json_array, read_records

JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz")


class DataError(ValueError):
    """Bad input data; the message names the file, the line or record, and the field."""


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
    keep: tuple[str, ...] = (),
) -> RawData:
    """Load preference records from a local file, a local directory or a hub dataset name.
    JSON-lines files are read line by line (jsonlines.py): a broken line stops the load with its
    file, line and reason, or with on_invalid="skip" is skipped and counted in RawData.skipped.
    `keep`: fields to keep beside those a format reads (data.pair_weight_field)."""
    import datasets

    local = Path(path)
    lines, skipped = None, []
    if local.is_file() and local.name.endswith(JSON_SUFFIXES) and not is_json_array(local):
        records, lines, skipped = read_records(local, fmt, on_invalid, DataError, limit, keep)
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

    fields = {key: None for record in records for key in record}  # Arrow takes the first's keys
    try:
        return datasets.Dataset.from_list([{**fields, **record} for record in records])
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
    pair_weight_field: str | None = None,
):
    """Text -> token ids with the length policy. Raises RecordError for invalid records.

    with_weights: also carry the record's TIS-DPO weights, cut like the responses. swap: exchange
    chosen and rejected (and their weights), to train on flipped preferences. pair_weight_field:
    the record's field holding its loss weight, carried as "pair_weight" (`pair_weight`).
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
    if pair_weight_field is not None:
        out["pair_weight"] = pair_weight(record.get(pair_weight_field), pair_weight_field)
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


def _reading_plan(raw: RawData, tokenizer, cfg) -> tuple[str, bool, bool]:
    """(the records' format, whether the chat template renders them, whether they carry
    TIS-DPO weights), with the settings checked before any record is tokenized."""
    try:
        fmt = cfg.format if cfg.format != "auto" else detect_format(raw.dataset[0])
    except RecordError as err:
        raise DataError(f"{raw.where(0)}: {err}") from None
    chat = uses_chat_template(cfg, tokenizer, fmt)
    if cfg.max_prompt_length >= cfg.max_length:
        raise DataError(
            f"data.max_prompt_length ({cfg.max_prompt_length}) must be below data.max_length "
            f"({cfg.max_length})"
        )
    present = [f for f in WEIGHT_FIELDS if f in raw.dataset.column_names]
    if len(present) == 1:
        raise DataError(f"{raw.source}: has '{present[0]}' but not its twin; score both responses")
    return ("hh-chat" if chat else fmt), chat, bool(present)


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
    fmt, chat, with_weights = _reading_plan(raw, tokenizer, cfg)
    field = cfg.pair_weight_field
    weighted = field if field and field in raw.dataset.column_names else None

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
                pair_weight_field=weighted,
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
            if weighted:
                empty["pair_weight"] = 0.0
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
        "pair_weights": weighted,
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


def data_line(report: dict) -> str:
    """The data report in one line for a person: records, format, the split, what was cut and
    what was skipped, by reason (the whole report stays in data_report.json)."""
    template = ", chat template" if report.get("chat_template") else ""
    parts = [f"{report['records']} records ({report['format']}{template})"]
    if "train_pairs" in report:
        parts.append(f"{report['train_pairs']} train / {report['heldout_pairs']} held-out pairs")
    cut = [
        f"{report[key]} {what}"
        for key, what in (("truncated", "responses cut"), ("prompt_truncated", "prompts cut"))
        if report.get(key)
    ]
    if cut:
        parts.append(" and ".join(cut) + " to fit data.max_length / max_prompt_length")
    reasons = report.get("invalid_by_reason") or {}
    if reasons:
        counted = ", ".join(f"{n} {reason}" for reason, n in reasons.items())
        examples = report.get("invalid_examples", {})
        first = next(iter(examples.values()), [""])[0]
        parts.append(f"{report['invalid']} invalid skipped ({counted}; first: {first})")
    return "; ".join(parts)


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
