"""Which records a run trained on and which it held out (`splits.json` in the run directory), so
that `tokenratio eval` evaluates a run on its own held-out split and says loudly, with the count,
when the pairs it evaluates were trained on.

Records are matched by a fingerprint of their content, not their position, so a copied, cut or
reordered file is still recognised.
"""

import hashlib
import json
from pathlib import Path

SPLITS_NAME = "splits.json"


def fingerprint(record: dict) -> str:
    """A record's content hash (also the study's split hashes, so they stay comparable)."""
    text = json.dumps(record, sort_keys=True, default=str)  # ASCII: lone surrogates escaped
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprints(raw, indices) -> list[str]:
    return [fingerprint(raw.dataset[int(i)]) for i in indices]


def splits_record(cfg, raw_train, train_indices, heldout_indices) -> dict:
    """What splits.json holds: the record indices of each split in its file, and the training
    records' fingerprints."""
    return {
        "train": {"path": cfg.data.path, "records": [int(i) for i in train_indices]},
        "heldout": {
            "path": cfg.data.heldout_path or cfg.data.path,
            "records": [int(i) for i in heldout_indices],
        },
        "train_fingerprints": fingerprints(raw_train, train_indices),
    }


def read_splits(run_dir: Path) -> dict | None:
    """A run's splits.json (None without one); a damaged one is a ValueError naming it."""
    path = Path(run_dir) / SPLITS_NAME
    if not path.exists():
        return None
    try:
        splits = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{path}: not readable JSON ({err}): evaluate with --data instead"
        ) from None
    if not isinstance(splits, dict) or not {"heldout", "train_fingerprints"} <= splits.keys():
        raise ValueError(f"{path}: not a run's splits record: evaluate with --data instead")
    return splits


def run_dir_of(model_path: str) -> Path | None:
    """The training run a model directory came from (its final/ parent), if it has splits.json."""
    for candidate in (Path(model_path), Path(model_path).parent):
        if (candidate / SPLITS_NAME).exists():
            return candidate
    return None


def trained_on(raw, run_dir: Path) -> int:
    """How many of `raw`'s records the run trained on."""
    seen = set(read_splits(run_dir)["train_fingerprints"])
    return sum(fingerprint(raw.dataset[i]) in seen for i in range(len(raw.dataset)))
