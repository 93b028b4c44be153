"""Preference record formats -> (prompt, chosen, rejected) text. One function per format.

hh: Anthropic HH-RLHF, two full dialogues sharing a prefix; the prompt is the shared prefix up to
    and including its last "\n\nAssistant:", the responses are what follows.
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}
hh-chat: hh with its turns rendered by the tokenizer's chat template (data.chat_template).
trl: TRL's preference format, plain strings or message lists (rendered with the chat template).
    {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}
    {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", ...}], ...}
ultrafeedback: UltraFeedback-binarized; chosen/rejected are whole conversations, the last message
    is the response.  {"prompt": "2+2?", "chosen": [{"role": "user", ...}, {"role": "assistant",
    "content": "4"}], "rejected": [...]}
tldr: OpenAI summarize-from-feedback comparisons.  {"info": {"subreddit": ..., "title": ...,
    "post": ...}, "summaries": [{"text": " a"}, {"text": " b"}], "choice": 0}
"""

import math
import re
from collections.abc import Callable

HH_ASSISTANT = "\n\nAssistant:"


_SPECIFICS = re.compile(r" \(|, got|: ")  # where a message's specifics begin


class RecordError(ValueError):
    """A record that cannot be used; `field` names the offending field, `reason` the kind of fault
    (what data_report.json counts records by: the message without its specifics)."""

    def __init__(self, field: str, message: str, reason: str | None = None):
        super().__init__(f"field '{field}': {message}")
        self.field = field
        self.reason = f"{field}: {reason or _SPECIFICS.split(message)[0]}"


ROLES = ("system", "user", "assistant")
TYPES = {  # each format's fields and the type a usable record gives them
    "hh": {"chosen": str, "rejected": str},
    "trl": {"prompt": (str, list), "chosen": (str, list), "rejected": (str, list)},
    "ultrafeedback": {"chosen": list, "rejected": list},
    "tldr": {"info": dict, "summaries": list, "choice": int},
}
WEIGHT_FIELDS = ("chosen_weight", "rejected_weight")
KNOWN_FIELDS = sorted({f for fields in TYPES.values() for f in fields} | {"prompt", *WEIGHT_FIELDS})


