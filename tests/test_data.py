"""Data loading, validation errors (real HH-RLHF rows and broken copies), collation."""

import copy
import json
from dataclasses import replace

import pytest

from tiny import hh_records
from tokenratio.batch import collate
from tokenratio.config import DataConfig
from tokenratio.data import DataError, load_raw, tokenize_dataset
from tokenratio.formats import to_text
from tokenratio.logprobs import IGNORE_INDEX


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


CFG = DataConfig(path="x", max_length=1024, max_prompt_length=768, chat_template=False)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_real_rows_tokenize_with_masks_and_counts(tmp_path, tokenizer):
    raw = load_raw(str(write_jsonl(tmp_path / "hh.jsonl", hh_records(20))))
    data, report = tokenize_dataset(raw, tokenizer, CFG)
    assert report["format"] == "hh" and report["records"] == 20 and report["invalid"] == 0
    assert len(data) == 20
    row = data[0]
    prompt, chosen, _ = to_text(hh_records(1)[0], "hh")
    assert tokenizer.decode(row["chosen_ids"][:-1]) == chosen  # response text, then EOS
    assert row["chosen_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(row["prompt_ids"], skip_special_tokens=True) == prompt


def test_hh_renders_with_the_chat_template_by_default_when_the_tokenizer_has_one(
    tmp_path, tokenizer
):
    record = {
        "chosen": "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: a joke?\n\nAssistant: no",
        "rejected": "\n\nHuman: hi there\n\nAssistant: hello!\n\nHuman: a joke?\n\nAssistant: ok: ...",
    }
    raw = load_raw(str(write_jsonl(tmp_path / "hh.jsonl", [record])))
    data, report = tokenize_dataset(raw, tokenizer, replace(CFG, chat_template=None))
    assert report["format"] == "hh-chat" and report["chat_template"] is True
    messages = [
        {"role": "user", "content": "hi there"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "a joke?"},
    ]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert expected == "<|user|>hi there</s><|assistant|>hello!</s><|user|>a joke?</s><|assistant|>"
    row = data[0]
    assert row["prompt_ids"] == tokenizer(expected, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(row["chosen_ids"]) == "no</s></s>"  # the turn's end, then EOS
    assert tokenizer.decode(row["rejected_ids"]) == "ok: ...</s></s>"
    _, raw_report = tokenize_dataset(raw, tokenizer, CFG)  # chat_template = false: raw text
    assert raw_report["format"] == "hh" and raw_report["chat_template"] is False
    tokenizer_without = copy.copy(tokenizer)
    tokenizer_without.chat_template = None
    _, plain = tokenize_dataset(raw, tokenizer_without, replace(CFG, chat_template=None))
    assert plain["format"] == "hh"
    with pytest.raises(DataError, match="the tokenizer has no chat template"):
        tokenize_dataset(raw, tokenizer_without, replace(CFG, chat_template=True))


def replace_line(lines, index, text):
    return [*lines[:index], text + "\n", *lines[index + 1 :]]


def same_twice(line):
    """The record's chosen dialogue as both chosen and rejected."""
    chosen = json.loads(line)["chosen"]
    return json.dumps({"chosen": chosen, "rejected": chosen})


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda lines: replace_line(lines, 2, '{"chosen": "oops"'), r"line 3: malformed JSON"),
        (
            lambda lines: replace_line(lines, 4, json.dumps({"chosen": "x"})),
            r"line 5: field 'rejected': missing",
        ),
        (
            lambda lines: replace_line(lines, 1, same_twice(lines[1])),
            r"line 2: field 'rejected': identical to chosen",
        ),
    ],
)
def test_broken_copies_of_real_rows_fail_with_file_line_and_field(
    tmp_path, tokenizer, breakage, expected
):
    lines = [json.dumps(r) + "\n" for r in hh_records(8)]
    path = tmp_path / "broken.jsonl"
    path.write_text("".join(breakage(lines)))
    with pytest.raises(DataError, match=expected) as err:
        tokenize_dataset(load_raw(str(path)), tokenizer, CFG)
    assert str(path) in str(err.value)


