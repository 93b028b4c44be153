"""One row of `tokenratio perf` in its own process: `python -m tokenratio.perf.worker JSON`.

Our rows time `trainer.train_step`, the function `tokenratio train` runs every optimizer step, built
by `trainer.prepare_step` from a Config; the TRL row times `DPOTrainer`'s steps with a callback.
"""

import json
import statistics
import sys
import time

import torch

from tokenratio.memory import peak_tensor_bytes
from tokenratio.perf.models import build_model, synthetic_pairs, token_rows, word_tokenizer


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def perf_config(method: str, args: dict):
    """The Config a row's trainer step runs with: the harness's model shape, AdamW, lr 1e-6; the
    row is a loss name, or a loss with options ("tdpo1[generator=sba]")."""
    from tokenratio.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig
    from tokenratio.losses import parse_method

    loss, options = parse_method(method)
    return Config(
        model=ModelConfig(name_or_path=f"random:{args['model']}"),
        data=DataConfig(path="synthetic"),
        loss=LossConfig(name=loss, beta=0.1, options=options),
        train=TrainConfig(
            optimizer="adamw",
            lr=1e-6,
            cpu=not args["device"].startswith("cuda"),
            logprob_chunk_elements=1 << 22,
        ),
    )


def run_ours(loss: str, args) -> list[float]:
    """Step times of `trainer.train_step`, the function `tokenratio train` runs every step."""
    from tokenratio.data import collate
    from tokenratio.trainer import make_accelerator, prepare_step, train_step

    cfg = perf_config(loss, args)
    dtype = torch.bfloat16 if args["dtype"] == "bf16" else torch.float32
    model = build_model(args["model"], dtype)
    accelerator = make_accelerator(cfg)
    step = prepare_step(cfg, accelerator, args["warmup"] + args["steps"] + 2, model=model)
    tokenizer = word_tokenizer(model.config.vocab_size)
    pairs = synthetic_pairs(
        args["batch"], model.config.vocab_size, args["prompt_len"], args["response_len"]
    )
    batch = collate(token_rows(tokenizer, pairs, step.needs.weights), 0).to(accelerator.device)

    def one_step():
        train_step(step, [batch])
        _sync(args["device"])

    times = []
    for _ in range(args["warmup"] + args["steps"]):
        start = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - start)
    # One more step under the profiler: the exact peak of tensor memory it allocates on top of what
    # is resident (weights, optimizer state); the resident set is the metric, but noisy here.
    tensor_peak = None if args["device"].startswith("cuda") else peak_tensor_bytes(one_step)
    return times[args["warmup"] :], tensor_peak


def run_trl(args) -> list[float]:
    """Step times of TRL's DPOTrainer (sigmoid) on the same model, data and batch."""
    import copy

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model = build_model(args["model"])
    tokenizer = word_tokenizer(model.config.vocab_size)
    data = Dataset.from_list(
        synthetic_pairs(
            args["batch"], model.config.vocab_size, args["prompt_len"], args["response_len"]
        )
    )
    times, last = [], [None]

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            _sync(args["device"])
            last[0] = time.perf_counter()

        def on_step_end(self, *a, **k):
            _sync(args["device"])
            times.append(time.perf_counter() - last[0])

    cpu = not args["device"].startswith("cuda")
    config = DPOConfig(
        output_dir=args["tmp"],
        use_cpu=cpu,
        bf16=args["dtype"] == "bf16",
        gradient_checkpointing=False,
        report_to=[],
        loss_type=["sigmoid"],
        per_device_train_batch_size=args["batch"],
        learning_rate=1e-6,
        max_steps=args["warmup"] + args["steps"],
        save_strategy="no",
        logging_steps=10**6,
        max_length=args["prompt_len"] + args["response_len"] + 8,
        dataloader_num_workers=0,
        disable_tqdm=True,
        optim="adamw_torch",
    )
    # A dataset of `batch` pairs repeated: every step sees the same tokens as ours.
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(model),
        args=config,
        train_dataset=Dataset.from_list(list(data) * (config.max_steps + 1)),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    return times[args["warmup"] :]


def worker(args: dict) -> dict:
    """One row in this process; returns its timings, throughput and peak memory."""
    torch.set_num_threads(args["threads"])
    if args["row"] == "trl":
        times, tensor_peak = run_trl(args), None
    else:
        times, tensor_peak = run_ours(args["row"], args)
    tokens = 2 * args["batch"] * (args["prompt_len"] + args["response_len"] + 1)
    step = statistics.median(times)
    return {
        "row": args["row"],
        "step_s": step,
        "tokens_per_s": tokens / step,
        "peak_bytes": _peak_memory(args["device"]),
        "tensor_peak_bytes": tensor_peak,
        "times": times,
    }


if __name__ == "__main__":  # one row, JSON in argv, JSON on stdout
    print(json.dumps(worker(json.loads(sys.argv[1]))))
