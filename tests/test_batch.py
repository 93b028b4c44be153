"""batch.py: the collated layouts (two rows a pair, prefix-shared) and the length-grouped order."""

import torch

from tokenratio.batch import collate, collate_shared, length_grouped_order, pair_lengths
from tokenratio.logprobs import IGNORE_INDEX


def test_collate_is_response_aligned():
    rows = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [10, 11], "rejected_ids": [20, 21, 22]},
        {"prompt_ids": [4], "chosen_ids": [12, 13, 14, 15], "rejected_ids": [23]},
    ]
    batch = collate(rows, pad_token_id=0)
    assert batch.num_pairs == 2
    assert batch.input_ids.tolist()[0] == [1, 2, 3, 10, 11, 0]
    assert batch.input_ids.tolist()[2] == [1, 2, 3, 20, 21, 22]
    # column j holds response token j; its predicting hidden state is at prompt_len + j - 1
    assert batch.labels[:, 0].tolist() == [10, 12, 20, 23]
    assert batch.positions[0, :2].tolist() == [2, 3]
    assert batch.positions[1, :4].tolist() == [0, 1, 2, 3]
    for i in range(4):
        valid = batch.labels[i] != IGNORE_INDEX
        gathered = batch.input_ids[i, batch.positions[i][valid] + 1]
        assert torch.equal(gathered, batch.labels[i][valid])


def test_collate_shared_puts_both_responses_after_one_prompt():
    rows = [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [10, 11], "rejected_ids": [20, 21, 22]},
        {"prompt_ids": [4], "chosen_ids": [12, 13, 14, 15], "rejected_ids": [23]},
    ]
    batch = collate_shared(rows, pad_token_id=0)
    plain = collate(rows, pad_token_id=0)
    assert batch.num_pairs == 2 and batch.input_ids.shape == (2, 8)
    assert batch.input_ids.tolist() == [
        [1, 2, 3, 10, 11, 20, 21, 22],
        [4, 12, 13, 14, 15, 23, 0, 0],
    ]
    assert batch.segments.tolist() == [[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 2, 3, 3]]
    # the rejected response restarts after the prompt: positions 3, 4, 5 as in its own row
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5], [0, 1, 2, 3, 4, 1, 0, 0]]
    assert torch.equal(batch.labels, plain.labels)
    assert batch.source_rows.tolist() == [0, 1, 0, 1]
    # rejected token 0 is predicted at the prompt's last token, token j from rejected token j - 1
    assert batch.positions[2, :3].tolist() == [2, 5, 6] and batch.positions[3, :1].tolist() == [0]
    for i in range(4):
        valid = batch.labels[i] != IGNORE_INDEX
        next_tokens = batch.input_ids[batch.source_rows[i], batch.positions[i][valid] + 1]
        if i >= 2:  # token 0's successor in the row is chosen's first token, not rejected's
            next_tokens = next_tokens[1:]
        assert torch.equal(next_tokens, batch.labels[i][valid][1 if i >= 2 else 0 :])
    # the pairs' tokens as two rows each (TRL's count): prompt once per side, no padding
    assert batch.real_tokens == plain.real_tokens == (3 + 2) + (3 + 3) + (1 + 4) + (1 + 1)


def test_pair_lengths_of_the_shared_layout_count_both_responses():
    import datasets

    data = datasets.Dataset.from_list(
        [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]}]
    )
    assert pair_lengths(data) == [5] and pair_lengths(data, shared=True) == [6]


def test_length_grouped_order_is_a_permutation_with_less_padding_and_the_short_batch_last():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 300) for _ in range(203)]
    order = length_grouped_order(lengths, batch_size=4, seed=7, window=10)
    assert sorted(order) == list(range(203))
    assert order == length_grouped_order(lengths, batch_size=4, seed=7, window=10)
    assert order != length_grouped_order(lengths, batch_size=4, seed=8, window=10)

    def padded(o):  # tokens a right-padded batch of 4 holds
        return sum(4 * max(lengths[i] for i in o[s : s + 4]) for s in range(0, 200, 4))

    shuffled = torch.randperm(203, generator=torch.Generator().manual_seed(7)).tolist()
    assert padded(order) < 0.75 * padded(shuffled)
    # 203 = 50 full batches + 3: the short batch is last, so drop_last drops exactly it
    # (the last window is the first permutation's last 3 items: 203 = 5 windows of 40 + 3)
    assert set(order[200:]) == set(shuffled[200:])


def test_pair_lengths_counts_the_prompt_and_the_longer_response():
    from datasets import Dataset

    data = Dataset.from_dict(
        {
            "prompt_ids": [[1, 2], [1]],
            "chosen_ids": [[3], [4, 5, 6]],
            "rejected_ids": [[7, 8, 9], [2]],
        }
    )
    assert pair_lengths(data) == [5, 4]
