"""One report writer and one table formatter for every benchmark regime.

Each regime hands over its results (JSON-ready) and its rows; `write_report` writes `<regime>.json`
and `<regime>.txt` into the output directory, atomically (a temporary file, then a rename).
"""

import json
from pathlib import Path

from tokenratio.atomic import write_text


def format_cell(value, spec: str) -> str:
    """A number with `spec`, a (mean, spread) pair as mean±spread (the spread only when non-zero),
    or a string as it is. No "-0.000": a value that rounds to zero prints without its sign."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple | list):
        mean, spread = value
        text = format_cell(mean, spec)
        return f"{text}±{format_cell(spread, spec)}" if spread else text
    text = f"{value:{spec}}"
    return text.lstrip("-") if text.startswith("-") and float(text) == 0 else text


def format_table(rows: list[dict], columns: list[tuple[str, str]], footer: list[str] = ()) -> str:
    """Rows as an aligned text table.

    Args:
        rows: one dict per row.
        columns: (key, format spec) per column, in order; the key is also the header.
        footer: lines printed under the table.
    """
    cells = [[key for key, _ in columns]]
    cells += [[format_cell(row.get(key, ""), spec) for key, spec in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True)) for line in cells]
    return "\n".join([*lines, *footer])


def write_report(out: Path, regime: str, results: dict, table: str) -> list[Path]:
    """Write `<regime>.json` (everything) and `<regime>.txt` (the table); returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{regime}.json", out / f"{regime}.txt"]
    write_text(paths[0], json.dumps(results, indent=1) + "\n")
    write_text(paths[1], table + "\n")
    return paths