def check_types(record: dict, fmt: str) -> None:
    """The record has its format's fields with usable types (and well-formed messages), or
    RecordError: nothing downstream meets an int where it expects text."""
    base = "hh" if fmt == "hh-chat" else fmt
    for name, kind in TYPES[base].items():
        _require(record, name)
        value = record[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            wanted = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise RecordError(name, f"expected {wanted}, got {value!r:.40}", f"not a {wanted}")
        if isinstance(value, list) and name != "summaries":
            _check_messages(name, value)


def _check_messages(name: str, messages: list) -> None:
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RecordError(name, "a message without text content", "message without content")
        if message.get("role") not in ROLES:
            raise RecordError(name, f"unknown role {message.get('role')!r:.30}", "unknown role")


def _require(record: dict, *names: str) -> None:
    for name in names:
        if name not in record or record[name] is None:
            raise RecordError(name, f"missing (record has {sorted(record)})")


def _is_messages(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def detect_format(record: dict) -> str:
    """Guess the format from the first record's fields."""
    if {"summaries", "choice", "info"} <= set(record):
        return "tldr"
    if {"prompt", "chosen", "rejected"} <= set(record):
        chosen = record["chosen"]
        if _is_messages(chosen) and chosen and chosen[0].get("role") in ("user", "system"):
            return "ultrafeedback"
        return "trl"
    if {"chosen", "rejected"} <= set(record):
        return "hh"
    raise RecordError(
        "chosen",
        f"unknown record format with fields {sorted(record)}; expected one of: "
        "chosen/rejected (HH-RLHF), prompt/chosen/rejected (TRL, UltraFeedback), "
        "info/summaries/choice (TL;DR)",
        reason="unknown record format (expected the fields chosen/rejected, "
        "prompt/chosen/rejected or info/summaries/choice)",
    )


def hh(record: dict, tokenizer=None) -> tuple[str, str, str]:
    _require(record, "chosen", "rejected")
    chosen, rejected = record["chosen"], record["rejected"]
    shared = 0
    limit = min(len(chosen), len(rejected))
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, shared)  # the last turn marker wholly inside the prefix
    if cut < 0:
        raise RecordError("chosen", f"no shared '{HH_ASSISTANT.strip()}' turn before the responses")
    end = cut + len(HH_ASSISTANT)
    return chosen[:end], chosen[end:], rejected[end:]


HH_TURN = re.compile(r"\n\n(Human|Assistant):")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def hh_messages(prompt: str) -> list[dict]:
    """An HH prompt as chat messages: '\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:'
    -> user a, assistant b, user c (the final, empty assistant turn is the one the response fills)."""
    parts = HH_TURN.split(prompt)  # ['', 'Human', ' a', 'Assistant', ' b', ..., 'Assistant', '']
    if parts[0].strip() or len(parts) < 5:
        raise RecordError("chosen", "expected '\n\nHuman: ...' turns before the response")
    turns = [
        {"role": HH_ROLES[r], "content": c.strip()}
        for r, c in zip(parts[1::2], parts[2::2], strict=False)
    ]
    turns.pop()  # the assistant turn the response fills (hh() cut the prompt there)
    if turns[0]["role"] != "user":
        raise RecordError("chosen", "the dialogue does not start with a 'Human:' turn")
    return turns


def hh_chat(record: dict, tokenizer=None) -> tuple[str, str, str]:
    """HH rendered with the tokenizer's chat template (data.chat_template), so an Instruct model
    sees the format it was tuned on instead of raw 'Human:'/'Assistant:' text."""
    prompt, chosen, rejected = hh(record)
    messages = hh_messages(prompt)
    text, chosen_text = _render(tokenizer, messages, [_assistant(chosen)], "chosen")
    _, rejected_text = _render(tokenizer, messages, [_assistant(rejected)], "rejected")
    return text, chosen_text, rejected_text


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text.strip()}


def _render(tokenizer, prompt_messages: list, response_messages: list, field: str):
    """(prompt, response) text through the chat template; the response is what the template adds
    after the prompt (its end-of-turn marker included)."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RecordError("prompt", "conversational record but the tokenizer has no chat template")
    for message in response_messages:
        if not isinstance(message, dict) or message.get("role") != "assistant":
            raise RecordError(field, "the response must be an assistant message")
        if not isinstance(message.get("content"), str) or not message["content"].strip():
            raise RecordError(field, "empty response (no assistant content)")
    prompt = render_template(tokenizer, prompt_messages, add_generation_prompt=True)
    full = render_template(tokenizer, prompt_messages + response_messages)
    if not full.startswith(prompt):
        raise RecordError("prompt", "chat template does not render the prompt as a prefix")
    return prompt, full[len(prompt) :]


TEMPLATE_SECONDS = 10.0  # a record whose chat template renders longer is invalid (a runaway loop)


def render_template(tokenizer, messages: list, add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages`. A template that raises (its own
    raise_exception, a Jinja error) or runs past TEMPLATE_SECONDS makes the record invalid
    (RecordError: counted, or named with on_invalid = "error"), never a traceback or a hang.
    The time limit needs the main thread and a free SIGALRM timer; elsewhere (or while another
    timer is set, which it would cancel) the template runs unlimited."""
    import signal
    import threading

    def render():
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    if (
        threading.current_thread() is not threading.main_thread()
        or not hasattr(signal, "SIGALRM")
        or signal.getitimer(signal.ITIMER_REAL)[0] > 0
    ):
        return _template_errors(render)

    def too_long(signum, frame):
        raise _TemplateTimeoutError

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.setitimer(signal.ITIMER_REAL, TEMPLATE_SECONDS)
    try:
        return _template_errors(render)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class _TemplateTimeoutError(Exception):
    pass


