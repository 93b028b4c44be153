"""Prompt and response lengths of a real preference dataset, as `tokenratio train` would cut them,
for the perf harness's pairs: a byte-level BPE tokenizer with the harness model's vocabulary size
is trained in memory on the data's own text (nothing is downloaded), then every record is tokenized
by the trainer's `tokenize_dataset` with the given length settings."""

import functools

DEFAULT_DATA = "../shared/data/hh-rlhf/harmless-base-test.jsonl.gz"


def _bpe_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def _texts(raw) -> list[str]:
    from tokenratio.formats import detect_format, to_text

    fmt = detect_format(raw.dataset[0])
    texts = []
    for record in raw.dataset.select(range(min(len(raw.dataset), 4000))):
        try:
            texts.append("".join(to_text(record, fmt, None)))
        except Exception:  # invalid records are skipped by tokenize_dataset too
            continue
    return texts


@functools.cache
def data_tokenizer(path: str, vocab_size: int):
    """A byte-level BPE tokenizer trained on the data's own text (<pad> 0, <s> 1, </s> 2)."""
    from tokenratio.data import load_raw

    return _bpe_tokenizer(_texts(load_raw(path, on_invalid="skip")), min(vocab_size, 32000))


@functools.cache
def _tokenized(path: str, vocab_size: int, max_length: int, max_prompt_length: int):
    from tokenratio.config import DataConfig
    from tokenratio.data import load_raw, tokenize_dataset

    cfg = DataConfig(
        path=path,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        on_invalid="skip",
        chat_template=False,
    )
    raw = load_raw(path, on_invalid="skip")
    data, _ = tokenize_dataset(raw, data_tokenizer(path, vocab_size), cfg)
    return data


def dataset_lengths(
    path: str, vocab_size: int, max_length: int, max_prompt_length: int
) -> list[tuple[int, int, int]]:
    """(prompt, chosen, rejected) token counts of every valid record, responses with their EOS."""
    data = _tokenized(path, vocab_size, max_length, max_prompt_length)
    return [
        (len(p), len(c), len(r))
        for p, c, r in zip(
            data["prompt_ids"], data["chosen_ids"], data["rejected_ids"], strict=True
        )
    ]


def dataset_records(path: str, vocab_size: int, max_length: int, max_prompt_length: int) -> list:
    """The file's record index of each entry of `dataset_lengths` (the train row's pairs)."""
    return list(_tokenized(path, vocab_size, max_length, max_prompt_length)["record"])


def response_share(path: str, args: dict) -> float:
    """The responses' share of the real tokens (prompt once per side) over the whole dataset."""
    from tokenratio.perf.models import MODELS

    lengths = dataset_lengths(
        path, MODELS[args["model"]][0], args["max_length"], args["max_prompt_length"]
    )
    return sum(c + r for _, c, r in lengths) / sum(2 * p + c + r for p, c, r in lengths)
