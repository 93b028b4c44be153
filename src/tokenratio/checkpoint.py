"""Atomic, resumable checkpoints: a checkpoint directory appears complete or not at all.

Everything is written into `step-000123.tmp/` (Accelerate's state: model with the TBPO-Q head,
its trainable parameters only when some are frozen, as with LoRA; both optimizers; every process's
RNG; plus trainer_state.json with the data position and the learning-rate scheduler's state as
plain JSON, so resuming unpickles nothing of ours), then
published as `step-000123/` by `atomic.publish_dir`. A crash mid-write leaves only a `.tmp` directory, which
is ignored and cleaned up; `latest()` never returns a half-written checkpoint.

Some engines' files can only be read by unpickling (FSDP2's distributed-checkpoint `.metadata`,
DeepSpeed's `*_states.pt`, torch's optimizer and RNG files): trainer_state.json records the sha256
of every file the checkpoint holds when it is written, and a resume refuses, in one line naming
it, any file whose content is not the recorded one (or that the record does not list) before
any engine opens it.
"""

import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

from safetensors import SafetensorError

from tokenratio import atomic, sharding

STATE_NAME = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be loaded (damaged, crafted, or from another config)."""


PATTERN = re.compile(r"^step-(\d+)$")


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save(accelerator, root: Path, step: int, trainer_state: dict, keep: int, scheduler) -> Path:
    """Save on every process, publish atomically on the main one, keep the newest `keep`."""
    final = checkpoint_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    handle = accelerator.register_save_state_pre_hook(_drop_frozen)
    try:
        accelerator.save_state(output_dir=str(tmp), safe_serialization=True)
    finally:
        handle.remove()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {**trainer_state, "scheduler": scheduler.state_dict(), "files": digests(tmp)}
        (tmp / STATE_NAME).write_text(json.dumps(state))
        atomic.publish_dir(tmp, final)
        _rotate(root, keep)
    accelerator.wait_for_everyone()
    return final


def _frozen_names(model) -> set[str]:
    """Every name of a frozen parameter, tied ones included (a tied LM head is a second name)."""
    params = model.named_parameters(remove_duplicate=False)
    return {name for name, p in params if not p.requires_grad}


def _drop_frozen(models, weights, output_dir) -> None:
    """Accelerate's save hook: parameters that never train (LoRA's base model, which is also the
    reference) are rebuilt from model.name_or_path on resume, so checkpoints leave them out."""
    for model, state in zip(models, weights, strict=False):  # FSDP/ZeRO pass no weights here
        for name in _frozen_names(model) & set(state):
            del state[name]


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under root (ignoring .tmp leftovers), or None."""
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := PATTERN.match(p.name))]
    found = [(step, p) for step, p in found if (p / STATE_NAME).exists()]
    return max(found)[1] if found else None


def read_state(directory: Path, total_steps: int | None = None) -> dict:
    """A checkpoint's trainer_state.json, checked: a JSON object whose step (>= 1, at most
    `total_steps`, the one its directory is named by), epoch and batch position are counts."""
    path = directory / STATE_NAME
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable trainer state ({err}){_FIX}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(state).__name__}{_FIX}")
    for key, least in (("step", 1), ("epoch", 0), ("micro_batch", 0)):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise CheckpointError(
                f"{path}: {key} = {value!r}, expected an integer >= {least}{_FIX}"
            )
    named = PATTERN.match(directory.name)
    if named and int(named.group(1)) != state["step"]:
        raise CheckpointError(
            f"{path}: step {state['step']} in a checkpoint named {directory.name}{_FIX}"
        )
    if total_steps is not None and state["step"] > total_steps:
        raise CheckpointError(
            f"{path}: step {state['step']} is past this run's {total_steps} steps (another "
            f"train.max_steps or data?){_FIX}"
        )
    return state


_FIX = ": delete that checkpoint to resume from an older one, or start over with --overwrite"


def digests(directory: Path) -> dict[str, str]:
    """{path relative to `directory`: sha256} of every file under it but trainer_state.json."""
    found = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != STATE_NAME):
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        found[str(path.relative_to(directory))] = digest.hexdigest()
    return found


def check_files(directory: Path, recorded: dict | None) -> None:
    """Refuse a checkpoint holding a file whose content is not the one recorded when it was
    written, or one the record does not list (module docstring). Checkpoints from before the
    record was kept hold only files Accelerate reads with weights_only=True: not checked."""
    if recorded is None:
        return
    found = digests(directory)
    missing = sorted(set(recorded) - set(found))
    if missing:
        raise CheckpointError(
            f"{directory / missing[0]} is missing from checkpoint {directory}{_FIX}"
        )
    for name, digest in found.items():
        if recorded.get(name) != digest:
            what = "is not listed in" if name not in recorded else "differs from"
            raise CheckpointError(
                f"{directory / name} {what} the record of checkpoint {directory} "
                f"(trainer_state.json): it was changed after the checkpoint was written, and "
                f"nothing from it is loaded{_FIX}"
            )


