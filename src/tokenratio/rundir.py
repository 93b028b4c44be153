"""A run directory's lifecycle (train.output_dir): one live run at a time, never two runs mixed into
one directory, a resume that refuses what it cannot honour, a final model that appears complete or
not at all.

    inspect(out, cfg, resume, overwrite)   every process, read-only: what to do, or RunDirError
    claim(out, plan)                       main process: take the lock, clear or trim old files
    publish(tmp, final)                    main process: mark complete, fsync, rename into place
"""

import json
import os
import shutil
import socket
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tokenratio import atomic, checkpoint, runlog
from tokenratio.atomic import process_alive

LOCK = ".lock"
COMPLETE = atomic.COMPLETE  # written inside final.tmp/ before the rename that publishes final/
# What a resumed run can honour: the schedule's peak and length, cadences, logging, evaluation.
# Everything else (model, data, loss, optimizer, batch size, seed, ...) is baked into the
# checkpoint's weights, optimizer state or data order.
RESUMABLE = frozenset(
    "train." + key
    for key in (
        "lr", "head_lr", "max_steps", "epochs", "eval_every", "eval_batch_size", "save_every",
        "keep_checkpoints", "log_every", "report_to", "logprob_chunk_elements", "max_grad_norm",
        "output_dir", "cpu",
    )
)  # fmt: skip


class RunDirError(RuntimeError):
    """A run directory that cannot be used as asked; the message says why and the way out."""


@dataclass(frozen=True)
class Plan:
    action: str  # "fresh" | "resume" | "finished"
    checkpoint: Path | None = None
    changes: dict = field(default_factory=dict)  # dotted key -> [old, new], honoured on resume
    clear: bool = False  # remove the directory's old contents first (--overwrite)
    keep_metrics_to: int | None = None  # drop metrics.jsonl records past this step
    note: str = ""  # said once before the run starts


def is_complete(model_dir: Path) -> bool:
    """A final model published by `publish` (an interrupted save has no marker)."""
    return (Path(model_dir) / COMPLETE).is_file()


def inspect(out: Path, cfg, *, resume: bool, overwrite: bool) -> Plan:
    """What this run does with `out`, decided before any model or data loads."""
    _check_lock(out)
    _check_writable(out)
    old = [p.name for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other: choose one")
    if not resume:
        if old and not overwrite:
            raise RunDirError(
                f"train.output_dir {out} already holds a run ({', '.join(sorted(old)[:4])}): "
                "pass --resume to continue it, --overwrite to replace it, or choose another "
                "train.output_dir"
            )
        return Plan("fresh", clear=bool(old))
    if is_complete(out / "final"):
        return Plan("finished", note=f"{out} already finished (final/ is complete): nothing to do")
    found = checkpoint.latest(out / "checkpoints")
    if found is None:
        note = f"nothing to resume in {out} (no complete checkpoint): starting from step 0"
        return Plan("fresh", keep_metrics_to=0, note=note if old else "")
    step = checkpoint.read_state(found)["step"]  # a damaged one: one line, before any load
    return Plan("resume", found, changes=_resume_changes(out, cfg), keep_metrics_to=step)


def claim(out: Path, plan: Plan) -> None:
    """Main process: lock `out` for this process; clear it, or trim its metrics to the step the run
    starts from (other files, e.g. TIS-DPO's contrast models beside a run, stay)."""
    out.mkdir(parents=True, exist_ok=True)
    if plan.clear:
        for path in out.iterdir():
            if path.name != LOCK:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
    take_lock(out)
    if plan.keep_metrics_to is not None:
        runlog.trim(out / runlog.NAME, plan.keep_metrics_to)
    if plan.changes:
        with (out / "resumes.jsonl").open("a") as handle:
            record = {"step": plan.keep_metrics_to, "changed": plan.changes}
            handle.write(json.dumps(record) + "\n")


def release(out: Path) -> None:
    lock = out / LOCK
    if lock.exists() and _read_lock(lock).get("pid") == os.getpid():
        lock.unlink()


def publish(tmp: Path, final: Path) -> Path:
    """Mark `tmp` complete and publish it as `final` (replacing an older one)."""
    return atomic.publish_dir(tmp, final, marker=COMPLETE)


def _resume_changes(out: Path, cfg) -> dict:
    saved = out / "config.json"
    if not saved.exists():
        return {}
    try:
        old = _flat(json.loads(saved.read_text(encoding="utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
        raise RunDirError(
            f"{saved}: not a readable run config ({err}): restore it, or start over with "
            "--overwrite"
        ) from None
    new = _flat(json.loads(json.dumps(asdict(cfg))))
    # Keys the run's config.json lacks came with a newer tokenratio: recorded, never refused.
    changes = {k: [old.get(k), new.get(k)] for k in sorted(old.keys() & new.keys())}
    changes = {k: v for k, v in changes.items() if v[0] != v[1]}
    added = {k: [None, new[k]] for k in sorted(new.keys() - old.keys())}
    refused = {k: v for k, v in changes.items() if k not in RESUMABLE}
    if refused:
        listed = "; ".join(f"{k}: {v[0]!r} -> {v[1]!r}" for k, v in refused.items())
        raise RunDirError(
            f"cannot resume {out} with a changed {listed}. A checkpoint holds the weights, "
            "optimizer state and data order of its config; resuming honours only changes to "
            f"{', '.join(sorted(k.split('.', 1)[1] for k in RESUMABLE))}. Start a new run in "
            "another train.output_dir, or resume with the original settings"
        )
    return {**changes, **added}


def _flat(table: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict) and key != "options":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _check_writable(out: Path) -> None:
    probe = out / f".write-test-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"train.output_dir {out} is not writable: {err.strerror}") from None


def _read_lock(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def _check_lock(out: Path, setting: str = "train.output_dir") -> None:
    holder = _read_lock(out / LOCK)
    if holder.get("host") == socket.gethostname() and _alive(holder.get("pid")):
        what = "study" if setting.startswith("study") else "run"
        raise RunDirError(
            f"{setting} {out} is in use by a live {what} (PID {holder['pid']}); wait for it, "
            f"stop it, or choose another {setting}"
        )


def take_lock(out: Path, setting: str = "train.output_dir") -> None:
    """Create the lock naming this process; a stale one (its process gone) is taken over. A
    live holder is a RunDirError naming `setting` (the option that chose the directory)."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK
    record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            _check_lock(out, setting)
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(record)
        return
    raise RunDirError(f"could not lock {out}: another run took it at the same moment")


def _alive(pid) -> bool:
    """A lock's holder runs: another live process (this one's own pid is a stale lock)."""
    return isinstance(pid, int) and pid != os.getpid() and process_alive(pid)
