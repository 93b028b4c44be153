"""The reference cache cannot lie: values equal to running the reference, every damaged,
foreign or crafted file rescored with one line naming it, scoring saved as it goes, leftovers
cleaned up, and a read-only location refused or avoided before any scoring."""

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from tiny import load_tiny_pairs, perturbed
from tokenratio import reference, shards
from tokenratio.batch import collate, collate_shared
from tokenratio.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig
from tokenratio.losses import LOSSES
from tokenratio.modeling import PolicyWithHead
from tokenratio.reference import cache, score, store
from tokenratio.scoring import score_pairs

CACHED = ["bpo", "dpo", "ipo", "tbpo-q", "tisdpo"]


def test_shards_cover_every_pair_once_and_score_longest_first():
    pairs = {
        f"k{n}": {"prompt_ids": [1] * n, "chosen_ids": [2] * (n % 3 + 1), "rejected_ids": [3]}
        for n in range(1, 12)
    }
    have = {"k5"}  # already cached: not scored again
    ordered = list(shards.missing_longest_first(((k, row) for k, row in pairs.items()), have))
    sizes = [sum(len(ids) for ids in pairs[k].values()) for k in ordered]
    assert sizes == sorted(sizes, reverse=True) and sorted(ordered) == sorted(set(pairs) - have)
    todo = {k: pairs[k] for k in ordered}
    parts = [score.shard(todo, i, 3) for i in range(3)]
    keys = [k for part in parts for k in part]
    assert sorted(keys) == sorted(todo) and len(set(keys)) == len(todo)
    assert [len(part) for part in parts] == [4, 3, 3]
    assert list(parts[0]) == ordered[0::3]  # long and short pairs in every shard


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, hh_jsonl):
    return load_tiny_pairs(tiny_model_dir, hh_jsonl, limit=8)


@pytest.mark.parametrize("layout", [collate, collate_shared], ids=["plain", "shared"])
@pytest.mark.parametrize("name", CACHED)
def test_cached_reference_logps_give_the_same_losses_and_gradients(name, layout, tiny):
    from tokenratio.baseline import StateBaselineHead

    model, tokenizer, data = tiny
    rows = [dict(r) for r in data]
    for r in rows if LOSSES[name].weights else ():
        r["chosen_weight"] = [1.5] * len(r["chosen_ids"])
        r["rejected_weight"] = [0.5] * len(r["rejected_ids"])
    values = reference.score_rows(model, rows, tokenizer.pad_token_id, 3, 0)
    assert len(values) == 8
    needs = LOSSES[name].needs({})
    policy = PolicyWithHead(perturbed(model), StateBaselineHead(model.config.hidden_size))
    results = []
    for ref in (reference.module_forward(PolicyWithHead(model).eval()), None):
        batch = layout(rows, tokenizer.pad_token_id)
        if ref is None:
            batch = values.fill(batch, rows)
        policy.zero_grad(set_to_none=True)
        scored = score_pairs(policy, ref, batch, needs, chunk_elements=4096)
        losses, _ = LOSSES[name](scored, beta=0.1)
        losses.mean().backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append((losses.detach(), grads))
    (plain, plain_grads), (fast, fast_grads) = results
    assert plain_grads and plain_grads.keys() == fast_grads.keys()
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)
    for key, grad in plain_grads.items():
        torch.testing.assert_close(fast_grads[key], grad, rtol=1e-4, atol=1e-6, msg=key)


class Said(list):
    def __call__(self, line):
        self.append(line)


def _accelerator():
    from accelerate import Accelerator

    return Accelerator(cpu=True)


def _cfg(model_dir, data):
    return Config(
        model=ModelConfig(name_or_path=str(model_dir)),
        data=DataConfig(path=str(data), max_length=384),
        loss=LossConfig(name="dpo"),
        train=TrainConfig(eval_batch_size=4),
    )


def _load(model_dir, data, tokenizer, datasets, samples=0):
    cfg = _cfg(model_dir, data)
    plan = reference.Plan("cached", "", samples, "tiny-identity")
    accelerator = _accelerator()
    said = Said()
    accelerator.print = said
    values = reference.load_or_score(cfg, plan, accelerator, tokenizer, datasets, progress=False)
    return values, said


def _same(values, clean, rows):
    for row in rows:
        k = store.pair_key(row)
        for side in store.SIDES:
            assert torch.equal(values.entry(k, side), clean.entry(k, side))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.ENV, str(tmp_path / "cache"))
    return tmp_path / "cache"


def _shards(cache_dir: Path) -> list[Path]:
    return sorted(cache_dir.glob("*/shard-*.safetensors"))


def _evil_pickle(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self):
            return (Path.write_text, (marker, "ran"))

    return pickle.dumps(Evil())


