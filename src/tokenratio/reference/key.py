"""What decides the cached reference values, and so names the cache: the reference by content
(never file names or stamps), the tokenizer and chat template, the data and every data setting,
and the precision, attention implementation and device it was scored under.

A hub id is keyed by the revision it resolves to (the commit in the Hugging Face cache, or the
hub's answer when online); a model whose revision cannot be resolved is not cached at all
(`RevisionUnknownError`), so a new revision never reads an old one's values.
"""

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

FORMAT = "tokenratio-ref-logps/2"  # bump when the files or their values change meaning
_BLOCK = 1 << 24  # hashing reads 16 MiB at a time


class RevisionUnknownError(RuntimeError):
    """A hub id whose revision could not be resolved (offline and not in the local cache)."""


def file_digest(path: Path) -> str:
    """sha256 of a file's contents (about 1.3 GB/s here: 0.4 s for a 135M fp32 model)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def tree_digest(directory: Path) -> str:
    """sha256 over every file under `directory` (names relative to it, and contents)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(directory)}\0{file_digest(path)}\0".encode())
    return digest.hexdigest()


def hub_revision(repo_id: str, repo_type: str) -> str | None:
    """The commit `repo_id` resolves to: the local Hugging Face cache's `refs/main`, else (when
    online) the hub's; None when neither answers."""
    from huggingface_hub import constants

    folder = f"{repo_type}s--{repo_id.replace('/', '--')}"
    ref = Path(constants.HF_HUB_CACHE) / folder / "refs" / "main"
    if ref.is_file():
        return ref.read_text().strip()
    if constants.HF_HUB_OFFLINE:
        return None
    try:
        from huggingface_hub import HfApi

        return HfApi().repo_info(repo_id, repo_type=repo_type).sha
    except Exception:  # no network, no such repo, no access: unresolved, said by the caller
        return None


def model_identity(model_cfg) -> str:
    """The reference's weights by content: its GGUF file, every file of its directory, or the
    resolved revision of a hub id (RevisionUnknownError when there is none)."""
    local = Path(model_cfg.name_or_path).expanduser()
    if model_cfg.gguf_file and local.is_dir():
        return "gguf:" + file_digest(local / model_cfg.gguf_file)
    if local.is_dir():
        return "dir:" + tree_digest(local)
    revision = hub_revision(model_cfg.name_or_path, "model")
    if revision is None:
        raise RevisionUnknownError(
            f"the revision of hub model {model_cfg.name_or_path} could not be resolved "
            "(offline, and not in the Hugging Face cache)"
        )
    return f"hub:{model_cfg.name_or_path}@{revision}"


def data_identity(path: str | None) -> str | None:
    """A data source by content (a file or directory here) or by resolved revision (a hub id).
    Belt and braces: each pair is also found by its token ids, so data never decides values."""
    if not path:
        return None
    local = Path(path).expanduser()
    if local.is_file():
        return "file:" + file_digest(local)
    if local.is_dir():
        return "dir:" + tree_digest(local)
    return f"hub:{path}@{hub_revision(path, 'dataset') or 'unresolved'}"


def tokenizer_identity(tokenizer) -> dict:
    template = getattr(tokenizer, "chat_template", None)
    return {"size": len(tokenizer), "chat_template": template, "class": type(tokenizer).__name__}


def cache_key(cfg, reference: str, tokenizer, device_type: str, samples: int) -> str:
    """The cache's name: a hash of everything that decides its values (module docstring).

    Args:
        reference: `model_identity(cfg.model)`, computed once per run.
        samples: k3 sampled tokens per response position held (0: log-probs only).
    """
    parts = {
        "format": FORMAT,
        "reference": reference,
        "dtype": cfg.model.dtype,
        "attention": cfg.model.attn_implementation or "sdpa",
        "mixed_precision": cfg.train.mixed_precision,
        "device": device_type,
        "tokenizer": tokenizer_identity(tokenizer),
        "data": [data_identity(cfg.data.path), data_identity(cfg.data.heldout_path)],
        "settings": asdict(cfg.data),
        "samples": samples,
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]
