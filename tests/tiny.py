"""A tiny real Hugging Face model and tokenizer, built offline: a byte-level BPE tokenizer trained in
memory on HH-RLHF text, and a 2-layer Llama from a config, saved with save_pretrained."""

import gzip
import json
import os
from pathlib import Path

HH_PATH = Path(
    os.environ.get("TOKENRATIO_HH_PATH")  # a copy, where ../shared is not beside the checkout
    or Path(__file__).resolve().parents[1].parent
    / "shared/data/hh-rlhf/harmless-base-test.jsonl.gz"
)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def hh_records(n: int) -> list[dict]:
    with gzip.open(HH_PATH, "rt") as handle:
        return [json.loads(line) for _, line in zip(range(n), handle, strict=False)]


def make_tiny_model(
    directory: Path, vocab_size: int = 384, hidden: int = 32, layers: int = 2
) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [r["chosen"] + r["rejected"] for r in hh_records(400)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    fast.save_pretrained(directory)
    return directory


def write_hh_jsonl(path: Path, n: int, start: int = 0) -> Path:
    records = hh_records(start + n)[start:]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def load_tiny_pairs(model_dir: Path, data: Path, limit: int):
    """The tiny model in float32 on the CPU, its tokenizer, and the first `limit` records of
    `data` tokenized as training would (max_length 384)."""
    from tokenratio.config import DataConfig
    from tokenratio.data import load_raw, tokenize_dataset
    from tokenratio.modeling import load_pretrained

    model, tokenizer, _ = load_pretrained(str(model_dir), device="cpu", dtype="float32")
    raw = load_raw(str(data), limit=limit)
    tokenized, _ = tokenize_dataset(
        raw, tokenizer, DataConfig(path=str(data), max_length=384, on_invalid="skip")
    )
    return model, tokenizer, tokenized


def perturbed(model, scale: float = 0.02):
    """A seeded, perturbed copy: a policy that differs from its reference, so every term of a
    loss is non-zero."""
    import copy

    import torch

    model = copy.deepcopy(model)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model
