"""A study never reports what it did not compute: a finished or interrupted run, or a test
evaluation, is reused only when the settings it was made with are the ones the study now asks
for, and when the inputs it read are the same by content (`inputs.json`: the data splits, the
base model's files, the evaluated model's files: a changed split seed, weights changed in place
or an adapter swapped between runs all count). Otherwise the study stops with one line naming
what differs (`--overwrite` redoes them; a new study.output_dir keeps both)."""

import functools
import json
import shutil
from pathlib import Path

from tokenratio import atomic

INPUTS = "inputs.json"


class StudyReuseError(ValueError):
    """Results on disk made with other settings than the study's; the message names them."""


def read_json(path: Path):
    """A study file's JSON; a damaged one (empty, cut short, not JSON) is one line naming it."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StudyReuseError(
            f"{path} is damaged ({err}): remove it and run the study again, which remakes it"
        ) from None


def flatten(value, prefix: str = "") -> dict:
    """{"train": {"lr": 1}} -> {"train.lr": 1}; lists and tuples alike (JSON has no tuples)."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): json.loads(json.dumps(value, default=str))}


def differences(stored: dict, expected: dict, ignore: tuple = ()) -> list[str]:
    """'key: stored -> expected' for every key both hold with different values (a key only one
    holds comes from another tokenratio version's schema, and its default, so it is not compared)."""
    a, b = flatten(stored), flatten(expected)
    keys = sorted(k for k in a.keys() & b.keys() if a[k] != b[k] and k not in ignore)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in keys]


def check(directory: Path, stored_file: str, expected: dict, overwrite: bool, *, key=None) -> None:
    """Raise StudyReuseError when `directory` holds results made with other settings than
    `expected` (`key` picks the settings out of the stored JSON); with `overwrite`, remove them."""
    path = directory / stored_file
    if not path.exists():
        return
    stored = read_json(path)
    stored = key(stored) if key else stored
    changed = differences(stored, expected, ignore=("progress",))
    if not changed:
        return
    if overwrite:
        shutil.rmtree(directory)
        return
    shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
    raise StudyReuseError(
        f"{directory} was made with other settings than this study asks for ({shown}): rerun "
        "with --overwrite to redo it, or set a new study.output_dir"
    )


def digest(path: str | Path) -> str:
    """A file's or directory's content hash (a hub name: the name itself), computed once per
    content stamp (every file's size and modification time)."""
    path = Path(path)
    if not path.exists():
        return f"name:{path}"
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _digest(str(path), stamp)


@functools.lru_cache(maxsize=256)
def _digest(path: str, stamp: tuple) -> str:
    from tokenratio.reference.key import file_digest, tree_digest

    return tree_digest(Path(path)) if Path(path).is_dir() else file_digest(Path(path))


def check_inputs(directory: Path, inputs: dict, overwrite: bool) -> None:
    """Refuse (or with `overwrite` remove) `directory` when its recorded inputs differ from
    `inputs` by content; then record them, so an interrupted run is checked on its resume."""
    path = directory / INPUTS
    if path.exists():
        changed = [k for k in sorted(inputs) if read_json(path).get(k) != inputs[k]]
        if changed and not overwrite:
            raise StudyReuseError(
                f"{directory} was made from other inputs than this study's (changed by content: "
                f"{', '.join(changed)}): rerun with --overwrite to redo it, or set a new "
                "study.output_dir"
            )
        if changed:
            shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic.write_json(path, inputs)
