"""Scale-out on CPU, launched as a user would (`accelerate launch --config_file configs/accelerate/
{ddp,fsdp,deepspeed_zero3}.yaml --num_processes 2`): two gloo processes of `tokenratio train` give
the loss curve and the final weights of one process with the same global batch.

Under fsdp.yaml the run is Accelerate's own FSDP2 path (sharding.fsdp2_on_cpu turns it on where
Accelerate would fall back to DDP on a CPU): the policy, TBPO-Q's head with it, and the frozen
reference sharded per decoder layer, DCP checkpoints that resume exactly, full weights gathered
into final/, and the reference cache scored by the sharded reference in lockstep. Under
deepspeed_zero3.yaml it is Accelerate's DeepSpeed path (sharding.deepspeed_on_cpu): the policy
partitioned by its ZeRO-3 engine, the reference by its own, ZeRO checkpoints that resume
exactly, and the full weights gathered into final/.

"The same" is equal up to float32 rounding in another order (tests/closeness.py derives the
bounds): every gradient element is a sum over the global batch's tokens (GRADIENT_TERMS at most),
every loss and cached log-prob a chain of sums no longer than one row's tokens plus the
vocabulary (VALUE_TERMS)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from closeness import assert_moved_alike, assert_sums_close
from test_trainer import overrides
from tokenratio.reference.cache import read

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
PAIRS = 95  # the scored pairs of hh_jsonl (91 train, 4 held out; one record is invalid)
MAX_LENGTH = 384  # test_trainer's data.max_length: one pair's row is at most 2 x this
GRADIENT_TERMS = 4 * 2 * MAX_LENGTH  # a global batch of 4 pairs
VALUE_TERMS = 2 * MAX_LENGTH + 384  # a row's positions, then the tiny vocabulary's softmax


def settings(model_dir, data, out, **extra) -> list[str]:
    """test_trainer's overrides, with the loss curve fixed by the data order (no length
    grouping) and fp32 (no autocast)."""
    fixed = {"train.max_steps": 5, "train.group_by_length": False, "train.mixed_precision": "no"}
    return overrides(model_dir, data, out, **{**fixed, **extra})


def train(args: list[str], cache: Path, launch_file: str | None = None, *more):
    """`tokenratio train` in one process, or under `accelerate launch` with 2 processes."""
    command = [sys.executable, "-m", "tokenratio.cli", "train"]
    if launch_file:
        command = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(CONFIGS / launch_file), "--num_processes", "2", "--mixed_precision", "no",
            "-m", "tokenratio.cli", "train",
        ]  # fmt: skip
    env = {**os.environ, "TOKENRATIO_REF_CACHE_DIR": str(cache), "ACCELERATE_MIXED_PRECISION": "no"}
    result = subprocess.run(
        [*command, *args, *more, "--no-progress"], capture_output=True, text=True, env=env,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def losses(out: Path) -> list[float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [row.get("loss", row.get("eval_loss")) for row in map(json.loads, lines)]


def assert_same_losses(two: Path, one: Path) -> None:
    assert_sums_close(losses(two), losses(one), VALUE_TERMS, "losses")


def assert_same_weights(a: Path, b: Path, start: Path) -> None:
    """b's weights moved from the model in `start` as a's did."""
    name = "model.safetensors"
    assert_moved_alike(
        load_file(b / name), load_file(a / name), load_file(start / name), GRADIENT_TERMS
    )


def assert_same_head(a: Path, b: Path) -> None:
    """TBPO-Q's head: its seeded initial weights are not on disk, so the whole of each weight is
    taken as its displacement (a looser bound than the policy's)."""
    name = "baseline_head.safetensors"
    left, right = load_file(a / name), load_file(b / name)
    zeros = {key: torch.zeros_like(value) for key, value in left.items()}
    assert_moved_alike(right, left, zeros, GRADIENT_TERMS)


def cached_values(root: Path):
    (directory,) = [d for d in root.iterdir() if d.is_dir()]
    return read([directory], directory.name, 0, 1 << 20, print)


ZERO3 = "deepspeed_zero3.yaml"
ENGINES = {  # what the run says it launched under
    "fsdp.yaml": "FSDP2 (parameters sharded",
    "ddp.yaml": "DDP over CPU processes (gloo)",
    ZERO3: "DeepSpeed ZeRO-3 (parameters partitioned)",
}
SHARDED = {  # where a sharded checkpoint keeps its shards
    "fsdp.yaml": "pytorch_model_fsdp_0",
    ZERO3: "pytorch_model",
}


def engine_settings(launch_file: str) -> dict:
    """What a launch file's runs need: under ZeRO-3 DeepSpeed (.ci/run installs it), and no
    fused head (ZeRO-3 gathers a weight only inside its module's forward)."""
    if launch_file != ZERO3:
        return {}
    pytest.importorskip("deepspeed")
    return {"train.fused_head": False}


@pytest.mark.parametrize(
    "loss, launch_file",
    [
        ("dpo", "fsdp.yaml"), ("tbpo-a", "fsdp.yaml"), ("tbpo-q", "fsdp.yaml"), ("dpo", "ddp.yaml"),
        ("dpo", ZERO3), ("tbpo-a", ZERO3), ("tbpo-q", ZERO3),
    ],
)  # fmt: skip
def test_two_processes_train_as_one(loss, launch_file, tiny_model_dir, hh_jsonl, tmp_path):
    """dpo reads the reference cache (scored by the sharded reference), tbpo-a runs the sharded
    frozen reference in every step (its exact KL), tbpo-q trains its head in the policy's
    optimizer. eval_batch_size 47: the scoring pass's shares (48 and 47 pairs) take 2 and 1
    batches, so the second process must pad with an idle pass or the first would wait forever;
    and the 4 held-out pairs fill one process's batch only, so Accelerate repeats pairs to even
    it out, which the held-out metrics must not count."""
    extra = {"loss.name": loss, "train.eval_batch_size": 47, "train.save_every": 2}
    extra.update(engine_settings(launch_file))
    one = tmp_path / "one"
    train(settings(tiny_model_dir, hh_jsonl, one, **extra), tmp_path / "cache-one")
    two = tmp_path / "two"
    args = settings(tiny_model_dir, hh_jsonl, two, **{**extra, "train.batch_size": 2})
    stdout = train(args, tmp_path / "cache-two", launch_file)

    assert f"launch: 2 processes, {ENGINES[launch_file]}" in stdout
    assert_same_losses(two, one)
    assert_same_weights(one / "final", two / "final", tiny_model_dir)
    if loss == "tbpo-q":
        assert_same_head(one / "final", two / "final")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(two / "final")  # full weights, loadable
    if launch_file in SHARDED:  # sharded checkpoints (DCP, ZeRO), not one file
        assert (two / "checkpoints" / "step-000004" / SHARDED[launch_file]).is_dir()
    if launch_file == ZERO3:  # one partition of the weights per process: ZeRO-3's alone
        shards = two / "checkpoints" / "step-000004" / "pytorch_model"
        assert len(list(shards.glob("zero_pp_rank_*_mp_rank_00_model_states.pt"))) == 2
    if loss != "tbpo-a":  # the cache, scored once by both processes, equals one process's
        assert f"reference log-probs: scored {PAIRS} pairs" in stdout
        sharded, whole = (
            cached_values(tmp_path / "cache-two"),
            cached_values(tmp_path / "cache-one"),
        )
        assert set(sharded.where) == set(whole.where) and len(whole) == PAIRS
        for key in whole.where:
            for side in ("chosen", "rejected"):
                what = f"cached {side} log-probs of pair {key.hex()[:12]}"
                assert_sums_close(
                    sharded.entry(key, side), whole.entry(key, side), VALUE_TERMS, what
                )


@pytest.mark.parametrize("launch_file", ["fsdp.yaml", ZERO3])
def test_a_sharded_checkpoint_resumes_exactly(launch_file, tiny_model_dir, hh_jsonl, tmp_path):
    """tbpo-q: a run cut after its step-2 checkpoint (final/ and the later checkpoint gone, as
    a crash would leave it) resumes from the DCP or ZeRO shards to the uninterrupted weights."""
    import shutil

    extra = {"loss.name": "tbpo-q", "train.batch_size": 2, "train.save_every": 2}
    extra.update(engine_settings(launch_file))
    straight, cut = tmp_path / "straight", tmp_path / "cut"
    train(settings(tiny_model_dir, hh_jsonl, straight, **extra), tmp_path / "cache", launch_file)
    shutil.copytree(straight, cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step-000004")
    args = settings(tiny_model_dir, hh_jsonl, cut, **extra)
    _assert_a_planted_pickle_is_refused(cut, tmp_path, launch_file, extra, tiny_model_dir, hh_jsonl)
    stdout = train(args, tmp_path / "cache", launch_file, "--resume")

    assert "resumed from" in stdout and "(step 2)" in stdout
    assert_same_weights(straight / "final", cut / "final", tiny_model_dir)
    assert_same_head(straight / "final", cut / "final")


class _Planted:
    """Unpickling this creates `marker`: a stand-in for any code a crafted file would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _assert_a_planted_pickle_is_refused(cut, tmp_path, launch_file, extra, model, data):
    """Every file of the engine's sharded checkpoint that its loader unpickles (DCP's .metadata,
    ZeRO's *_states.pt) replaced by a crafted pickle: the resume stops in one line naming one,
    and no code runs."""
    import pickle
    import shutil

    tampered, marker = tmp_path / "tampered", tmp_path / "code-ran"
    shutil.copytree(cut, tampered)
    shards = tampered / "checkpoints" / "step-000002" / SHARDED[launch_file]
    planted = [p for p in shards.rglob("*") if p.name == ".metadata" or p.name.endswith(".pt")]
    assert planted, sorted(shards.rglob("*"))
    for path in planted:
        path.write_bytes(pickle.dumps(_Planted(marker)))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(CONFIGS / launch_file), "--num_processes", "2", "--mixed_precision", "no",
        "-m", "tokenratio.cli", "train", *settings(model, data, tampered, **extra), "--resume",
        "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "TOKENRATIO_REF_CACHE_DIR": str(tmp_path / "cache")}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode != 0 and not marker.exists()
    said = [x for x in result.stderr.splitlines() if x.startswith("tokenratio train:")]
    assert said and "differs from the record of checkpoint" in said[0], result.stderr[-2000:]


def test_zero3_accumulates_micro_batches_into_one_step(tiny_model_dir, hh_jsonl, tmp_path):
    """ZeRO-3, dpo: 2 processes x 2 micro-batches of 1 pair are one process's batch of 4. The
    step marks the accumulation boundary itself (Accelerate would step the engine after every
    micro-batch) and the engine divides the loss by nothing more."""
    extra = {"loss.name": "dpo", **engine_settings(ZERO3)}
    one, two = tmp_path / "one", tmp_path / "two"
    train(settings(tiny_model_dir, hh_jsonl, one, **extra), tmp_path / "cache")
    micro = {**extra, "train.batch_size": 1, "train.grad_accumulation": 2}
    train(settings(tiny_model_dir, hh_jsonl, two, **micro), tmp_path / "cache", ZERO3)
    assert_same_losses(two, one)
    assert_same_weights(one / "final", two / "final", tiny_model_dir)
