"""`train.ref_cache`: the reference's per-token values, scored once and kept on disk, so later
runs, seeds and evaluations never load or run the reference.

Where: $TOKENRATIO_REF_CACHE_DIR when set (and only there), else the user cache directory's
ref-logps/ (`paths.user_cache_dir`: $TOKENRATIO_CACHE_DIR, $XDG_CACHE_HOME/tokenratio or
~/.cache/tokenratio), written there and never beside the data; a cache an earlier version wrote
beside a local data file (`<data>.ref-logps/`) is still read. Inside, one directory per cache key
(`key.cache_key`) holding shard files (`store.py`), in which each pair is found by a hash of its
token ids, so a pair is never given another pair's values, whatever the order or the split.
"""

import contextlib
import os
from math import ceil
from pathlib import Path

import torch

from tokenratio import shards
from tokenratio.paths import CACHE_ENV, user_cache_dir
from tokenratio.reference import key as keys
from tokenratio.reference import score as reference_score
from tokenratio.reference import store
from tokenratio.reference.store import CachedValues, ShardWriter
from tokenratio.sharding import shard_frozen, shards_models

ENV = "TOKENRATIO_REF_CACHE_DIR"


class CacheLocationError(OSError):
    """No location the cache can be written to; the message says which and what to change
    (an OSError: every command says it in one line)."""


def roots(data_path: str) -> list[Path]:
    """Where caches lie: the first is the one written, the others are only read (module
    docstring)."""
    if os.environ.get(ENV):
        return [Path(os.environ[ENV]).expanduser()]
    found = [user_cache_dir() / "ref-logps"]
    local = Path(data_path).expanduser()
    beside = local.resolve().parent / f"{local.name}.ref-logps"
    if local.is_file() and beside.is_dir():  # written there by an earlier version
        found.append(beside)
    return found


def writable_dir(directory: Path) -> Path:
    """`directory` (where caches are written: the first of `roots`), checked: CacheLocationError
    before any scoring when it cannot be written."""
    if shards.is_writable(directory):
        return directory
    where = str(directory)
    fix = (
        f"point ${ENV} at a writable directory"
        if os.environ.get(ENV)
        else f"set ${CACHE_ENV} to a writable directory"
    )
    raise CacheLocationError(
        f"reference cache: cannot write to {where}: {fix}, or set train.ref_cache = false"
    )


def read(
    directories: list[Path], cache_key: str, samples: int, vocab_size: int, say
) -> CachedValues:
    """Every good shard under `directories`; a bad one is named in one line (via `say`), removed
    where it can be, and its pairs are scored again (`shards.read_directory`)."""
    values = CachedValues(samples)

    def read_one(path: Path) -> dict:
        return store.read_shard(path, cache_key, samples, vocab_size)

    for directory in directories:
        found = shards.read_directory(directory, read_one, lambda line: say(_said(line)))
        for path, tensors in found:
            values.add(tensors, path)
    return values


def _said(line: str) -> str:
    return "reference cache: " + line.replace("computed again", "scored again")


def _drop(path: Path, why: str, say) -> None:
    say(f"reference cache: {path}: {why}; its pairs are scored again")
    shards.drop(path)  # read-only: rescored into a writable location


def fill_missing(
    model_loader, todo: dict, writer: ShardWriter, run, trunk=None, lockstep=None
) -> None:
    """Score this process's share of `todo` into `writer` (shards on disk as it goes, when it
    has a directory). `run`: the pad id, eval batch size, progress flag and autocast context;
    `trunk`: a trunk.TrunkCache holding these pairs (the reference runs only above it);
    `lockstep`: under sharding (each forward pass gathers every process's shards), (the number
    of passes every process makes, a pair to pad with): its own batches, then idle passes."""
    pad_id, batch_size, progress, autocast = run
    if todo or lockstep:
        model = model_loader()
        with autocast():
            scored = reference_score.score(
                model, todo, pad_id, batch_size, writer.samples, progress, trunk
            )
            for entries in scored:
                writer.add(entries)
            if lockstep:
                passes, filler = lockstep
                reference_score.idle_passes(
                    model, filler, pad_id, passes - ceil(len(todo) / batch_size)
                )
        del model
    writer.flush()


