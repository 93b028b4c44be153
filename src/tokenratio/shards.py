"""The shard store both caches keep their values in: the reference cache (reference/store.py) and
the frozen trunk (trunk.py).

A shard is a safetensors file (plain tensors: nothing to unpickle, so a crafted file runs
nothing) whose metadata holds what decides its values (the cache's format and key, and any other
setting) and a sha256 of its tensors; `read_shard` checks them all, the cache checks the values.
Inside a cache each pair is found by `pair_key`, a hash of its token ids, never by its position.
Shards are published whole (`atomic.write_bytes`), one about every SHARD_SECONDS while a pass
runs (`ShardWriter`), so a kill loses at most the last minute; the temporaries of killed writers
are removed by the next reader (`read_directory`), which also names a damaged shard in one line,
removes it where it can, and leaves its pairs to be computed again. Pairs are computed longest
first (`missing_longest_first`): little padding per batch, and the largest batch first, so memory
runs out at once if it will.
"""

import contextlib
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from tokenratio import atomic

SHARD_SECONDS = 60.0
IDS = ("prompt_ids", "chosen_ids", "rejected_ids")


class DamagedShardError(ValueError):
    """A shard that cannot be used; the message says why."""


def pair_key(row: dict) -> bytes:
    """16 bytes that identify a pair by its token ids (prompt, chosen, rejected)."""
    digest = hashlib.blake2b(digest_size=16)
    for name in IDS:
        ids = np.asarray(row[name], dtype="<i8")
        digest.update(len(ids).to_bytes(8, "little"))
        digest.update(ids.tobytes())
    return digest.digest()


def missing_longest_first(keyed_rows: Iterable[tuple[bytes, dict]], have) -> dict:
    """{pair key: token ids} of the distinct pairs not in `have`, by their prefix-shared row
    length, longest first. `keyed_rows`: (pair_key(row), row)."""
    todo = {}
    for key, row in keyed_rows:
        if key not in have and key not in todo:
            todo[key] = {name: list(row[name]) for name in IDS}
    return dict(sorted(todo.items(), key=lambda kv: -sum(len(ids) for ids in kv[1].values())))


def keyed_rows(datasets) -> list[tuple[bytes, dict]]:
    """(pair key, token ids) of every row of `datasets`, read by column (reading a `datasets`
    table row by row costs ~0.2 ms a row: 9 s at 50k pairs)."""
    out = []
    for data in datasets:
        columns = data.select_columns(list(IDS)).with_format(None)[:]
        for ids in zip(*(columns[name] for name in IDS), strict=True):
            row = dict(zip(IDS, ids, strict=True))
            out.append((pair_key(row), row))
    return out


def checksum(tensors: dict) -> str:
    """sha256 over the tensors' names and bytes (any dtype)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_shard(directory: Path, tensors: dict, metadata: dict) -> Path:
    """One shard, complete or not at all, its metadata and checksum inside."""
    from safetensors.torch import save

    directory.mkdir(parents=True, exist_ok=True)
    data = save(tensors, metadata={**metadata, "sha256": checksum(tensors)})
    return atomic.write_bytes(directory / f"shard-{uuid.uuid4().hex[:16]}.safetensors", data)


def read_shard(path: Path, expected: dict, what: str) -> dict:
    """A shard's tensors, its metadata `expected` (format first) and its checksum checked;
    DamagedShardError says what is wrong. `what`: whose shard it should be, for the message."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except Exception as err:  # truncated, empty, not safetensors: all say the same to a user
        raise DamagedShardError(f"not a readable safetensors file ({type(err).__name__})") from None
    if metadata.get("format") != expected["format"]:
        raise DamagedShardError(
            f"format {metadata.get('format')!r}, expected {expected['format']!r}"
        )
    if any(metadata.get(name) != value for name, value in expected.items()):
        raise DamagedShardError(f"written for another {what}")
    if metadata.get("sha256") != checksum(tensors):
        raise DamagedShardError("its checksum does not match its contents")
    return tensors


def remove_leftovers(directory: Path) -> None:
    """Temporary files of killed writers: this host's whose process is gone, anyone's after a day."""
    for tmp in directory.glob(".shard-*.tmp"):
        if atomic.is_leftover(tmp) or time.time() - tmp.stat().st_mtime > 86400:
            tmp.unlink(missing_ok=True)


def read_directory(directory: Path, read: Callable[[Path], dict], say) -> list:
    """(path, tensors) of every good shard in `directory` (`read`: read_shard and the cache's
    checks); a bad one is named in one line via `say`, removed where it can be. Leftover
    temporaries are removed where the directory is writable."""
    if not directory.is_dir():
        return []
    if os.access(directory, os.W_OK):
        remove_leftovers(directory)
    found = []
    for path in sorted(directory.glob("shard-*.safetensors")):
        try:
            found.append((path, read(path)))
        except DamagedShardError as err:
            say(f"{path}: {err}; its pairs are computed again")
            drop(path)
    return found


def drop(path: Path) -> None:
    """Remove a shard; in a read-only location it stays and is skipped on every read."""
    with contextlib.suppress(OSError):
        path.unlink()


def is_writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


class ShardWriter:
    """Computed entries to shard files as they come: one shard about every `seconds`.
    `pack`: entries -> a shard's tensors; `directory` None: kept in memory only."""

    def __init__(self, directory: Path | None, pack: Callable, metadata: dict, seconds=None):
        self.directory, self.pack, self.metadata = directory, pack, metadata
        self.seconds = SHARD_SECONDS if seconds is None else seconds
        self.pending: list = []
        self.written: list[dict] = []  # every shard's tensors, in the order written
        self.last = time.perf_counter()

    def add(self, entries: list) -> None:
        self.pending += entries
        if time.perf_counter() - self.last >= self.seconds:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            tensors = self.pack(self.pending)
            if self.directory is not None:
                write_shard(self.directory, tensors, self.metadata)
            self.written.append(tensors)
            self.pending = []
        self.last = time.perf_counter()
