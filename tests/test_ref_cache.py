"""`train.ref_cache`: cached per-token reference log-probs give every loss they apply to the same
values and gradients as running the reference, in both batch layouts; a training run with the
cache never builds a reference, writes the cache beside the data, and a second run reads it."""

import json

import pytest
import torch

from tiny import load_tiny_pairs, perturbed
from tokenratio import ref_cache
from tokenratio.data import collate, collate_shared
from tokenratio.losses import LOSSES
from tokenratio.modeling import PolicyWithHead
from tokenratio.scoring import frozen_reference, score_pairs

CACHED = ["bpo", "dpo", "ipo", "tbpo-q", "tisdpo"]


def test_the_cache_applies_to_losses_without_a_kl_that_use_a_reference():
    applies = sorted(n for n, loss in LOSSES.items() if ref_cache.applies(loss.needs({})))
    assert applies == CACHED


def test_shards_cover_every_pair_once_and_score_longest_first():
    pairs = {
        f"k{n}": {"prompt_ids": [1] * n, "chosen_ids": [2] * (n % 3 + 1), "rejected_ids": [3]}
        for n in range(1, 12)
    }
    ordered = list(ref_cache.longest_first(pairs))
    sizes = [sum(len(ids) for ids in pairs[k].values()) for k in ordered]
    assert sizes == sorted(sizes, reverse=True) and sorted(ordered) == sorted(pairs)
    shards = [ref_cache.shard(pairs, i, 3) for i in range(3)]
    keys = [k for shard in shards for k in shard]
    assert sorted(keys) == sorted(pairs) and len(set(keys)) == len(pairs)
    assert [len(shard) for shard in shards] == [4, 4, 3]
    assert list(shards[0]) == ordered[0::3]  # long and short pairs in every shard
    assert ref_cache.shard(pairs, 0, 1) == ref_cache.longest_first(pairs)


@pytest.fixture(scope="module")
def scored(tiny_model_dir, hh_jsonl):
    model, tokenizer, data = load_tiny_pairs(tiny_model_dir, hh_jsonl, limit=8)
    cache = {}
    assert ref_cache.score_missing(model, list(data), cache, tokenizer.pad_token_id, 3) == 8
    assert ref_cache.score_missing(model, list(data), cache, tokenizer.pad_token_id, 3) == 0
    return model, tokenizer, data, ref_cache.attach(data, cache)


@pytest.mark.parametrize("layout", [collate, collate_shared], ids=["plain", "shared"])
@pytest.mark.parametrize("name", CACHED)
def test_cached_reference_logps_give_the_same_losses_and_gradients(name, layout, scored):
    from tokenratio.baseline import StateBaselineHead

    model, tokenizer, data, cached = scored
    policy_model = perturbed(model)
    needs = LOSSES[name].needs({})
    policy = PolicyWithHead(policy_model, StateBaselineHead(model.config.hidden_size))
    reference = frozen_reference(PolicyWithHead(model).eval())

    def pairs(rows):
        out = [dict(r) for r in rows]
        for r in out if LOSSES[name].weights else ():
            r["chosen_weight"] = [1.5] * len(r["chosen_ids"])
            r["rejected_weight"] = [0.5] * len(r["rejected_ids"])
        return out

    results = []
    for rows, ref in ((pairs(data), reference), (pairs(cached), None)):
        batch = layout(rows, tokenizer.pad_token_id)
        assert (batch.ref_logps is not None) == (ref is None)
        policy.zero_grad(set_to_none=True)
        scored_pairs = score_pairs(policy, ref, batch, needs, chunk_elements=4096)
        losses, _ = LOSSES[name](scored_pairs, beta=0.1)
        losses.mean().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append((losses.detach(), grads))
    (plain, plain_grads), (fast, fast_grads) = results
    assert plain_grads and plain_grads.keys() == fast_grads.keys()
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    for key, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.slow
def test_a_run_with_the_cache_never_builds_a_reference_and_matches_one_without(
    tiny_model_dir, hh_jsonl, tmp_path, capsys, monkeypatch
):
    import shutil

    from test_trainer import run
    from tokenratio import modeling

    monkeypatch.delenv("TOKENRATIO_REF_CACHE_DIR")  # the default place: beside the data
    data = tmp_path / "data" / "hh.jsonl"
    data.parent.mkdir()
    shutil.copy(hh_jsonl, data)
    settings = {"loss.name": "dpo", "train.max_steps": 3, "train.eval_every": 0}
    plain = run(tiny_model_dir, data, tmp_path / "plain", **settings, **{"train.ref_cache": False})
    assert not (data.parent / "hh.jsonl.ref-logps").exists()
    built = []
    real = modeling.build_models

    def spy(cfg, needs, model=None):
        built.append(needs.reference)
        return real(cfg, needs, model)

    monkeypatch.setattr("tokenratio.trainer.build_models", spy)
    cached = run(tiny_model_dir, data, tmp_path / "cached", **settings)  # on by default
    assert built == [False]
    assert "reference log-probs: scored" in capsys.readouterr().out
    assert len(list((data.parent / "hh.jsonl.ref-logps").glob("*.pt"))) == 1
    for a, b in zip(plain, cached, strict=True):
        assert a["step"] == b["step"]
        for key in ("loss", "reward_margin", "eval_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    again = run(tiny_model_dir, data, tmp_path / "again", **settings)
    assert "reference log-probs: read from" in capsys.readouterr().out
    assert json.dumps(again[0]["loss"]) == json.dumps(cached[0]["loss"])
