"""`tokenratio perf`: step time, tokens/s, peak memory and MFU of each loss, side by side with TRL.

Every row runs in its own subprocess (a clean peak-memory reading), on the same model config, the same
token batches (a word-level tokenizer built in memory: one token per synthetic word, so prompt and
response lengths are exact for both libraries) and the same batch size. Rows are repeated in
alternation (A B C A B C ...) and medians reported, as the machine is shared and noisy.

Rows: ours with `dpo`, `tbpo-a`, `tbpo-q`, `tdpo2`, `bpo`, `tisdpo` (the training loop's own step: policy
forward with the LM head on response positions only, reference forward without autograd, chunked
log-probs/KL, loss, backward, AdamW), and TRL's `DPOTrainer` (`sigmoid`) when TRL is installed.
MFU counts the FLOPs the step needs (`required_flops`: 8 per non-embedding parameter per token, and
the LM head only at response positions, the same count for every row) against a matmul peak measured
on the same machine (fp32 on CPU, bf16 on GPU). Memory: the peak resident set (CPU) or
`max_memory_allocated` (GPU) of each row's process, and on CPU, for our rows, the exact peak of
tensor memory one step allocates (`peak_tensor_bytes`, from the profiler's allocator events).
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

MODELS = {  # name: (vocab, hidden, layers, heads, kv_heads, intermediate)
    "tiny": (2048, 64, 2, 4, 2, 128),
    "cpu20m": (8192, 384, 6, 6, 2, 1024),
    "smollm2-135m": (49152, 576, 30, 9, 3, 1536),  # SmolLM2-135M's architecture, random weights
    "llama3-vocab": (128256, 256, 2, 4, 2, 512),  # a 128k vocabulary: the full-vocabulary KL test
}
OUR_ROWS = ("dpo", "tbpo-a", "tbpo-q", "tdpo2", "bpo", "tisdpo")


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over w0..w{V-5} plus specials: one token per word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"w{i}": i + len(specials) for i in range(vocab_size - len(specials))})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def synthetic_pairs(num: int, vocab: int, prompt_len: int, response_len: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)

    def words(n):
        return " ".join(f"w{i}" for i in torch.randint(0, vocab - 4, (n,), generator=g).tolist())

    return [
        {
            "prompt": words(prompt_len),
            "chosen": " " + words(response_len),
            "rejected": " " + words(response_len),
        }
        for _ in range(num)
    ]


def build_model(name: str, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab, hidden, layers, heads, kv, inter = MODELS[name]
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(dtype)


def matmul_peak(device: str, dtype, size: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of a square matmul: the denominator of MFU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def perf_config(loss: str, args: dict):
    """The Config a row's trainer step runs with: the harness's model shape, AdamW, lr 1e-6."""
    from tokenratio.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig

    return Config(
        model=ModelConfig(name_or_path=f"random:{args['model']}"),
        data=DataConfig(path="synthetic"),
        loss=LossConfig(name=loss, beta=0.1),
        train=TrainConfig(
            optimizer="adamw",
            lr=1e-6,
            cpu=not args["device"].startswith("cuda"),
            logprob_chunk_elements=1 << 22,
        ),
    )


def token_rows(tokenizer, pairs: list[dict], with_weights: bool) -> list[dict]:
    """Tokenized pairs (EOS after each response); TIS-DPO's weights: any values will do."""
    rows = [
        {
            "prompt_ids": tokenizer(p["prompt"])["input_ids"],
            "chosen_ids": tokenizer(p["chosen"], add_special_tokens=False)["input_ids"] + [2],
            "rejected_ids": tokenizer(p["rejected"], add_special_tokens=False)["input_ids"] + [2],
        }
        for p in pairs
    ]
    g = torch.Generator().manual_seed(0)
    for row in rows if with_weights else []:
        for side in ("chosen", "rejected"):
            n = len(row[f"{side}_ids"])
            row[f"{side}_weight"] = (0.5 + torch.rand(n, generator=g)).tolist()
    return rows


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