DAMAGE = {
    "truncated": lambda data, _: data[: len(data) // 2],
    "empty": lambda data, _: b"",
    "garbage": lambda data, _: bytes(range(256)) * 20,
    "crafted pickle": lambda data, marker: _evil_pickle(marker),
    "values zeroed": None,  # the checksum no longer matches
    "halved with a new checksum": None,
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_shard_is_named_in_one_line_and_rescored(
    damage, tiny, tiny_model_dir, hh_jsonl, cache_dir, tmp_path
):
    _, tokenizer, data = tiny
    clean, said = _load(tiny_model_dir, hh_jsonl, tokenizer, [data])
    assert said == [f"reference log-probs: scored 8 pairs into {_shards(cache_dir)[0].parent}"]
    [path] = _shards(cache_dir)
    floats = sum(len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in data) * 4
    assert path.stat().st_size < floats + 8 * 40 + 2048  # about the size of the floats it holds
    marker = tmp_path / "marker"
    if DAMAGE[damage] is not None:
        path.write_bytes(DAMAGE[damage](path.read_bytes(), marker))
    else:
        _tamper(path, damage)
    values, said = _load(tiny_model_dir, hh_jsonl, tokenizer, [data])
    assert len(said) == 2 and said[0].startswith(f"reference cache: {path}: "), said
    assert "scored again" in said[0] and said[1].startswith("reference log-probs: scored 8")
    assert not marker.exists()  # nothing in a crafted file ever runs
    _same(values, clean, list(data))
    _, said = _load(tiny_model_dir, hh_jsonl, tokenizer, [data])
    assert said[0].startswith("reference log-probs: read 8 pairs")


def _tamper(path: Path, how: str) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    if how == "values zeroed":
        tensors["chosen_logps"] = torch.zeros_like(tensors["chosen_logps"])
    else:  # a consistent shard whose entries are half as long as their pairs'
        for side in store.SIDES:
            lengths = tensors[f"{side}_len"]
            tensors[f"{side}_len"] = (lengths + 1) // 2
            parts = torch.split(tensors[f"{side}_logps"], lengths.tolist())
            tensors[f"{side}_logps"] = torch.cat([p[: (len(p) + 1) // 2] for p in parts])
        metadata["sha256"] = shards.checksum(tensors)
    save_file(tensors, str(path), metadata=metadata)


def test_a_foreign_shard_is_refused(tiny, tiny_model_dir, hh_jsonl, cache_dir):
    _, tokenizer, data = tiny
    _load(tiny_model_dir, hh_jsonl, tokenizer, [data])
    [path] = _shards(cache_dir)
    other = cache_dir / "another-key"
    other.mkdir()
    moved = other / path.name
    shutil.move(path, moved)
    path.parent.rmdir()
    shutil.move(other, path.parent)  # the other cache's shard under this cache's name
    (path.parent / moved.name).rename(path)
    # written for the same key: still good. Now claim another key in its metadata.
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = {**handle.metadata(), "key": "0" * 24}
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    save_file(tensors, str(path), metadata=metadata)
    _, said = _load(tiny_model_dir, hh_jsonl, tokenizer, [data])
    assert "written for another reference, data or setting" in said[0]


def test_a_killed_scoring_pass_keeps_its_shards_and_a_rerun_continues(
    tiny, tiny_model_dir, hh_jsonl, cache_dir, monkeypatch
):
    _, tokenizer, data = tiny
    monkeypatch.setattr(store, "SHARD_SECONDS", 0.0)  # a shard after every batch
    real = score.score

    def killed_after_one_batch(*args):
        yield next(real(*args))
        raise KeyboardInterrupt

    monkeypatch.setattr(score, "score", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        _load(tiny_model_dir, hh_jsonl, tokenizer, [data])
    assert len(_shards(cache_dir)) == 1  # the first batch of 4 pairs, on disk
    # a leftover of a killed write (a process that is gone) is removed on the next read
    leftover = _shards(cache_dir)[0].parent / f".shard-0.safetensors~{_host()}~999999999.tmp"
    leftover.write_bytes(b"half")
    monkeypatch.setattr(score, "score", real)
    values, said = _load(tiny_model_dir, hh_jsonl, tokenizer, [data])
    assert not list(_shards(cache_dir)[0].parent.glob("*.tmp"))
    assert len(values) == 8 and said[-1].startswith("reference log-probs: scored 4 pairs")


def _host():
    import socket

    return socket.gethostname()


def test_a_read_only_cache_location_stops_before_scoring(
    tiny, tiny_model_dir, hh_jsonl, tmp_path, monkeypatch
):
    from tokenratio import modeling

    _, tokenizer, data = tiny
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(cache.ENV, str(blocker / "cache"))  # cannot be created, even by root
    loaded = []
    monkeypatch.setattr(modeling, "load_causal_lm", lambda cfg: loaded.append(cfg))
    with pytest.raises(reference.CacheLocationError, match="TOKENRATIO_REF_CACHE_DIR"):
        _load(tiny_model_dir, hh_jsonl, tokenizer, [data])
    assert loaded == []


def test_the_cache_goes_to_the_user_cache_directory_never_beside_the_data(
    tiny, tiny_model_dir, hh_jsonl, tmp_path, monkeypatch
):
    """$TOKENRATIO_CACHE_DIR, else $XDG_CACHE_HOME/tokenratio; a cache an earlier version wrote
    beside the data is still read (and nothing new is written there)."""
    _, tokenizer, data = tiny
    monkeypatch.delenv(cache.ENV)
    local = tmp_path / "data" / "hh.jsonl"
    local.parent.mkdir()
    shutil.copy(hh_jsonl, local)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("TOKENRATIO_CACHE_DIR", raising=False)
    _, said = _load(tiny_model_dir, local, tokenizer, [data])
    assert str(tmp_path / "xdg" / "tokenratio" / "ref-logps") in said[-1]
    assert list((tmp_path / "xdg").rglob("shard-*.safetensors"))
    assert sorted(p.name for p in local.parent.iterdir()) == ["hh.jsonl"]

    monkeypatch.setenv("TOKENRATIO_CACHE_DIR", str(tmp_path / "mine"))
    _, said = _load(tiny_model_dir, local, tokenizer, [data])
    assert f"into {tmp_path / 'mine' / 'ref-logps'}" in said[-1]

    beside = local.parent / "hh.jsonl.ref-logps"  # as an earlier version left it
    shutil.move(tmp_path / "mine" / "ref-logps", beside)
    _, said = _load(tiny_model_dir, local, tokenizer, [data])
    assert "read 8 pairs from" in said[-1] and str(beside) in said[-1]
    assert not (tmp_path / "mine" / "ref-logps").exists()  # nothing scored, nothing written


def test_an_unwritable_user_cache_is_one_line_naming_the_variable(
    tiny, tiny_model_dir, hh_jsonl, tmp_path, monkeypatch
):
    _, tokenizer, data = tiny
    monkeypatch.delenv(cache.ENV)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TOKENRATIO_CACHE_DIR", str(blocker / "cache"))
    with pytest.raises(reference.CacheLocationError, match=r"set \$TOKENRATIO_CACHE_DIR"):
        _load(tiny_model_dir, hh_jsonl, tokenizer, [data])


@pytest.mark.slow
def test_weights_swapped_in_place_are_rescored_not_read(
    tiny_model_dir, hh_jsonl, tmp_path, capsys, monkeypatch
):
    """The issue's case end to end: a cache written, the model's weights replaced in place by
    others of the same shapes with the old mtime; the next run must score again, and its step-1
    DPO loss is log 2 (policy = reference), not the stale cache's."""
    # a cache of its own: other tests train the same tiny model on the same file
    monkeypatch.setenv("TOKENRATIO_REF_CACHE_DIR", str(tmp_path / "ref-cache"))
    import math
    import os

    from safetensors.torch import load_file, save_file

    from test_trainer import run

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    settings = {"loss.name": "dpo", "train.max_steps": 1, "train.eval_every": 0}
    first = run(model, hh_jsonl, tmp_path / "first", **settings)
    assert "reference log-probs: scored" in capsys.readouterr().out
    assert first[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    weights = model / "model.safetensors"
    stat = weights.stat()
    g = torch.Generator().manual_seed(1)
    swapped = {
        k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in load_file(weights).items()
    }
    save_file(swapped, weights, metadata={"format": "pt"})
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = run(model, hh_jsonl, tmp_path / "second", **settings)
    out = capsys.readouterr().out
    assert (
        "reference log-probs: scored" in out and "read" not in out.split("reference log-probs:")[1]
    )
    assert second[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.slow
def test_tbpo_a_with_k3_trains_from_the_cache_without_a_reference(
    tiny_model_dir, hh_jsonl, tmp_path, capsys, monkeypatch
):
    from test_trainer import run

    copies = []
    real = reference.frozen_copy
    monkeypatch.setattr(reference, "frozen_copy", lambda p, *a: copies.append(p) or real(p, *a))
    settings = {"loss.name": "tbpo-a", "loss.options.kl_estimator": "k3", "train.max_steps": 3}
    records = run(tiny_model_dir, hh_jsonl, tmp_path / "k3", **settings, **{"train.k3_samples": 2})
    out = capsys.readouterr().out
    assert "reference: cached per-token log-probs and 2 k3 token(s)" in out
    assert [p.source for p in copies] == ["cached"]  # no frozen copy, no adapter: nothing runs
    assert all(math_finite(r["loss"]) for r in records if "loss" in r)
    assert any("eval_loss" in r for r in records)


def math_finite(x):
    import math

    return math.isfinite(x)
