"""The frozen trunk, computed once (docs/training.md, "The frozen trunk"; train.trunk_cache).

With LoRA on the last k of n decoder layers (model.lora_last_layers = k), the embeddings and layers
[0, n - k) carry no adapter and no gradient, and without dropout they are deterministic: the hidden
states entering layer n - k depend on a pair's tokens alone. They are the same for the policy and
its reference (the adapter off), in every epoch, and in every run and evaluation that starts from
the same weights. `TrunkCache` computes them once per pair, in the prefix-shared layout (prompt,
chosen, rejected: one row serves both layouts), keeps them in memory and in shard files, and
`fill` puts them into a collated batch, so a step runs only the upper layers and the head
(`modeling.decoder_states`).

The cache is named by the trunk's weights by content (`identity`: a hash of the embeddings' and
the trunk layers' tensors, so a merged checkpoint whose lower layers are the base model's finds
the training's states), the layer count, the dtype and autocast, the attention implementation and
the device type; it lives in the user cache directory's trunk/<key>/ (`directory`), in the shard
store the reference cache uses (shards.py: each pair found by its token ids, shards written about
once a minute as the pass runs, so a kill loses at most a minute; temporaries of killed writers
removed). A shard that is damaged, foreign or holds non-finite or misshapen states is dropped with
one line and its pairs are computed again. A complete cache is read from a read-only location;
one that must be written to an unwritable one stops in one line before the pass.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tokenratio import shards
from tokenratio.batch import PreferenceBatch, collate_shared
from tokenratio.modeling import decoder_layers, trunk_states, unwrap_peft
from tokenratio.paths import CACHE_ENV, user_cache_dir
from tokenratio.shards import IDS, DamagedShardError, keyed_rows, pair_key

FORMAT = "tokenratio-trunk/1"
_IGNORED_CONFIG = ("_name_or_path", "architectures", "transformers_version", "use_cache", "dtype")


class TrunkError(ValueError):
    """The trunk cannot be cached for this run; the message says why and what to set."""


DamagedTrunkShardError = DamagedShardError  # the store's: one error for every shard


def trunk_layers(model_cfg, model) -> int:
    """n - k: the layers below the first adapted one, checked frozen and deterministic in
    `model` (the policy as built, LoRA applied). TrunkError says why a run cannot use it."""
    if model_cfg.lora_r <= 0:
        raise TrunkError(
            "train.trunk_cache needs LoRA on the last layers (model.lora_r > 0 and "
            "model.lora_last_layers > 0): under full fine-tuning every layer trains"
        )
    inner = unwrap_peft(model)
    total = len(decoder_layers(inner))
    if not 0 < model_cfg.lora_last_layers < total:
        raise TrunkError(
            f"train.trunk_cache needs model.lora_last_layers between 1 and {total - 1} (it is "
            f"{model_cfg.lora_last_layers}): with LoRA on every layer there is no frozen trunk"
        )
    start = total - model_cfg.lora_last_layers
    for name, module in _trunk_modules(inner, start):
        if any(p.requires_grad for p in module.parameters()):
            raise TrunkError(f"train.trunk_cache: {name} trains, so the trunk is not frozen")
        dropout = _active_dropout(module, inner.config)
        if dropout:
            raise TrunkError(
                f"train.trunk_cache: {name} has dropout {dropout:g}, so the trunk is not "
                "deterministic in training; set its dropout to 0 or train.trunk_cache = false"
            )
    return start


def _trunk_modules(inner, start: int) -> list[tuple[str, nn.Module]]:
    embeddings = inner.get_input_embeddings()
    layers = decoder_layers(inner)
    return [("the embeddings", embeddings)] + [(f"layer {i}", layers[i]) for i in range(start)]


def _active_dropout(module: nn.Module, config) -> float:
    """The largest dropout probability that acts in training: a Dropout module's, or the
    config's attention dropout (applied functionally inside attention)."""
    found = [m.p for m in module.modules() if isinstance(m, nn.Dropout)]
    found.append(float(getattr(config, "attention_dropout", 0.0) or 0.0))
    return max(found)


