"""Publishing that is complete or absent: every file and directory tokenratio writes for keeps
(run files, checkpoints, final/, reference-cache shards, scored data, reports, plots) is
published here, with one durability policy:

    write a temporary file beside the target -> fsync it -> rename it over the target -> fsync
    the directory

so after a crash or power loss a reader finds the old version or the new one, never a torn one.
A directory is published the same way (`publish_dir`): every file in it fsynced, renamed, the
parent fsynced.
"""

import json
import os
import shutil
import socket
from collections.abc import Iterable
from pathlib import Path

COMPLETE = "COMPLETE"  # the marker `publish_dir` writes into a directory it publishes whole


def temporary_name(path: Path) -> Path:
    """Where `path` is written before it is published: beside it, hidden, named by host and
    process so concurrent writers never share one (`is_leftover` recognises it)."""
    return path.with_name(f".{path.name}~{socket.gethostname()}~{os.getpid()}.tmp")


def write_bytes(path: Path, data: bytes) -> Path:
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
    return path


def write_text(path: Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: Path, value, indent: int | None = 1) -> Path:
    return write_text(path, json.dumps(value, indent=indent, default=list))


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    """One JSON object a line (UTF-8 kept as is), published whole."""
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return write_text(path, lines)


def publish_file(tmp: Path, path: Path) -> Path:
    """Publish a file another library wrote at `tmp` (a plot, a safetensors file) as `path`."""
    with Path(tmp).open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(Path(path).parent)
    return Path(path)


def publish_dir(tmp: Path, final: Path, marker: str | None = None) -> Path:
    """Publish directory `tmp` as `final`, replacing an older one: optionally write `marker`
    (an empty file, `COMPLETE` for a run's final/) inside it first, fsync every file, rename,
    fsync the parent. A crash leaves `tmp` (ignored and removed by its writer's next run) or
    `final`."""
    tmp, final = Path(tmp), Path(final)
    if marker:
        (tmp / marker).write_text("")
    for path in tmp.rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return final


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename itself has happened
    finally:
        os.close(fd)


def is_leftover(path: Path) -> bool:
    """A temporary file of `temporary_name` whose writer (on this host) is gone."""
    parts = path.name.split("~")
    if len(parts) != 3 or not parts[2].endswith(".tmp"):
        return False
    host, pid = parts[1], parts[2][: -len(".tmp")]
    return host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (a writer's temporary file, a run's lock)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True
