"""Input paths checked before anything heavy loads: a bad one fails at once, in one line."""

import os
from pathlib import Path

CACHE_ENV = "TOKENRATIO_CACHE_DIR"


def user_cache_dir() -> Path:
    """Where tokenratio keeps what it computes once (the reference and trunk caches): the
    field's convention, a user cache directory, never beside the data (which is often shared or
    read-only): $TOKENRATIO_CACHE_DIR, else $XDG_CACHE_HOME/tokenratio, else ~/.cache/tokenratio."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tokenratio"


def looks_local(path: str) -> bool:
    """A path a user means as a file or directory here, never a hub id: ./x, /x, ~/x, a/b/c, or
    a/b where a is a directory here (runs/x, models/x)."""
    first = Path(path).expanduser().parts[0] if path else ""
    return (
        path.startswith((".", "/", "~"))
        or path.endswith((".json", ".jsonl", ".gz", ".parquet", ".toml"))
        or path.count("/") > 1
        or ("/" in path and Path(first).is_dir())
    )


def check_local_path(path: str, what: str = "model path") -> None:
    """A path that looks local and does not exist fails at once, instead of in hub retries."""
    if path and looks_local(path) and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"{what} {path} does not exist")


def check_config_paths(cfg) -> None:
    """The model and data paths of a Config (FileNotFoundError naming the key and the path)."""
    check_local_path(cfg.model.name_or_path, "model.name_or_path:")
    for key in ("path", "heldout_path"):
        check_local_path(getattr(cfg.data, key), f"data.{key}:")