def identity(inner, layers: int, precision: str, device_type: str) -> str:
    """The cache's name: a hash of the trunk's tensors and of what decides its outputs."""
    digest = hashlib.sha256()
    config = {k: v for k, v in inner.config.to_dict().items() if k not in _IGNORED_CONFIG}
    config.pop("num_hidden_layers", None)  # a layer count above the trunk changes nothing in it
    attention = getattr(inner.config, "_attn_implementation", None) or "sdpa"
    header = [FORMAT, layers, precision, device_type, attention, config]
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, module in _trunk_modules(inner, layers):
        for tensor_name, tensor in sorted(module.state_dict().items()):
            digest.update(f"{name}.{tensor_name}{tuple(tensor.shape)}{tensor.dtype}".encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:24]


def shared_layers(model, reference) -> int:
    """How many leading decoder layers (embeddings included) two models hold identically: the
    trunk an evaluation of a LoRA-trained model against its base can share (0: none). Capped at
    n - 1, so at least one layer runs on the cached states."""
    a, b = unwrap_peft(model), unwrap_peft(reference)
    if not torch.equal(a.get_input_embeddings().weight, b.get_input_embeddings().weight):
        return 0
    layers_a, layers_b = decoder_layers(a), decoder_layers(b)
    count = 0
    for left, right in zip(layers_a, layers_b, strict=False):
        sa, sb = left.state_dict(), right.state_dict()
        if sa.keys() != sb.keys() or not all(torch.equal(sa[k], sb[k]) for k in sa):
            break
        count += 1
    return min(count, len(layers_a) - 1)


class TrunkCache:
    """Per pair, the trunk's hidden states (P + C + R, H) in the prefix-shared layout."""

    def __init__(self, layers: int, key: str, directory: Path | None = None):
        self.layers, self.key, self.directory = layers, key, directory
        self.states: dict[bytes, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self.states)

    def read(self, say=print) -> None:
        """Every good shard in the directory (a bad one is named, removed and recomputed)."""
        if self.directory is None:
            return
        found = shards.read_directory(
            self.directory,
            lambda path: read_shard(path, self.key),
            lambda line: say(f"trunk cache: {line}"),
        )
        for _, tensors in found:
            self._add(tensors)

    def _add(self, tensors: dict) -> None:
        lengths = tensors["lengths"].sum(1).tolist()
        starts = np.cumsum([0, *lengths])
        for i, key in enumerate(tensors["keys"].numpy()):
            self.states[key.tobytes()] = tensors["hidden"][starts[i] : starts[i + 1]]

    @torch.no_grad()
    def compute_missing(self, inner, rows, pad_id: int, batch_size: int, autocast, bar=None):
        """The trunk over the pairs this cache lacks, longest first, written as it goes (a shard
        about every minute, `shards.ShardWriter`); returns how many pairs it computed."""
        todo = shards.missing_longest_first(((pair_key(r), r) for r in rows), self.states)
        metadata = {"format": FORMAT, "key": self.key}
        writer = shards.ShardWriter(self.directory, _pack, metadata)
        device = next(inner.parameters()).device
        ordered = list(todo.items())
        for start in range(0, len(ordered), batch_size):
            chunk = ordered[start : start + batch_size]
            batch = collate_shared([row for _, row in chunk], pad_id).to(device)
            with autocast():
                hidden = trunk_states(inner, batch, self.layers).cpu()
            entries = []
            for i, (key, row) in enumerate(chunk):
                length = sum(len(row[name]) for name in IDS)
                entries.append((key, row, hidden[i, :length].clone()))
            writer.add(entries)
            if bar is not None:
                bar.update(len(chunk))
        writer.flush()
        for tensors in writer.written:
            self._add(tensors)
        return len(ordered)

    def fill(self, batch: PreferenceBatch, rows: list[dict]) -> PreferenceBatch:
        """`batch` (collated from `rows`, either layout) with `trunk_hidden`: each input row's
        cached states, zeros at padding. Plain rows are prompt + chosen and prompt + rejected."""
        B, L = len(rows), batch.input_ids.shape[1]
        width = next(iter(self.states.values())).shape[-1] if self.states else 0
        cached = [self.states[pair_key(row)] for row in rows]
        hidden = torch.zeros(batch.input_ids.shape[0], L, width, dtype=cached[0].dtype)
        for i, (row, states) in enumerate(zip(rows, cached, strict=True)):
            P, C = len(row["prompt_ids"]), len(row["chosen_ids"])
            if batch.segments is not None:
                hidden[i, : len(states)] = states
            else:
                hidden[i, : P + C] = states[: P + C]
                hidden[B + i, :P] = states[:P]
                hidden[B + i, P : len(states) - C] = states[P + C :]
        batch.trunk_hidden, batch.trunk_layers = hidden, self.layers
        return batch


