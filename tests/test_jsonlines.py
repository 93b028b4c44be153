"""Fuzzed JSON-lines files: every planted fault is skipped and counted under its reason, no valid
record is dropped and no broken one accepted; with on_invalid = "error" the first fault stops the
run naming file and line. (tokenratio.jsonlines, through data.load_raw and tokenize_dataset.)"""

import json
import random
from collections import Counter

import pytest

from tiny import hh_records
from tokenratio.config import DataConfig
from tokenratio.data import DataError, load_raw, tokenize_dataset
from tokenratio.formats import RecordError, to_text

CFG = DataConfig(path="x", max_length=1024, max_prompt_length=768, on_invalid="skip")


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def usable(record, tokenizer) -> bool:
    try:
        prompt, chosen, rejected = to_text(record, "hh")
    except RecordError:
        return False
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in (chosen, rejected)]
    return ids[0] != ids[1] and len(tokenizer(prompt)["input_ids"]) + max(map(len, ids)) < 1024


def short_records(n: int) -> list[dict]:
    """Short HH dialogues (tokenizing 10,000 real ones would take most of this test's time)."""
    return [
        {
            "chosen": f"\n\nHuman: question {i}?\n\nAssistant: answer {i}, gladly.",
            "rejected": f"\n\nHuman: question {i}?\n\nAssistant: no {i}.",
        }
        for i in range(n)
    ]


def line(record) -> bytes:
    return json.dumps(record).encode() + b"\n"


def hh_faults(good: dict) -> dict[str, list[bytes]]:
    """Broken variants of one good record, by the reason they must be counted under."""
    text = line(good)
    empty = {**good, "chosen": good["chosen"].rsplit("Assistant:", 1)[0] + "Assistant:  "}
    return {
        "malformed JSON": [b'{"chosen": "oops"\n', text[: len(text) // 2] + b"\n", b"{,}\n"],
        "not a JSON object": [b"null\n", b"[1, 2, 3]\n", b"42\n", b'"just text"\n', b"true\n"],
        "not UTF-8": [text.replace(b'"chosen": "', b'"chosen": "\xff\xfe', 1)],
        "lone surrogate": [text.replace(b'"chosen": "', b'"chosen": "\\ud800', 1)],
        "nested too deeply": [b"[" * 200_000 + b"]" * 200_000 + b"\n"],
        "chosen: not a str": [
            line({**good, "chosen": 7}),
            line({**good, "chosen": ["a"]}),
            line({**good, "chosen": False}),
        ],
        "chosen: missing": [line({**good, "chosen": None}), line({"rejected": good["rejected"]})],
        "rejected: missing": [line({"chosen": good["chosen"]})],
        "chosen: empty response": [line(empty)],
        "rejected: identical to chosen": [line({**good, "rejected": good["chosen"]})],
        "chosen: no shared 'Assistant:' turn before the responses": [
            line({"chosen": "hello there", "rejected": "hello you"})
        ],
    }


def test_a_fuzzed_10000_line_file_is_skipped_and_counted_by_reason(tokenizer, tmp_path):
    rng = random.Random(0)
    pool = [r for r in hh_records(40) + short_records(400) if usable(r, tokenizer)]
    lines = [b"\xef\xbb\xbf" + line(pool[0])]  # a byte-order mark before a valid first record
    expected, valid_lines = Counter(), [1]
    while len(lines) < 10_000:
        good = rng.choice(pool)
        if rng.random() < 0.12:
            reason, variants = rng.choice(list(hh_faults(good).items()))
            lines.append(rng.choice(variants))
            expected[reason] += 1
        elif rng.random() < 0.02:
            lines.append(b"\n")  # blank lines are neither records nor faults
        else:
            extra = {"meta": rng.choice([1, "x", [1, "y"], {"a": None}])}  # read, then dropped
            lines.append(line({**good, **extra}))
            valid_lines.append(len(lines))
    path = tmp_path / "fuzzed.jsonl"
    path.write_bytes(b"".join(lines))
    assert len(set(expected)) == len(hh_faults(pool[0])), "every category planted"

    raw = load_raw(str(path), on_invalid="skip")
    data, report = tokenize_dataset(raw, tokenizer, CFG)
    assert report["invalid_by_reason"] == dict(expected)
    assert report["invalid"] == sum(expected.values())
    kept = sorted(raw.lines[i] for i in data["record"])
    assert kept == sorted(valid_lines)  # no valid record dropped, none broken accepted
    for reason, examples in report["invalid_examples"].items():
        assert all(e.startswith(f"{path}, line ") for e in examples), reason

    first_fault = next(
        n for n, text in enumerate(lines, 1) if n not in set(valid_lines) and text.strip()
    )
    with pytest.raises(DataError, match=rf"(?s){path}, line {first_fault}: .*on_invalid=skip"):
        tokenize_dataset(load_raw(str(path)), tokenizer, CFG)


def test_conversational_faults_are_invalid_records(tokenizer, tmp_path):
    def record(messages_chosen, prompt="hi?"):
        return {"prompt": [{"role": "user", "content": prompt}], "chosen": messages_chosen,
                "rejected": [{"role": "assistant", "content": "no."}]}  # fmt: skip

    good = record([{"role": "assistant", "content": "hello!"}])
    planted = {
        "chosen: unknown role": record([{"role": "wizard", "content": "hello!"}]),
        "chosen: empty response": record([{"role": "assistant", "content": "  "}]),
        "chosen: message without content": record([{"role": "assistant"}]),
        "prompt: message without content": {**good, "prompt": [{"role": "user", "content": None}]},
    }
    rows = [good] * 5 + list(planted.values()) + [good] * 5
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data, report = tokenize_dataset(load_raw(str(path), on_invalid="skip"), tokenizer, CFG)
    assert report["invalid_by_reason"] == {reason: 1 for reason in planted}
    assert len(data) == 10


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", r"no usable records"),
        (b"\n\n", r"no usable records"),
        (b"null\n", r"no usable records \(1 invalid: 1 not a JSON object; first: .*line 1: "),
    ],
)
def test_files_without_records_say_so(tmp_path, content, message):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_raw(str(path), on_invalid="skip")


def test_a_gzip_file_cut_short_names_the_last_line_read(tmp_path):
    import gzip

    whole = gzip.compress(b"".join(line(r) for r in hh_records(50)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut.jsonl.gz: damaged or cut short after line \d+"):
        load_raw(str(path), on_invalid="skip")


def test_a_malformed_line_reads_as_one_sentence(tmp_path):
    """json's messages that end in "at" ("Unterminated string starting at", "Invalid control
    character at") are not followed by a second "at"."""
    path = tmp_path / "bad.jsonl"
    for text, expected in (
        ('{"chosen": "oops', "Unterminated string starting at column 12"),
        ('{"chosen": "oops\n', "Invalid control character at column 17"),
    ):
        path.write_text(text)
        with pytest.raises(DataError) as err:
            load_raw(str(path))
        assert expected in str(err.value) and "at at" not in str(err.value)
