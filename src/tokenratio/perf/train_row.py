"""The perf harness's "train" row: `tokenratio train` itself (`trainer.train`, data loading,
collation and logging included) on the row's model shape, with DPO and the trainer's defaults, on
the very records whose lengths the dpo row timed (written to a file, tokenized by the tokenizer
that measured them), the same batch size and device settings; its tokens/s is read from the run's
own metrics.jsonl. So the harness checks that what it times is what a user gets: the trainer's
logged tokens/s next to the harness's dpo row.
"""

import json
from pathlib import Path

from tokenratio import runlog


def _model_dir(args: dict, directory: Path) -> Path:
    """The row's random-weight shape with a tokenizer trained on the data (perf.lengths)."""
    from tokenratio.perf.lengths import data_tokenizer
    from tokenratio.perf.models import build_model

    model = build_model(args["model"])
    tokenizer = data_tokenizer(args["data"], model.config.vocab_size)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _plan_records(args: dict, directory: Path) -> tuple[Path, Path]:
    """The shared plan's pairs as a JSONL file (train) and one more (held out)."""
    from tokenratio.data import load_raw
    from tokenratio.perf.lengths import dataset_records
    from tokenratio.perf.models import MODELS

    records = dataset_records(
        args["data"], MODELS[args["model"]][0], args["max_length"], args["max_prompt_length"]
    )
    raw = load_raw(args["data"], on_invalid="skip").dataset
    pairs = [raw[records[args["sources"][i]]] for batch in args["plans"]["shared"] for i in batch]
    train, heldout = directory / "train.jsonl", directory / "heldout.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in pairs))
    heldout.write_text(json.dumps(pairs[0]) + "\n")
    return train, heldout


def train_config(args: dict, model_dir: Path, out: Path):
    from tokenratio.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig

    train_file, heldout_file = _plan_records(args, out.parent)
    cuda = args["device"].startswith("cuda")
    return Config(
        model=ModelConfig(name_or_path=str(model_dir), dtype="float32"),
        data=DataConfig(
            path=str(train_file),
            heldout_path=str(heldout_file),
            max_length=args["max_length"],
            max_prompt_length=args["max_prompt_length"],
            on_invalid="skip",
            chat_template=False,
        ),
        loss=LossConfig(name="dpo", beta=0.1),
        train=TrainConfig(
            output_dir=str(out),
            optimizer="adamw",
            lr=1e-6,
            max_steps=len(args["plans"]["shared"]),  # warm-up and timed steps
            batch_size=args["batch"],
            eval_batch_size=args["batch"],
            log_every=1,
            cpu=not cuda,
            mixed_precision="bf16" if args["dtype"] == "bf16" else "no",
        ),
    )


def run_train(args: dict) -> dict:
    """`trainer.train` for warmup + steps optimizer steps; the timed steps' logged tokens and
    seconds (the logged window includes loading the next batch and logging)."""
    from tokenratio.perf.lengths import response_share
    from tokenratio.trainer import train

    tmp = Path(args["tmp"])
    cfg = train_config(args, _model_dir(args, tmp / "model"), tmp / "run")
    train(cfg, progress=False)
    records = runlog.read(tmp / "run" / runlog.NAME)
    timed = [r for r in records if "tokens" in r and r["step"] > args["warmup"]]
    tokens = sum(r["tokens"] for r in timed)
    return {
        "times": [r["seconds"] for r in timed],
        "tensor_peak_bytes": None,
        "real_tokens": tokens,
        # for MFU: the data's share of response tokens (this row's pairs are not the plan's)
        "response_tokens": round(tokens * response_share(args["data"], args)),
        "padded_tokens": None,
    }