def peak_tensor_bytes(fn) -> int:
    """Largest number of bytes `fn` has allocated and not yet freed at any moment while it runs.

    Exact and deterministic: the profiler records every allocation and free of torch's CPU
    allocator in order (autograd's saved tensors included), and their running sum is the live
    tensor memory beyond what existed before the call.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()  # + on allocation, - on free
        peak = max(peak, live)
    return peak


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


def run_perf(
    model="tiny",
    rows=None,
    steps=8,
    warmup=2,
    batch=8,
    prompt_len=64,
    response_len=64,
    repeats=2,
    device="cpu",
    dtype="fp32",
    threads=None,
    out=None,
    progress=print,
) -> dict:
    """All rows, alternating, `repeats` times; medians, ratios, MFU. Writes out/perf.json."""
    import importlib.util
    import tempfile

    rows = list(rows or OUR_ROWS)
    if "trl" not in rows and importlib.util.find_spec("trl") is not None and rows == list(OUR_ROWS):
        rows.append("trl")
    threads = threads or torch.get_num_threads()
    n_params = sum(p.numel() for p in build_model(model).parameters())
    peak = matmul_peak(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    common = {
        "model": model,
        "steps": steps,
        "warmup": warmup,
        "batch": batch,
        "prompt_len": prompt_len,
        "response_len": response_len,
        "device": device,
        "dtype": dtype,
        "threads": threads,
    }
    measured: dict[str, list[dict]] = {r: [] for r in rows}
    for rep in range(repeats):
        for row in rows:
            with tempfile.TemporaryDirectory() as tmp:
                payload = json.dumps({**common, "row": row, "tmp": tmp})
                result = subprocess.run(
                    [sys.executable, "-m", "tokenratio.perf", payload],
                    capture_output=True,
                    text=True,
                    env=_worker_env(),
                )
            if result.returncode != 0:
                raise RuntimeError(f"perf row {row} failed:\n{result.stderr[-3000:]}")
            measured[row].append(json.loads(result.stdout.strip().splitlines()[-1]))
            progress(
                f"  repeat {rep + 1}/{repeats} {row}: {measured[row][-1]['step_s']:.3f} s/step"
            )
    tokens = 2 * batch * (prompt_len + response_len + 1)
    summary = []
    for row in rows:
        step = statistics.median(m["step_s"] for m in measured[row])
        memory = statistics.median(m["peak_bytes"] for m in measured[row])
        tensor = measured[row][0]["tensor_peak_bytes"]  # deterministic: the same every repeat
        flops = required_flops(model, batch, prompt_len, response_len)
        summary.append(
            {
                "row": row,
                "step_s": step,
                "tokens_per_s": tokens / step,
                "peak_mib": memory / 2**20,
                "tensor_mib": None if tensor is None else tensor / 2**20,
                "mfu": flops / step / peak,
            }
        )
    base = {r["row"]: r for r in summary}
    for r in summary:
        r["step_vs_dpo"] = r["step_s"] / base["dpo"]["step_s"] if "dpo" in base else None
        r["memory_vs_dpo"] = r["peak_mib"] / base["dpo"]["peak_mib"] if "dpo" in base else None
        r["tensor_vs_dpo"] = None
        if "dpo" in base and r["tensor_mib"] is not None and base["dpo"]["tensor_mib"]:
            r["tensor_vs_dpo"] = r["tensor_mib"] / base["dpo"]["tensor_mib"]
        if "trl" in base:
            r["speed_vs_trl"] = r["tokens_per_s"] / base["trl"]["tokens_per_s"]
            r["memory_vs_trl"] = r["peak_mib"] / base["trl"]["peak_mib"]
    report = {
        "config": {
            **common,
            "repeats": repeats,
            "params": n_params,
            "matmul_peak_flops": peak,
            "tokens_per_step": tokens,
            "machine": _machine(device),
        },
        "rows": summary,
        "raw": measured,
    }
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "perf.json").write_text(json.dumps(report, indent=1))
    return report


def required_flops(model: str, batch: int, prompt_len: int, response_len: int) -> float:
    """FLOPs one step needs, whoever runs it: 8 per non-embedding parameter per token (policy
    forward 2 + backward 4, reference forward 2), plus the LM head (8 * V * H) only at the positions
    whose log-probs the loss uses, the response tokens. Embedding lookups are not matmuls."""
    vocab, hidden = MODELS[model][0], MODELS[model][1]
    n_params = sum(p.numel() for p in build_model(model).parameters())
    body = n_params - 2 * vocab * hidden  # untied input embedding and LM head excluded
    rows = 2 * batch
    all_tokens = rows * (prompt_len + response_len + 1)
    response_tokens = rows * (response_len + 1)
    return 8 * body * all_tokens + 8 * vocab * hidden * response_tokens


def _worker_env():
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("TQDM_DISABLE", "1")
    return env


def _machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"


def format_report(report: dict) -> str:
    cfg = report["config"]
    lines = [
        f"model {cfg['model']} ({cfg['params'] / 1e6:.1f}M params), batch {cfg['batch']} "
        f"pairs x ({cfg['prompt_len']} prompt + {cfg['response_len']} response) tokens, "
        f"{cfg['device']} {cfg['dtype']}, {cfg['threads']} threads; matmul peak "
        f"{cfg['matmul_peak_flops'] / 1e9:.0f} GFLOP/s; medians of {cfg['repeats']} "
        f"alternating repeats x {cfg['steps']} steps",
        f"{'row':>8} {'s/step':>8} {'tok/s':>9} {'peak MiB':>9} {'MFU':>6} "
        f"{'step/dpo':>9} {'mem/dpo':>8} {'speed/TRL':>10} {'mem/TRL':>8} "
        f"{'tensor MiB':>11} {'tensor/dpo':>11}",
    ]

    def ratio(row, key):
        value = row.get(key)
        return f"{value:.2f}x" if value is not None else "-"

    for r in report["rows"]:
        tensor = "-" if r.get("tensor_mib") is None else f"{r['tensor_mib']:.0f}"
        lines.append(
            f"{r['row']:>8} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} {r['peak_mib']:>9.0f} "
            f"{100 * r['mfu']:>5.1f}% {ratio(r, 'step_vs_dpo'):>9} {ratio(r, 'memory_vs_dpo'):>8} "
            f"{ratio(r, 'speed_vs_trl'):>10} {ratio(r, 'memory_vs_trl'):>8} {tensor:>11} "
            f"{ratio(r, 'tensor_vs_dpo'):>11}"
        )
    lines.append(
        "peak MiB: the process's resident set (the issue's metric; noisy on this VM); tensor MiB: "
        "the exact peak of tensor memory one step allocates beyond what is resident (profiler)"
    )
    return "\n".join(lines)


if __name__ == "__main__":  # the worker entry point: one row, JSON in argv, JSON on stdout
    print(json.dumps(worker(json.loads(sys.argv[1]))))
