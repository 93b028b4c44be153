"""Disjoint train / validation / test files cut from one preference data set.

Records are deduplicated by content first (a pair that appears twice must not sit on both sides of a
split), shuffled with `split_seed`, and cut into the three sizes. The files are plain JSON lines of
the source records, so `tokenratio train` and `tokenratio eval` read them like any other data;
`splits.json` lists each split's source rows and content hashes, and `check_disjoint` verifies them.
"""

import random
from pathlib import Path

from tokenratio.atomic import write_json, write_jsonl
from tokenratio.provenance import fingerprint
from tokenratio.study.reuse import read_json

SPLITS = ("train", "valid", "test")


def make_splits(data_path: str, sizes: dict[str, int], seed: int, out: Path) -> dict[str, str]:
    """Write out/{train,valid,test}.jsonl and out/splits.json (skipped when they exist with the
    same source, sizes and seed); returns the three paths."""
    from tokenratio.data import DataError, load_raw

    settings = {"source": str(data_path), "sizes": sizes, "seed": seed}
    paths = {name: str(out / f"{name}.jsonl") for name in SPLITS}
    manifest = out / "splits.json"
    if manifest.exists() and read_json(manifest)["settings"] == settings:
        return paths
    records = list(load_raw(data_path).dataset)
    unique = {}
    for index, record in enumerate(records):
        unique.setdefault(fingerprint(record), index)
    order = sorted(unique.values())
    random.Random(seed).shuffle(order)
    needed = sum(sizes[name] for name in SPLITS)
    if needed > len(order):
        raise DataError(
            f"{data_path}: {len(order)} distinct records, fewer than the {needed} the study's "
            "train_pairs + valid_pairs + test_pairs ask for"
        )
    out.mkdir(parents=True, exist_ok=True)
    rows, start = {}, 0
    for name in SPLITS:
        rows[name] = order[start : start + sizes[name]]
        start += sizes[name]
        write_jsonl(Path(paths[name]), [records[i] for i in rows[name]])
    hashes = {name: [fingerprint(records[i]) for i in rows[name]] for name in SPLITS}
    write_json(manifest, {"settings": settings, "rows": rows, "hashes": hashes}, indent=None)
    check_disjoint(manifest)
    return paths


def check_disjoint(manifest: Path) -> None:
    """Raise if any record (by source row or by content) is in two splits."""
    written = read_json(manifest)
    for key in ("rows", "hashes"):
        seen: dict = {}
        for name in SPLITS:
            for item in written[key][name]:
                if item in seen:
                    raise ValueError(f"{manifest}: {item} is in both {seen[item]} and {name}")
                seen[item] = name