def _pack(entries: list) -> dict:
    keys = np.frombuffer(b"".join(key for key, _, _ in entries), np.uint8).reshape(-1, 16)
    lengths = [[len(row[name]) for name in IDS] for _, row, _ in entries]
    return {
        "keys": torch.tensor(keys),
        "lengths": torch.tensor(lengths, dtype=torch.long),
        "hidden": torch.cat([states for _, _, states in entries]).contiguous(),
    }


def write_shard(directory: Path, tensors: dict, key: str) -> Path:
    return shards.write_shard(directory, tensors, {"format": FORMAT, "key": key})


def read_shard(path: Path, key: str) -> dict:
    """A shard's tensors, checked (DamagedShardError says what is wrong)."""
    expected = {"format": FORMAT, "key": key}
    tensors = shards.read_shard(path, expected, "trunk, format or setting")
    keys, lengths, hidden = (tensors.get(k) for k in ("keys", "lengths", "hidden"))
    if keys is None or lengths is None or hidden is None or hidden.ndim != 2:
        raise DamagedShardError("keys, lengths or hidden states missing or misshapen")
    if lengths.shape != (keys.shape[0], 3) or int(lengths.sum()) != hidden.shape[0]:
        raise DamagedShardError("its lengths do not match its hidden states")
    if not bool(torch.isfinite(hidden).all()):
        raise DamagedShardError("non-finite hidden states")
    return tensors


def for_run(cfg, parts, tokenizer, datasets, progress: bool) -> TrunkCache:
    """The trunk cache of a training run (train.trunk_cache): the policy's frozen layers over
    every pair of `datasets` (train and held-out), computed where missing."""
    accelerator = parts.accelerator
    if accelerator.num_processes > 1:
        raise TrunkError(
            "train.trunk_cache runs in one process for now: launch without several processes "
            "or set train.trunk_cache = false"
        )
    if cfg.train.compile:
        raise TrunkError("train.trunk_cache and train.compile exclude each other: set one false")
    policy = accelerator.unwrap_model(parts.policy)
    layers = trunk_layers(cfg.model, policy.model)
    inner = unwrap_peft(policy.model)
    precision = f"{cfg.model.dtype}/{cfg.train.mixed_precision}"
    key = identity(inner, layers, precision, accelerator.device.type)
    rows = [row for _, row in keyed_rows(datasets)]
    compute = (tokenizer.pad_token_id, cfg.train.eval_batch_size, accelerator.autocast)
    return load_or_compute(inner, layers, key, rows, compute, progress)


def directory(key: str) -> Path:
    """Where the cache named `key` lives: trunk/<key>/ in the user cache directory, or where an
    earlier version wrote it (ref-logps/trunk-<key>/ there), when it exists."""
    root = user_cache_dir()
    earlier = root / "ref-logps" / f"trunk-{key}"
    return earlier if earlier.is_dir() else root / "trunk" / key


def load_or_compute(inner, layers: int, key: str, rows, compute, progress):
    """The cache named `key`, read, with the states of `rows` it lacks computed by `inner` and
    written as they come. `compute`: (pad id, batch size, autocast context factory)."""
    from tqdm.auto import tqdm

    where = directory(key)
    cache = TrunkCache(layers, key, where)
    cache.read()
    missing = len(shards.missing_longest_first(((pair_key(r), r) for r in rows), cache.states))
    if not missing:
        print(f"frozen trunk: read {len(cache)} pairs from {where}")
        return cache
    if not shards.is_writable(where):
        raise TrunkError(
            f"trunk cache: cannot write to {where} ({missing} pairs to compute): set "
            f"${CACHE_ENV} to a writable directory, or set train.trunk_cache = false"
        )
    pad_id, batch_size, autocast = compute
    was_training = inner.training
    inner.eval()
    with tqdm(total=missing, desc="frozen trunk", disable=not progress, leave=False) as bar:
        cache.compute_missing(inner, rows, pad_id, batch_size, autocast, bar)
    inner.train(was_training)
    print(f"frozen trunk: {layers} layers over {missing} pairs into {where}")
    return cache