def _template_errors(render) -> str:
    from jinja2 import TemplateError

    try:
        return render()
    except _TemplateTimeoutError:
        raise RecordError(
            "prompt",
            f"the chat template ran past {TEMPLATE_SECONDS:g} s on this record (a runaway loop?)",
            reason="chat template too slow",
        ) from None
    except TemplateError as err:
        raise RecordError(
            "prompt", f"the chat template failed: {str(err)[:160]}", reason="chat template failed"
        ) from None


def trl(record: dict, tokenizer=None) -> tuple[str, str, str]:
    _require(record, "prompt", "chosen", "rejected")
    prompt, chosen, rejected = record["prompt"], record["chosen"], record["rejected"]
    if _is_messages(prompt) or _is_messages(chosen):
        messages = prompt if _is_messages(prompt) else [{"role": "user", "content": prompt}]
        text, chosen_text = _render(tokenizer, messages, chosen, "chosen")
        _, rejected_text = _render(tokenizer, messages, rejected, "rejected")
        return text, chosen_text, rejected_text
    for name in ("prompt", "chosen", "rejected"):
        if not isinstance(record[name], str):
            raise RecordError(
                name, f"expected a string or a message list, got {record[name]!r:.60}"
            )
    return prompt, chosen, rejected


def ultrafeedback(record: dict, tokenizer=None) -> tuple[str, str, str]:
    _require(record, "chosen", "rejected")
    chosen, rejected = record["chosen"], record["rejected"]
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not _is_messages(value) or len(value) < 2:
            raise RecordError(name, "expected a conversation ending with the assistant's response")
    text, chosen_text = _render(tokenizer, chosen[:-1], chosen[-1:], "chosen")
    _, rejected_text = _render(tokenizer, rejected[:-1], rejected[-1:], "rejected")
    return text, chosen_text, rejected_text


def tldr(record: dict, tokenizer=None) -> tuple[str, str, str]:
    _require(record, "info", "summaries", "choice")
    info, summaries, choice = record["info"], record["summaries"], record["choice"]
    if not isinstance(summaries, list) or len(summaries) != 2 or choice not in (0, 1):
        raise RecordError("summaries", "expected two summaries and choice 0 or 1")
    post = info.get("post") or info.get("article") or ""
    prompt = f"SUBREDDIT: r/{info.get('subreddit', '')}\nTITLE: {info.get('title', '')}\n"
    prompt += f"POST: {post}\nTL;DR:"
    texts = [s.get("text", "") if isinstance(s, dict) else "" for s in summaries]
    chosen = texts[choice]
    rejected = texts[1 - choice]
    return (
        prompt,
        chosen if chosen.startswith(" ") else " " + chosen,
        (rejected if rejected.startswith(" ") else " " + rejected),
    )


FORMATS: dict[str, Callable] = {
    "hh": hh,
    "hh-chat": hh_chat,
    "trl": trl,
    "ultrafeedback": ultrafeedback,
    "tldr": tldr,
}
TEMPLATED = ("hh-chat", "ultrafeedback")  # their text already carries the template's specials


def to_text(record: dict, fmt: str, tokenizer=None) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a record, validated: no empty response, responses differ."""
    check_types(record, fmt)
    prompt, chosen, rejected = FORMATS[fmt](record, tokenizer)
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if not value.strip():
            raise RecordError(name, "empty response")
    if chosen == rejected:
        raise RecordError("rejected", "identical to chosen (no preference to learn)")
    return prompt, chosen, rejected


def pair_weight(value, field: str) -> float:
    """A record's loss weight: 1 where it has none; a finite number >= 0, else RecordError."""
    if value is None:
        return 1.0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RecordError(field, f"the pair weight must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise RecordError(field, f"the pair weight must be finite and >= 0, got {value!r}")
    return float(value)
