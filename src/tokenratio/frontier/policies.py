"""The policies a frontier run contributes points from: each kept checkpoint along training and
the final model, each as a plain merged model (LoRA folded into the weights) beside the reference.

A checkpoint holds the trainable parameters only (checkpoint.py: the frozen base is the reference),
under the training wrapper's names ("model.<peft name>", "head.<...>"): they are loaded into the
run's LoRA layout on a copy of the reference, every name accounted for, then merged.
"""

import copy
from pathlib import Path

from safetensors.torch import load_file

from tokenratio import checkpoint as checkpoints
from tokenratio.losses import Needs


class PolicyLoadError(ValueError):
    """A checkpoint whose weights do not fit the run's model; the message names it."""


def steps_to_evaluate(run_dir: Path, final_step: int) -> list[tuple[int, Path]]:
    """(step, directory) of every kept checkpoint before the end, then the final model."""
    root = run_dir / "checkpoints"
    found = []
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        match = checkpoints.PATTERN.match(directory.name)
        if match and (directory / checkpoints.STATE_NAME).exists():
            step = int(match.group(1))
            if step < final_step:
                found.append((step, directory))
    return [*found, (final_step, run_dir / "final")]


def load_policy(reference, model_cfg, directory: Path):
    """A merged copy of `reference` with the weights of a checkpoint or final directory."""
    if (directory / checkpoints.STATE_NAME).exists():
        return _from_checkpoint(reference, model_cfg, directory)
    if (directory / "adapter_config.json").exists():  # train.save_merged = false
        from peft import PeftModel

        return PeftModel.from_pretrained(copy.deepcopy(reference), directory).merge_and_unload()
    from tokenratio.modeling import load_pretrained

    return load_pretrained(str(directory), device="cpu", dtype="float32")[0]


def _from_checkpoint(reference, model_cfg, directory: Path):
    from tokenratio.modeling import build_policy

    policy = build_policy(model_cfg, Needs(), model=copy.deepcopy(reference)).model
    stored = load_file(directory / "model.safetensors")
    weights = {name[len("model.") :]: t for name, t in stored.items() if name.startswith("model.")}
    missing, unexpected = policy.load_state_dict(weights, strict=False)
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    if not weights or unexpected or trainable & set(missing):
        raise PolicyLoadError(
            f"{directory / 'model.safetensors'}: its weights do not fit the run's model "
            f"({len(unexpected)} unknown, {len(trainable & set(missing))} missing): was it "
            "written by another config?"
        )
    merged = policy.merge_and_unload() if hasattr(policy, "merge_and_unload") else policy
    return merged.eval()
