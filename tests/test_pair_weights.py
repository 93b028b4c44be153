"""Per-pair loss weights (data.pair_weight_field, `losses.reduce`): in every method, a pair of
weight 2 is the pair twice and a pair of weight 0 the pair dropped, in loss and gradient; an
invalid weight is a counted invalid record; the TRL integration reads them too."""

import json

import pytest
import torch

from tokenratio.batch import collate_shared
from tokenratio.losses import LOSSES, reduce
from tokenratio.perf.models import build_model, synthetic_pairs, token_rows, word_tokenizer
from tokenratio.perf.worker import perf_config
from tokenratio.step import make_accelerator, prepare_step_parts, step_losses


def test_reduce_weighs_each_pair():
    losses = torch.tensor([1.0, 2.0, 4.0])
    assert reduce(losses, weights=torch.tensor([1.0, 2.0, 1.0])) == pytest.approx(9 / 4)
    assert reduce(losses, weights=torch.tensor([1.0, 0.0, 1.0])) == pytest.approx(5 / 2)
    assert reduce(losses, weights=torch.zeros(3)) == 0
    assert reduce(losses, weights=None) == pytest.approx(7 / 3)


def _rows(loss: str):
    model = build_model("tiny")
    tokenizer = word_tokenizer(model.config.vocab_size)
    pairs = synthetic_pairs(3, model.config.vocab_size, 9, 7)
    pairs[1]["rejected"] = pairs[1]["rejected"][:12]  # ragged: padding in the batch
    rows = token_rows(tokenizer, pairs, False)
    for i, row in enumerate(rows if LOSSES[loss].weights else ()):  # TIS-DPO's token weights
        row["chosen_weight"] = [1.0 + 0.1 * i] * len(row["chosen_ids"])
        row["rejected_weight"] = [0.5] * len(row["rejected_ids"])
    return model, rows


def _loss_and_gradient(parts, rows):
    batch = collate_shared(rows, 0)
    losses, _ = step_losses(parts, batch)
    value = reduce(losses, weights=batch.pair_weights)
    params = [p for p in parts.policy.parameters() if p.requires_grad]
    return value.detach(), torch.autograd.grad(value, params, allow_unused=True)


def _assert_same(left, right):
    torch.testing.assert_close(left[0], right[0], rtol=1e-5, atol=1e-7)
    for a, b in zip(left[1], right[1], strict=True):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_weight_two_is_the_pair_twice_and_zero_the_pair_dropped(loss):
    cfg = perf_config(loss, {"model": "tiny", "device": "cpu"}, {"ref_cache": False})
    model, rows = _rows(loss)
    parts = prepare_step_parts(cfg, make_accelerator(cfg), 10, model=model)
    weighted = [{**row, "pair_weight": w} for row, w in zip(rows, (1.0, 2.0, 1.0), strict=True)]
    twice = [rows[0], rows[1], rows[1], rows[2]]
    _assert_same(_loss_and_gradient(parts, weighted), _loss_and_gradient(parts, twice))
    dropped = [{**row, "pair_weight": w} for row, w in zip(rows, (1.0, 0.0, 1.0), strict=True)]
    _assert_same(_loss_and_gradient(parts, dropped), _loss_and_gradient(parts, [rows[0], rows[2]]))


def test_bad_weights_are_counted_invalid_records(tiny_model_dir, hh_jsonl, tmp_path):
    """A negative, infinite (or non-numeric) weight makes its record invalid, counted by
    reason; records without the field weigh 1."""
    from test_trainer import run

    lines = hh_jsonl.read_text().splitlines()
    bad = {3: -1.0, 5: "heavy", 7: 2.0}
    records = [json.loads(line) for line in lines]
    for index, weight in bad.items():
        records[index]["weight"] = weight
    records[9]["weight"] = float("inf")  # written as Infinity, which Python's json reads
    data = tmp_path / "weighted.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    run(tiny_model_dir, data, tmp_path / "r", **{"loss.name": "dpo", "train.max_steps": 1})
    report = json.loads((tmp_path / "r" / "data_report.json").read_text())
    assert report["pair_weights"] == "weight"
    assert report["invalid_by_reason"]["weight: the pair weight must be finite and >= 0"] == 2
    assert report["invalid_by_reason"]["weight: the pair weight must be a number"] == 1
