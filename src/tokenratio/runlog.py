"""A run's log, metrics.jsonl: one JSON record a line, appended by the trainer, read by the curves,
the study, the perf harness and a finished run's summary, and trimmed on resume. A damaged line
is a RunLogError naming the file and the line, wherever it is read."""

import json
from pathlib import Path

from tokenratio.atomic import write_text

NAME = "metrics.jsonl"


class RunLogError(ValueError):
    """A line of a run's log that is not a JSON record; the message names the file and line."""


def append(path: Path, record: dict) -> None:
    with Path(path).open("a") as handle:
        handle.write(json.dumps(record) + "\n")


def read(path: Path) -> list[dict]:
    """Every record of the log (none when there is no file yet)."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise RunLogError(f"{path}: not UTF-8 text ({err.reason}){_FIX}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RunLogError(
                f"{path}, line {number}: not a JSON record ({err.msg}){_FIX}"
            ) from None
        if not isinstance(record, dict):
            raise RunLogError(f"{path}, line {number}: not a JSON object{_FIX}")
        records.append(record)
    return records


_FIX = ": remove or repair that line (each line is one JSON object)"


def last_evaluation(path: Path) -> dict:
    """The last held-out evaluation logged (its eval_ metrics and step), or {}."""
    evaluated = [r for r in read(path) if any(k.startswith("eval_") for k in r)]
    return evaluated[-1] if evaluated else {}


def trim(path: Path, step: int) -> None:
    """Drop records past the resumed step: the resumed run logs them again, once."""
    path = Path(path)
    if not path.exists():
        return
    if step == 0:  # starting over: none of the old records belong to this run
        path.unlink()
        return
    records = read(path)
    kept = [r for r in records if r.get("step", 0) <= step]
    if len(kept) != len(records):
        write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
