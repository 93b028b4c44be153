"""The batch the model side reads: `PreferenceBatch`, the collators that build it from tokenized
pairs (two rows a pair, or the prefix-shared layout of docs/method.md) and the length-grouped order
of the pairs. data.py reads and tokenizes; this module knows nothing of files.
"""

from dataclasses import dataclass

import torch

from tokenratio.logprobs import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "PreferenceBatch",
    "collate",
    "collate_rows",
    "collate_shared",
    "length_grouped_order",
    "pair_lengths",
]


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
        trunk_hidden, trunk_layers: None and 0, or (rows, L, H) float: the hidden states entering
            decoder layer `trunk_layers` at every input position, from the frozen trunk's cache
            (`trunk.TrunkCache.fill`, train.trunk_cache); the model then runs only the layers
            from `trunk_layers` on (`modeling.decoder_states`). Zeros at padding.
        token_index: (n,) int64, the flat indices into (2B * T) of the positions that hold a
            response token (labels != IGNORE_INDEX), found on the CPU when collated, so the fused
            head computes only there without asking the device which they are.
        real_tokens: the pairs' tokens as two rows each would hold them (prompt counted once per
            side, padding not): counted on the CPU when collated, so reading it never waits for
            the device.
        pair_weights: (B,) float32 or None: each pair's loss weight (data.pair_weight_field), None
            when the data carries none (every pair weighs 1).
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
    trunk_hidden: torch.Tensor | None = None
    trunk_layers: int = 0
    token_index: torch.Tensor | None = None
    real_tokens: int = 0
    pair_weights: torch.Tensor | None = None

    def __post_init__(self):
        if self.token_index is None and self.labels.device.type == "cpu":
            self.token_index = (self.labels.reshape(-1) != IGNORE_INDEX).nonzero()[:, 0]

    @property
    def num_pairs(self) -> int:
        return self.labels.shape[0] // 2

    def to(self, device, non_blocking: bool = False) -> "PreferenceBatch":
        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device, non_blocking=non_blocking)
            return value

        return PreferenceBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


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
    beyond each response, and the pairs' loss weights -> (B,); fields the data does not carry
    stay None."""
    if "pair_weight" in examples[0]:
        batch.pair_weights = torch.tensor([e["pair_weight"] for e in examples], dtype=torch.float32)
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