def check_launch(saved: dict | None, now: dict | None, directory: Path) -> None:
    """A checkpoint resumes only under the launch that wrote it: its data position counts
    micro-batches per process and its shards are one engine's, so another process count, engine
    or global batch would continue a different run (or fail inside the engine). Checkpoints from
    before launches were recorded are not checked."""
    if not saved or not now or saved == now:
        return

    def said(launch):
        count = launch["processes"]
        return (
            f"{count} process{'es' if count > 1 else ''} under {launch['engine']}, global batch "
            f"{launch['global_batch']}"
        )

    raise CheckpointError(
        f"checkpoint {directory} was written by {said(saved)}; this run has {said(now)}: resume "
        f"it with the launch that wrote it ({saved['processes']} process(es), the same launch "
        "file and train.batch_size / grad_accumulation), or start over with --overwrite"
    )


def load(
    accelerator, directory: Path, scheduler, total_steps: int | None = None, launch=None
) -> dict:
    """Restore Accelerate's state and the scheduler's; return the trainer state (step, epoch,
    batch position). The trainer state is checked first (`read_state`), and against this run's
    `launch` (`check_launch`), before any weights load; an RNG state that Accelerate could not
    restore (it says nothing) is warned about in one line."""
    state = read_state(directory, total_steps)
    check_launch(state.get("launch"), launch, directory)
    check_files(directory, state.get("files"))
    for pickled in directory.glob("custom_checkpoint_*.pkl"):  # older checkpoints' scheduler:
        pickled.rename(pickled.with_name(pickled.name + ".ignored"))  # never unpickled; replayed
    frozen = any(_frozen_names(model) for model in accelerator._models)
    try:  # Accelerate loads with weights_only=True: a crafted pickle fails here, it does not run
        # strict=False only where frozen parameters were left out; `_check_trainable` then
        # checks that every trainable one was in the file
        accelerator.load_state(str(directory), **_strict(accelerator, not frozen))
        if frozen:
            _check_trainable(accelerator, directory)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        KeyError,
        ValueError,
        OSError,
        SafetensorError,
    ) as err:
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {directory} could not be loaded ({reason}): delete it to resume from "
            "an older one, or start over with --overwrite"
        ) from None
    _warn_unless_rng_restored(accelerator, directory)
    if "scheduler" in state:
        scheduler.load_state_dict(state.pop("scheduler"))
    else:  # a checkpoint from before the scheduler's state was saved here: replay its steps
        for _ in range(state["step"]):
            scheduler.step()
    return state


def _strict(accelerator, strict: bool) -> dict:
    """Accelerate hands this keyword to the model's loader: a DeepSpeed engine names it its own."""
    if sharding.uses_deepspeed(accelerator):
        return {"load_module_strict": strict}
    return {"strict": strict}


def _warn_unless_rng_restored(accelerator, directory: Path) -> None:
    """Accelerate ignores an RNG state file it cannot load; then dropout and sampling draw other
    numbers than the uninterrupted run would, and resuming is no longer exact: say so."""
    import torch
    from accelerate.utils import load as load_file

    path = directory / f"random_states_{accelerator.process_index}.pkl"
    try:
        restored = torch.equal(load_file(path)["torch_manual_seed"], torch.get_rng_state())
        why = "it differs from the state restored"
    except Exception as err:  # missing, damaged or foreign: all mean the same here
        restored, why = False, f"{type(err).__name__}: {str(err)[:80]}"
    if not restored:
        print(
            f"warning: {path} could not be restored ({why}); the run goes on, but not exactly "
            "as it would have without the interruption (dropout and sampling draw other numbers)"
        )


def _check_trainable(accelerator, directory: Path) -> None:
    from safetensors import safe_open

    for i, model in enumerate(accelerator._models):
        path = directory / f"model{f'_{i}' if i else ''}.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            saved = set(handle.keys())
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if trainable - saved:
            raise ValueError(
                f"{len(trainable - saved)} trainable parameters missing from {path.name}"
            )


def _rotate(root: Path, keep: int) -> None:
    for leftover in root.glob("step-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    complete = sorted(p for p in root.iterdir() if PATTERN.match(p.name))
    for old in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
