"""JSON-lines preference files read line by line, so that no line, however broken, crashes a run:
each fault is named by a reason, a file and a line. With data.on_invalid = "error" the first one
stops the run; with "skip" every one is skipped and counted by reason (data_report.json).

Faults caught here, before any record reaches Arrow: bytes that are not UTF-8, malformed or
truncated JSON, nesting too deep to parse, a line that is not a JSON object (null, a list, a
number), lone surrogates, a first record of no known format, and missing fields or fields of the
wrong type for the file's format (formats.check_types). A UTF-8 byte-order mark is not a fault.
"""

import gzip
import json
import zlib
from pathlib import Path

from tokenratio.formats import KNOWN_FIELDS, RecordError, check_types, detect_format, pair_weight

BOM = b"\xef\xbb\xbf"
# The longest line read: a record past it is a fault (skipped and counted, or the run stops),
# read past in pieces and never held, so one enormous line costs no more memory than this.
MAX_LINE_BYTES = 16 << 20


class LineFaultError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


def read_records(path: Path, fmt: str, on_invalid: str, error_type=ValueError, limit=None, keep=()):
    """(records, their line numbers, skipped faults as (reason, 'file, line N: detail')).

    `fmt`: the configured format, or "auto" (the first usable record's). Records keep only the
    fields some format reads, so unrelated columns of mixed types cannot upset Arrow. With
    `limit`, reading stops after that many records (a bad line after them is never read).
    `keep`: more fields to keep, each a pair weight (data.pair_weight_field), checked here.
    """
    fields = [*KNOWN_FIELDS, *keep]
    records, numbers, skipped = [], [], []
    for number, raw in _numbered_lines(path, error_type):
        if limit is not None and len(records) >= limit:
            break
        try:
            record = parse_line(raw, first=number == 1)
            if record is None:
                continue
            fmt = detect_format(record) if fmt == "auto" else fmt  # the first usable record's
            check_types(record, fmt)
            for field in keep:  # before Arrow, which cannot hold a number and a word in one column
                pair_weight(record.get(field), field)
        except (LineFaultError, RecordError) as fault:
            where = f"{path}, line {number}: {fault}"
            if on_invalid == "error":
                raise error_type(
                    f"{where} (set data.on_invalid=skip to skip and count invalid records)"
                ) from None
            skipped.append((fault.reason, where))
            continue
        records.append({k: record[k] for k in fields if k in record})
        numbers.append(number)
    return records, numbers, skipped


def parse_line(raw: bytes | None, first: bool = False) -> dict | None:
    """One line's record (None for a blank line), or LineFaultError (`raw` None: a line over
    MAX_LINE_BYTES)."""
    if raw is None:
        raise LineFaultError(
            "line too long",
            f"a line over {MAX_LINE_BYTES >> 20} MiB, far beyond any record data.max_length "
            "keeps; cut or remove it",
        )
    if first and raw.startswith(BOM):
        raw = raw[len(BOM) :]
    if not raw.strip():
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise LineFaultError("not UTF-8", f"not UTF-8 text (byte {err.start})") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as err:
        # json's own messages may end in "at" ("Unterminated string starting at")
        what = err.msg.removesuffix(" at")
        detail = f"malformed JSON ({what} at column {err.colno}); fix or remove the line"
        raise LineFaultError("malformed JSON", detail) from None
    except RecursionError:
        raise LineFaultError("nested too deeply", "JSON nested too deeply to read") from None
    if not isinstance(record, dict):
        raise LineFaultError(
            "not a JSON object", f"expected a JSON object, got {text.strip()!r:.40}"
        )
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise LineFaultError("lone surrogate", "invalid Unicode: a lone surrogate escape") from None
    except RecursionError:
        raise LineFaultError("nested too deeply", "JSON nested too deeply to read") from None
    return record


def is_json_array(path: Path) -> bool:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        return handle.read(64).lstrip(BOM).lstrip()[:1] == b"["


def _numbered_lines(path: Path, error_type):
    opener = gzip.open if path.suffix == ".gz" else open
    number = 0
    try:
        with opener(path, "rb") as handle:
            while raw := handle.readline(MAX_LINE_BYTES + 1):
                number += 1
                if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                    raw = None
                    while (rest := handle.readline(1 << 20)) and not rest.endswith(b"\n"):
                        pass  # the rest of the line, read and dropped
                yield number, raw
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise error_type(f"{path}: damaged or cut short after line {number} ({err})") from None
