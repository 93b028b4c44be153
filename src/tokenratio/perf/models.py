"""The perf harness's model shapes (random weights, no download) and its synthetic token batches.

A word-level tokenizer built in memory gives one token per synthetic word, so prompt and response
lengths are exact for every row, ours and TRL's.
"""

import torch

MODELS = {  # name: (vocab, hidden, layers, heads, kv_heads, intermediate)
    "tiny": (2048, 64, 2, 4, 2, 128),
    "cpu20m": (8192, 384, 6, 6, 2, 1024),
    "smollm2-135m": (49152, 576, 30, 9, 3, 1536),  # SmolLM2-135M's architecture, random weights
    "llama3.2-1b": (128256, 2048, 16, 32, 8, 8192),  # Llama-3.2-1B's architecture (untied head)
    "llama3-vocab": (128256, 256, 2, 4, 2, 512),  # a 128k vocabulary: the full-vocabulary KL test
}
OUR_ROWS = ("dpo", "tbpo-a", "tbpo-q", "tdpo2", "tdpo1[generator=sba]", "bpo", "tisdpo")


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over w0..w{V-5} plus specials: one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i + len(specials) for i in range(vocab_size - len(specials))})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def synthetic_pairs(num: int, vocab: int, prompt_len: int, response_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def words(n):
        return " ".join(f"w{i}" for i in torch.randint(0, vocab - 4, (n,), generator=g).tolist())

    return [
        {
            "prompt": words(prompt_len),
            "chosen": " " + words(response_len),
            "rejected": " " + words(response_len),
        }
        for _ in range(num)
    ]


def pairs_of_lengths(lengths: list, vocab: int, seed: int = 0) -> list[dict]:
    """Pairs of random words with the given (prompt, chosen, rejected) token counts, responses
    counted with the EOS that `token_rows` (and TRL) append."""
    g = torch.Generator().manual_seed(seed)

    def words(n):
        return " ".join(f"w{i}" for i in torch.randint(0, vocab - 4, (n,), generator=g).tolist())

    return [
        {"prompt": words(p), "chosen": " " + words(c - 1), "rejected": " " + words(r - 1)}
        for p, c, r in lengths
    ]


def count_params(name: str) -> int:
    """The model's parameter count without building it on the CPU (a meta-device model)."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(name).parameters())


def build_model(name: str, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, hidden, layers, heads, kv, inter = MODELS[name]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def token_rows(tokenizer, pairs: list[dict], with_weights: bool) -> list[dict]:
    """Tokenized pairs (EOS after each response); TIS-DPO's weights: any values will do."""
    rows = [
        {
            "prompt_ids": tokenizer(p["prompt"])["input_ids"],
            "chosen_ids": tokenizer(p["chosen"], add_special_tokens=False)["input_ids"] + [2],
            "rejected_ids": tokenizer(p["rejected"], add_special_tokens=False)["input_ids"] + [2],
        }
        for p in pairs
    ]
    g = torch.Generator().manual_seed(0)
    for row in rows if with_weights else []:
        for side in ("chosen", "rejected"):
            n = len(row[f"{side}_ids"])
            row[f"{side}_weight"] = (0.5 + torch.rand(n, generator=g)).tolist()
    return rows