def test_empty_response_errors_long_prompts_are_cut_and_skips_are_counted(tmp_path, tokenizer):
    """A prompt longer than max_length is cut to its last max_prompt_length tokens, not dropped
    (an earlier version dropped it: 28 of 2,000 HH pairs at max_length 512)."""
    records = hh_records(10)
    records[3] = {
        **records[3],
        "chosen": records[3]["chosen"].rsplit("Assistant:", 1)[0] + "Assistant:   ",
    }
    path = write_jsonl(tmp_path / "hh.jsonl", records)
    with pytest.raises(DataError, match=r"line 4: field 'chosen': empty response"):
        tokenize_dataset(load_raw(str(path)), tokenizer, CFG)
    skip = DataConfig(path="x", max_length=48, max_prompt_length=32, on_invalid="skip")
    data, report = tokenize_dataset(load_raw(str(path)), tokenizer, skip)
    assert report["invalid"] == 1 and len(data) == 9  # only the empty response
    assert any("line 4" in message for message in report["first_invalid"])
    assert report["prompt_truncated"] >= 5  # HH prompts are far longer than 48 tokens
    assert all(len(r["prompt_ids"]) <= 32 for r in data)
    assert all(len(r["prompt_ids"]) + len(r["chosen_ids"]) <= 48 for r in data)


def test_missing_file_and_gzip_and_parquet(tmp_path, tokenizer):
    with pytest.raises(DataError, match="no such file"):
        load_raw(str(tmp_path / "nope.jsonl"))
    import gzip

    gz = tmp_path / "hh.jsonl.gz"
    with gzip.open(gz, "wt") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in hh_records(5)))
    assert len(load_raw(str(gz)).dataset) == 5
    import datasets

    parquet = tmp_path / "hh.parquet"
    datasets.Dataset.from_list(hh_records(6)).to_parquet(str(parquet))
    assert len(load_raw(str(parquet)).dataset) == 6
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(hh_records(7)).save_to_disk(str(saved))
    assert len(load_raw(str(saved)).dataset) == 7


def weighted(records, tokenizer, cfg=CFG):
    """The records with one weight per response token (0.5, 1.5, 2.5, ...), as tokenized under cfg."""
    data, _ = tokenize_dataset(load_raw_list(records), tokenizer, cfg)
    out = []
    for record, row in zip(records, data, strict=True):
        out.append(
            {
                **record,
                "chosen_weight": [0.5 + t for t in range(len(row["chosen_ids"]))],
                "rejected_weight": [0.25] * len(row["rejected_ids"]),
            }
        )
    return out


def load_raw_list(records):
    import datasets

    from tokenratio.data import RawData

    return RawData(datasets.Dataset.from_list(records), "records", None)


def test_tisdpo_weights_travel_to_the_batch_and_swap_with_the_responses(tmp_path, tokenizer):
    records = weighted(hh_records(4), tokenizer)
    data, _ = tokenize_dataset(
        load_raw(str(write_jsonl(tmp_path / "w.jsonl", records))), tokenizer, CFG
    )
    assert data[0]["chosen_weight"] == records[0]["chosen_weight"]
    batch = collate([data[i] for i in range(4)], tokenizer.pad_token_id)
    assert batch.weights.shape == batch.labels.shape  # (2B, T), response-aligned
    n = len(data[1]["chosen_ids"])
    assert batch.weights[1, :n].tolist() == [0.5 + t for t in range(n)]
    assert (batch.weights[batch.labels == IGNORE_INDEX] == 0).all()
    assert (batch.weights[4:][batch.labels[4:] != IGNORE_INDEX] == 0.25).all()
    swapped, _ = tokenize_dataset(
        load_raw(str(tmp_path / "w.jsonl")), tokenizer, replace(CFG, swap_preferences=True)
    )
    assert swapped[0]["chosen_ids"] == data[0]["rejected_ids"]
    assert swapped[0]["chosen_weight"] == data[0]["rejected_weight"]
    assert collate([data[0]], tokenizer.pad_token_id).weights is not None
    plain, _ = tokenize_dataset(load_raw_list(hh_records(2)), tokenizer, CFG)
    assert collate([plain[0]], tokenizer.pad_token_id).weights is None


