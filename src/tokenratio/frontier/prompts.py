"""The frontier's prompts: the first user turn of each record of a preference file (HH-RLHF's
dialogues, TRL's conversational or plain prompts, UltraFeedback's), deduplicated, those whose
rendered prompt fits data.max_prompt_length kept, shuffled by a seed and cut into the prompts the
pairs come from and the held-out prompts the policies are evaluated on (disjoint by text)."""

import random
from pathlib import Path

from tokenratio.formats import RecordError, detect_format, hh, hh_messages
from tokenratio.frontier.pairs import Prompt, prompt_ids


class PromptError(ValueError):
    """Too few usable prompts; the message says how many and what to change."""


def first_user_turn(record: dict) -> str | None:
    """The record's first user turn, or None when it has none."""
    try:
        fmt = detect_format(record)
    except RecordError:
        return None
    if fmt == "hh":
        try:
            turns = hh_messages(hh(record)[0])
        except RecordError:
            return None
        return turns[0]["content"]
    prompt = record.get("prompt")
    if isinstance(prompt, str):
        return prompt.strip() or None
    messages = prompt if isinstance(prompt, list) else record.get("chosen") or []
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return users[0].strip() if users and isinstance(users[0], str) and users[0].strip() else None


def split_prompts(
    path: str, tokenizer, max_prompt_length: int, sizes: tuple[int, int], seed: int
) -> tuple[list[Prompt], list[Prompt]]:
    """(prompts for pairs, held-out prompts) from the file at `path`, `sizes` of them."""
    from tokenratio.data import load_raw

    seen, usable = set(), []
    for index, record in enumerate(load_raw(path, on_invalid="skip").dataset):
        text = first_user_turn(record)
        if text is None or text in seen:
            continue
        seen.add(text)
        try:
            ids = prompt_ids(tokenizer, text)
        except RecordError:  # the chat template failed on it, or ran too long
            continue
        if len(ids) <= max_prompt_length:
            usable.append(Prompt(f"{Path(path).name}:{index}", text))
    random.Random(seed).shuffle(usable)
    needed = sum(sizes)
    if len(usable) < needed:
        raise PromptError(
            f"{path}: {len(usable)} distinct prompts of at most {max_prompt_length} tokens, "
            f"{needed} needed (frontier.train_prompts + frontier.heldout_prompts): lower them or "
            "raise data.max_prompt_length"
        )
    return usable[: sizes[0]], usable[sizes[0] : needed]
