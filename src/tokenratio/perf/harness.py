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

from tokenratio.perf.models import MODELS, OUR_ROWS, build_model
from tokenratio.perf.worker import _sync


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


def _measure_row(common: dict, row: str) -> dict:
    """One row in its own process (a clean peak-memory reading)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        payload = json.dumps({**common, "row": row, "tmp": tmp})
        result = subprocess.run(
            [sys.executable, "-m", "tokenratio.perf.worker", payload],
            capture_output=True,
            text=True,
            env=_worker_env(),
        )
    if result.returncode != 0:
        raise RuntimeError(f"perf row {row} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _summarise(measured: dict, common: dict, peak: float) -> list[dict]:
    """Medians over repeats, tokens/s, MFU, and ratios against our dpo and TRL."""
    tokens = 2 * common["batch"] * (common["prompt_len"] + common["response_len"] + 1)
    flops = required_flops(
        common["model"], common["batch"], common["prompt_len"], common["response_len"]
    )
    summary = []
    for row, runs in measured.items():
        step = statistics.median(m["step_s"] for m in runs)
        tensor = runs[0]["tensor_peak_bytes"]  # deterministic: the same every repeat
        summary.append(
            {
                "row": row,
                "step_s": step,
                "tokens_per_s": tokens / step,
                "peak_mib": statistics.median(m["peak_bytes"] for m in runs) / 2**20,
                "tensor_mib": None if tensor is None else tensor / 2**20,
                "mfu": flops / step / peak,
            }
        )
    _add_ratios(summary)
    return summary


def _add_ratios(summary: list[dict]) -> None:
    base = {r["row"]: r for r in summary}
    dpo, trl = base.get("dpo"), base.get("trl")
    for r in summary:
        r["step_vs_dpo"] = r["step_s"] / dpo["step_s"] if dpo else None
        r["memory_vs_dpo"] = r["peak_mib"] / dpo["peak_mib"] if dpo else None
        r["tensor_vs_dpo"] = None
        if dpo and r["tensor_mib"] is not None and dpo["tensor_mib"]:
            r["tensor_vs_dpo"] = r["tensor_mib"] / dpo["tensor_mib"]
        if trl:
            r["speed_vs_trl"] = r["tokens_per_s"] / trl["tokens_per_s"]
            r["memory_vs_trl"] = r["peak_mib"] / trl["peak_mib"]


def _default_rows(rows) -> list[str]:
    import importlib.util

    rows = list(rows or OUR_ROWS)
    if "trl" not in rows and importlib.util.find_spec("trl") is not None and rows == list(OUR_ROWS):
        rows.append("trl")
    return rows


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
    """All rows, alternating, `repeats` times; medians, ratios, MFU. Writes out/perf.json and
    out/perf.txt."""
    rows = _default_rows(rows)
    common = {
        "model": model,
        "steps": steps,
        "warmup": warmup,
        "batch": batch,
        "prompt_len": prompt_len,
        "response_len": response_len,
        "device": device,
        "dtype": dtype,
        "threads": threads or torch.get_num_threads(),
    }
    peak = matmul_peak(device, torch.bfloat16 if dtype == "bf16" else torch.float32)
    measured: dict[str, list[dict]] = {r: [] for r in rows}
    for rep in range(repeats):
        for row in rows:
            measured[row].append(_measure_row(common, row))
            progress(
                f"  repeat {rep + 1}/{repeats} {row}: {measured[row][-1]['step_s']:.3f} s/step"
            )
    config = {
        **common,
        "repeats": repeats,
        "params": sum(p.numel() for p in build_model(model).parameters()),
        "matmul_peak_flops": peak,
        "tokens_per_step": 2 * batch * (prompt_len + response_len + 1),
        "machine": _machine(device),
    }
    report = {"config": config, "rows": _summarise(measured, common, peak), "raw": measured}
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "perf.json").write_text(json.dumps(report, indent=1))
        (Path(out) / "perf.txt").write_text(format_report(report) + "\n")
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
        f"{'row':>20} {'s/step':>8} {'tok/s':>9} {'peak MiB':>9} {'MFU':>6} "
        f"{'step/dpo':>9} {'mem/dpo':>8} {'speed/TRL':>10} {'mem/TRL':>8} "
        f"{'tensor MiB':>11} {'tensor/dpo':>11}",
    ]

    def ratio(row, key):
        value = row.get(key)
        return f"{value:.2f}x" if value is not None else "-"

    for r in report["rows"]:
        tensor = "-" if r.get("tensor_mib") is None else f"{r['tensor_mib']:.0f}"
        lines.append(
            f"{r['row']:>20} {r['step_s']:>8.3f} {r['tokens_per_s']:>9.0f} {r['peak_mib']:>9.0f} "
            f"{100 * r['mfu']:>5.1f}% {ratio(r, 'step_vs_dpo'):>9} {ratio(r, 'memory_vs_dpo'):>8} "
            f"{ratio(r, 'speed_vs_trl'):>10} {ratio(r, 'memory_vs_trl'):>8} {tensor:>11} "
            f"{ratio(r, 'tensor_vs_dpo'):>11}"
        )
    lines.append(
        "peak MiB: the process's resident set (the issue's metric; noisy on this VM); tensor MiB: "
        "the exact peak of tensor memory one step allocates beyond what is resident (profiler)"
    )
    return "\n".join(lines)