def test_tisdpo_weights_cut_with_the_response_and_mismatches_name_the_field(tmp_path, tokenizer):
    records = weighted(hh_records(6), tokenizer)
    short = DataConfig(path="x", max_length=96, max_prompt_length=64, on_invalid="skip")
    data, _ = tokenize_dataset(load_raw_list(records), tokenizer, short)
    assert all(len(r["chosen_weight"]) == len(r["chosen_ids"]) for r in data)
    broken = [dict(r) for r in records]
    broken[2]["rejected_weight"] = broken[2]["rejected_weight"][:-1]  # one weight missing
    path = write_jsonl(tmp_path / "broken.jsonl", broken)
    with pytest.raises(DataError, match=r"line 3: field 'rejected_weight': \d+ weights for a"):
        tokenize_dataset(load_raw(str(path)), tokenizer, CFG)
    broken[2] = {**records[2], "chosen_weight": [-1.0] * len(records[2]["chosen_weight"])}
    with pytest.raises(DataError, match=r"line 3: field 'chosen_weight': .*>= 0"):
        tokenize_dataset(load_raw(str(write_jsonl(path, broken))), tokenizer, CFG)
    lonely = [{k: v for k, v in r.items() if k != "rejected_weight"} for r in records]
    with pytest.raises(DataError, match="not its twin"):
        tokenize_dataset(load_raw_list(lonely), tokenizer, CFG)


def test_cutting_text_before_tokenizing_keeps_every_kept_token(tiny_model_dir, monkeypatch):
    from transformers import AutoTokenizer

    from tokenratio import data

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    record = {"prompt": "Hi there. " * 3000, "chosen": " yes sir" * 5000, "rejected": " no" * 9000}
    cut = data.tokenize_record(record, "trl", tokenizer, 64, 32)
    monkeypatch.setattr(data, "CHARS_PER_TOKEN", 10**9)  # no cut: the whole text tokenized
    whole = data.tokenize_record(record, "trl", tokenizer, 64, 32)
    assert cut == whole and cut["truncated"] and cut["prompt_truncated"]


@pytest.mark.slow
def test_one_enormous_line_is_skipped_in_bounded_memory(tiny_model_dir, hh_jsonl, tmp_path):
    """A 120 MB `chosen` response among real records: read past, counted, and the process stays
    far below what tokenizing it would take (21.6 GiB before)."""
    import subprocess
    import sys

    lines = hh_jsonl.read_text().splitlines()[:20]
    huge = json.dumps({"chosen": "Human: hi\n\nAssistant: " + "a" * (120 << 20), "rejected": "x"})
    path = tmp_path / "huge.jsonl"
    path.write_text("\n".join([*lines[:10], huge, *lines[10:]]) + "\n")
    script = (
        "import json\n"
        "from transformers import AutoTokenizer\n"
        "from tokenratio.config import DataConfig\n"
        "from tokenratio.data import load_raw, tokenize_dataset\n"
        f"raw = load_raw({str(path)!r}, on_invalid='skip')\n"
        f"tok = AutoTokenizer.from_pretrained({str(tiny_model_dir)!r})\n"
        f"data, report = tokenize_dataset(raw, tok, DataConfig(path={str(path)!r}, on_invalid='skip'))\n"
        "status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
        "peak = int(status.split()[0]) / 1024  # this process's own peak (ru_maxrss outlives exec)\n"
        "print(json.dumps({'rows': len(data), 'report': report, 'peak_mib': peak}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["rows"] == 20
    assert "line too long" in json.dumps(result["report"])
    assert result["peak_mib"] < 1024, result["peak_mib"]


def test_csv_files_load_and_other_file_types_are_named(tmp_path):
    import csv

    from tokenratio.data import DataError, load_raw

    path = tmp_path / "pairs.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["prompt", "chosen", "rejected"])
        writer.writeheader()
        writer.writerow({"prompt": "Hi?", "chosen": " Hello.", "rejected": " Go away."})
    assert load_raw(str(path)).dataset[0]["chosen"] == " Hello."
    other = tmp_path / "pairs.tsv"
    other.write_text("a\tb\n")
    with pytest.raises(
        DataError, match=r"pairs.tsv: a \.tsv file is not a format tokenratio reads"
    ):
        load_raw(str(other))


def test_a_directory_split_is_chosen_by_name_and_a_missing_one_lists_the_others(tmp_path):
    from tokenratio.data import DataError, load_raw

    (tmp_path / "test.jsonl").write_text(json.dumps(hh_records(1)[0]) + "\n")
    assert len(load_raw(str(tmp_path), split="test").dataset) == 1
    with pytest.raises(DataError, match=r"no split 'train', it has \['test'\]"):
        load_raw(str(tmp_path))


def test_an_unknown_format_lists_the_formats_even_when_skipped(tmp_path):
    from tokenratio.data import DataError, load_raw

    path = tmp_path / "unknown.jsonl"
    path.write_text('{"question": "a", "answer": "b"}\n')
    with pytest.raises(DataError) as err:
        load_raw(str(path), on_invalid="skip")
    assert "prompt/chosen/rejected" in str(err.value) and "line 1" in str(err.value)
