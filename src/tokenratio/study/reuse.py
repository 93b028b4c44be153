"""A study never reports what it did not compute: a finished or interrupted run, or a test
evaluation, is reused only when the settings it was made with are the ones the study now asks
for. Otherwise the study stops with one line naming the keys that differ (`--overwrite` redoes
them; a new study.output_dir keeps both)."""

import json
import shutil
from pathlib import Path


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