def gather(accelerator, shards: list[dict]) -> list[list[dict]]:
    """Every process's freshly scored shards, on every process, by process index."""
    if accelerator.num_processes == 1:
        return [shards]
    from accelerate.utils import gather_object

    return gather_object([shards])


def load_or_score(
    cfg, plan, accelerator, tokenizer, datasets, progress: bool, trunk=None
) -> CachedValues:
    """The cached values of every pair in `datasets`; the missing ones are scored once, shared
    out over the processes (each loads the reference for that and drops it; under FSDP2 they
    shard it and run it in lockstep), under the training's autocast (above the frozen trunk's
    cached states when `trunk` holds them). Every process keeps every value; the main process
    writes the shards, its own as it goes."""
    device = accelerator.device
    cache_key = keys.cache_key(cfg, plan.identity, tokenizer, device.type, plan.samples)
    directories = [root / cache_key for root in roots(cfg.data.path)]
    say = accelerator.print
    values = read(directories, cache_key, plan.samples, len(tokenizer), say)
    rows = reference_score.keyed_rows(datasets)
    for path in values.drop_mismatched(rows):
        _drop(path, "entries whose lengths differ from their pairs'", say)
    todo = reference_score.missing(rows, values)
    if not todo:
        say(f"reference log-probs: read {len(values)} pairs from {_found_in(directories)}")
        return values
    target = writable_dir(directories[0])  # before scoring, never after
    accelerator.wait_for_everyone()  # every process has read before any writes
    count, main = accelerator.num_processes, accelerator.is_main_process
    share = reference_score.shard(todo, accelerator.process_index, count)
    writer = ShardWriter(target if main else None, cache_key, plan.samples)
    batch_size = cfg.train.eval_batch_size
    lockstep = None
    if shards_models(accelerator):  # as many passes as the largest share needs
        lockstep = (ceil(ceil(len(todo) / count) / batch_size), next(iter(todo.values())))
    show_bar = progress and main  # one bar, as the training loop's
    run = (tokenizer.pad_token_id, batch_size, show_bar, accelerator.autocast)
    fill_missing(_reference_loader(cfg, accelerator), share, writer, run, trunk, lockstep)
    for index, written in enumerate(gather(accelerator, writer.written)):
        for tensors in written:
            values.add(tensors)
            if main and index != accelerator.process_index:
                store.write_shard(target, tensors, cache_key, plan.samples)
    accelerator.wait_for_everyone()
    say(f"reference log-probs: scored {len(todo)} pairs into {target}")
    return values


def _reference_loader(cfg, accelerator):
    """How the scoring pass gets the reference: whole on this process's device, or, under
    sharding, the frozen PolicyWithHead sharded as the policy is (`sharding.shard_frozen`)."""
    from tokenratio.modeling import PolicyWithHead, load_causal_lm

    def load():
        model = load_causal_lm(cfg.model)
        if not shards_models(accelerator):
            return model.to(accelerator.device).eval()
        frozen = PolicyWithHead(model).use_head_settings(cfg.train).eval().requires_grad_(False)
        return shard_frozen(accelerator, frozen)

    return load


def _found_in(directories: list[Path]) -> str:
    return ", ".join(str(d) for d in directories if d.is_dir())


@torch.no_grad()
def score_rows(
    model, rows: list[dict], pad_id: int, batch_size: int, samples: int, trunk=None
) -> CachedValues:
    """The cached values of `rows` scored in memory, no file (the perf harness's untimed pass,
    as TRL's precompute), above the frozen trunk when `trunk` holds the rows."""
    values = CachedValues(samples)
    writer = ShardWriter(None, "", samples)
    todo = reference_score.missing(((store.pair_key(row), row) for row in rows), values)
    run = (pad_id, batch_size, False, contextlib.nullcontext)
    fill_missing(lambda: model, todo, writer, run, trunk)
    for tensors in writer.written:
        values.add(tensors)
    return values
