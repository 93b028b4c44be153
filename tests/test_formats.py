"""The record formats (HH, TRL, UltraFeedback, TL;DR) -> (prompt, chosen, rejected), and their errors."""

import pytest

from tiny import hh_records
from tokenratio.formats import RecordError, detect_format, to_text


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_hh_split_at_the_last_shared_assistant_turn():
    record = hh_records(1)[0]
    prompt, chosen, rejected = to_text(record, "hh")
    assert prompt.endswith("\n\nAssistant:")
    assert record["chosen"] == prompt + chosen and record["rejected"] == prompt + rejected
    assert "Human:" not in chosen  # the response is the final assistant turn only
    assert detect_format(record) == "hh"


def test_trl_conversational_and_ultrafeedback_render_with_chat_template(tokenizer):
    user = [{"role": "user", "content": "What is 2+2?"}]
    good, bad = [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]
    prompt, chosen, rejected = to_text(
        {"prompt": user, "chosen": good, "rejected": bad}, "trl", tokenizer
    )
    assert prompt == "<|user|>What is 2+2?</s><|assistant|>"
    assert (chosen, rejected) == ("4</s>", "5</s>")  # the generation prompt holds the role tag
    uf = {"prompt": "What is 2+2?", "chosen": user + good, "rejected": user + bad}
    assert detect_format(uf) == "ultrafeedback"
    assert to_text(uf, "ultrafeedback", tokenizer) == (prompt, chosen, rejected)


def test_trl_plain_and_tldr():
    assert to_text({"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}, "trl") == (
        "2+2=",
        " 4",
        " 5",
    )
    record = {
        "info": {"subreddit": "cats", "title": "T", "post": "P"},
        "summaries": [{"text": "a cat"}, {"text": " a dog"}],
        "choice": 1,
    }
    assert detect_format(record) == "tldr"
    prompt, chosen, rejected = to_text(record, "tldr")
    assert prompt == "SUBREDDIT: r/cats\nTITLE: T\nPOST: P\nTL;DR:"
    assert (chosen, rejected) == (" a dog", " a cat")


@pytest.mark.parametrize(
    "record, field, message",
    [
        ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, "rejected", "missing"),
        ({"prompt": "p", "chosen": " ", "rejected": "x"}, "chosen", "empty response"),
        ({"prompt": "p", "chosen": "x", "rejected": "x"}, "rejected", "identical"),
        ({"chosen": "no turns here", "rejected": "no turns there"}, "chosen", "Assistant"),
    ],
)
def test_record_errors_name_the_field(record, field, message):
    fmt = "hh" if "prompt" not in record else "trl"
    with pytest.raises(RecordError, match=message) as err:
        to_text(record, fmt)
    assert err.value.field == field


RUNAWAY = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"


@pytest.mark.parametrize(
    ("template", "said"),
    [
        ("{{ raise_exception('roles must alternate') }}", "chat template failed: roles must"),
        ("{% for m in messages %}{{ m.content | nofilter }}{% endfor %}", "chat template failed"),
        (RUNAWAY, "chat template ran past 0.3 s"),
    ],
)
def test_a_failing_or_runaway_chat_template_makes_the_record_invalid(
    tiny_model_dir, monkeypatch, template, said
):
    """Issue 39.5: one line for the record (counted with on_invalid = "skip"), not a traceback
    or a tokenizer still rendering minutes later."""
    import time

    from transformers import AutoTokenizer

    from tokenratio import formats

    monkeypatch.setattr(formats, "TEMPLATE_SECONDS", 0.3)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = template
    record = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant",
              "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]}  # fmt: skip
    started = time.perf_counter()
    with pytest.raises(RecordError, match=said):
        to_text(record, "trl", tokenizer)
    assert time.perf_counter() - started < 5


def test_a_tokenizer_without_eos_or_pad_is_one_line(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from tokenratio.config import ModelConfig
    from tokenratio.modeling import ModelFileError, load_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.eos_token = None
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelFileError, match="neither an end-of-sequence nor a padding token"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))
