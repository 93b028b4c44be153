"""`tokenratio perf`: step time, tokens/s, peak memory and MFU of each row, side by side with TRL.

Every row runs in its own process (a clean peak-memory reading), on the same model config and the
same pairs in the same batches. Pair lengths follow a real dataset (`--data`, default the HH
harmless pairs, tokenized and cut as `tokenratio train` would: `perf.lengths`) or are fixed
(`--data fixed`); the tokens are random words of a word-level tokenizer built in memory, one token
per word, so both libraries see exactly those lengths. Every row draws its batches from the same
pool of pairs, grouped by length as train.group_by_length groups them for the row's layout (the
prefix-shared row, or the plain row that TRL computes too), so no layout pays for another's
grouping; rows of one layout time exactly the same pairs. tokens/s counts each row's real tokens:
prompt counted once per side, as TRL counts it, padding not.

Rows: ours are a loss (or a loss with options, "tdpo1[generator=sba]") and optional train switches
("dpo+prefix_sharing=false+ref_cache=true"), timed in the training loop's own step
(`step.train_step` with the trainer's defaults and the switches); "trl" is TRL's DPOTrainer
(`sigmoid`) with its fastest settings that apply (`worker.run_trl`). Rows are repeated in
alternation (A B C A B C ...) and medians reported, as the machine is shared and noisy.

MFU counts the FLOPs the step needs on the real tokens (`required_flops`: 8 per non-embedding
parameter per token, the LM head only at response tokens, the same count for every row: work a
row saves, such as a shared prompt, counts as if done) against a matmul peak measured on the same
machine (fp32 on CPU, bf16 on GPU). Memory: the peak resident set (CPU) or `max_memory_allocated`
(GPU) of each row's process, and on CPU for our rows the exact peak of tensor memory one step
allocates (`peak_tensor_bytes`). perf.json is rewritten after every measured row, so an
interrupted run keeps its finished rows.
"""

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from tokenratio.atomic import write_text
from tokenratio.perf.models import MODELS, OUR_ROWS, count_params
from tokenratio.perf.worker import sync_device

# What each technique buys, one switch off at a time against the defaults (and all off).
ABLATION = [
    "dpo+prefix_sharing=false",
    "dpo+group_by_length=false",
    "dpo+prefix_sharing=false+group_by_length=false",
    "dpo+ref_cache=false",
    "dpo+compile=true",
]
# The step ratios, each measured in one process (`worker.run_ab`): TBPO against DPO with the
# defaults (TBPO-A's exact KL cannot use the reference cache; its k3 form reads cached samples),
# and exact TBPO-A against DPO doing the same reference work.
AB = [
    "dpo:tbpo-q",
    "dpo:tbpo-a[kl_estimator=k3]",
    "dpo:tbpo-a",
    "dpo+ref_cache=false:tbpo-a",
]
# The CPU study's recipe (configs/study_smollm2_hh_cpu.toml): LoRA on the last 4 of 30 layers,
# with the frozen trunk computed once (train.trunk_cache) and without.
STUDY_LORA = "+lora_r=16+lora_alpha=32+lora_dropout=0.0+lora_last_layers=4"
STUDY_AB = [
    f"dpo{STUDY_LORA}:dpo{STUDY_LORA}+trunk_cache",
    f"tbpo-a{STUDY_LORA}:tbpo-a{STUDY_LORA}+trunk_cache",
    f"tbpo-a[kl_estimator=k3]{STUDY_LORA}:tbpo-a[kl_estimator=k3]{STUDY_LORA}+trunk_cache",
    f"eval{STUDY_LORA}:eval{STUDY_LORA}+trunk_cache",  # the test evaluation of one model
]
PRESETS = {  # one command each; the GPU one is sized to finish within 10 minutes on one GPU
    "cpu": {
        "models": ["cpu20m"],
        "rows": [*OUR_ROWS, "tbpo-a[kl_estimator=k3]", "trl", "train", *ABLATION],
        "batch": 8,
        "max_length": 512,
        "max_prompt_length": 256,
        "steps": 4,
        "warmup": 1,
        "repeats": 2,
        "ab": AB,
        "device": "cpu",
        "dtype": "fp32",
    },
    "study": {  # the CPU study's shape, lengths and batch (HH through its cuts)
        "models": ["smollm2-135m"],
        "rows": [f"dpo{STUDY_LORA}", f"dpo{STUDY_LORA}+trunk_cache"],
        "batch": 4,
        "max_length": 112,
        "max_prompt_length": 48,
        "steps": 6,
        "warmup": 1,
        "repeats": 1,
        "ab": STUDY_AB,
        "device": "cpu",
        "dtype": "fp32",
    },
    "sampling": {  # the frontier preset's sampling: K = 4 samples of 24 tokens, 16 HH prompts
        "models": ["smollm2-135m"],
        "rows": [],
        "batch": 16,
        "max_length": 112,
        "max_prompt_length": 64,
        "steps": 4,
        "warmup": 1,
        "repeats": 1,
        "ab": ["generate:sample"],
        "device": "cpu",
        "dtype": "fp32",
    },
    "head": {  # issue 24's shape: where the (tokens x vocabulary) logits dominate a step
        "models": ["llama3-vocab"],
        "rows": ["dpo", "tbpo-q", "tbpo-a", "tbpo-a[kl_estimator=k3]", "tdpo1", "trl"],
        "batch": 8,
        "data": "fixed",
        "prompt_len": 512,
        "response_len": 512,
        "steps": 2,
        "warmup": 1,
        "repeats": 1,
        "ab": ["dpo+fused_head=false:dpo"],
        "device": "cpu",
        "dtype": "fp32",
    },
    "gpu": {
        "models": ["smollm2-135m", "llama3.2-1b"],
        "rows": ["dpo", "tbpo-a", "tbpo-q", "trl", "train", *ABLATION[:1], *ABLATION[3:]],
        "batch": 8,
        "max_length": 512,
        "max_prompt_length": 256,
        "steps": 10,
        "warmup": 3,
        "repeats": 1,
        "ab": [AB[0], AB[1], AB[3]],  # dpo:tbpo-a is the rows' own step/dpo column
        "device": "cuda",
        "dtype": "bf16",
    },
}


def matmul_peak(device: str, dtype, size: int = 2048, repeats: int = 10) -> float:
    """Measured FLOP/s of a square matmul: the denominator of MFU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync_device(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync_device(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def plan_batches(lengths: list, batch: int, steps: int, seed: int = 0) -> tuple[list, dict, list]:
    """`steps` batches as the trainer would draw them, for each layout: a pool of 50 batches'
    worth of pairs, grouped by length as train.group_by_length groups them (by the row each layout
    computes: prompt plus both responses when prefix-shared, prompt plus the longer response in
    the plain layout, TRL's too), and `steps` of those batches at random; for rows that switch
    grouping off, pairs in draw order. Returns (the pairs' (prompt, chosen, rejected) lengths,
    {"shared": plan, "plain": plan, "ungrouped": plan}, each pair's index in `lengths`), a plan
    being lists of pair indices."""
    from tokenratio.batch import length_grouped_order

    g = torch.Generator().manual_seed(seed)
    drawn = torch.randint(0, len(lengths), (batch * 50,), generator=g).tolist()
    pool = [lengths[i] for i in drawn]
    picked = torch.randperm(50, generator=g)[:steps].tolist()
    plans = {"ungrouped": [list(range(i * batch, (i + 1) * batch)) for i in range(steps)]}
    for layout, row_length in (
        ("shared", lambda p, c, r: p + c + r),
        ("plain", lambda p, c, r: p + max(c, r)),
    ):
        order = length_grouped_order([row_length(*pair) for pair in pool], batch, seed)
        grouped = [order[i : i + batch] for i in range(0, len(order), batch)]
        plans[layout] = [grouped[i] for i in picked]
    used = sorted({i for plan in plans.values() for b in plan for i in b})
    index = {old: new for new, old in enumerate(used)}
    plans = {k: [[index[i] for i in b] for b in plan] for k, plan in plans.items()}
    return [lengths[drawn[i]] for i in used], plans, [drawn[i] for i in used]


def pair_lengths_for(data: str, model: str, settings: dict) -> list:
    if data == "fixed":
        return [
            (settings["prompt_len"], settings["response_len"] + 1, settings["response_len"] + 1)
        ]
    from tokenratio.perf.lengths import dataset_lengths

    if not Path(data).exists():
        raise RuntimeError(f"--data {data}: no such file (or --data fixed for fixed lengths)")
    return dataset_lengths(
        data, MODELS[model][0], settings["max_length"], settings["max_prompt_length"]
    )


def _measure_row(common: dict, row: str) -> dict:
    """One row in its own process (a clean peak-memory reading)."""
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


def _measure_ab(common: dict, pair: str, repeats: int) -> dict:
    """ "A:B": both rows' steps alternating in one process, `repeats` rounds over the timed
    batches; B's step over A's as the median of the per-step ratios (each on the same batch, one
    right after the other) and as the ratio of the total times."""
    rows = pair.split(":")
    if len(rows) != 2:
        raise RuntimeError(f"--ab {pair}: give two of our rows as A:B, e.g. dpo:tbpo-q")
    measured = _measure_row({**common, "ab": rows, "ab_repeats": repeats}, "ab")
    a, b = (measured["seconds"][row] for row in rows)
    ratios = [tb / ta for ta, tb in zip(a, b, strict=True)]
    return {
        "pair": pair,
        "rows": rows,
        "ratio": statistics.median(ratios),
        "quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3,
        "total_ratio": sum(b) / sum(a),
        "ratios": ratios,
        "step_s": [statistics.median(a), statistics.median(b)],
        **_tokens_per_s(measured, rows),
    }


def _tokens_per_s(measured: dict, rows: list[str]) -> dict:
    """Sampling rows' tokens per second (each call's generated tokens over its median time)."""
    tokens = measured.get("tokens", {})
    if not all(tokens.get(row) and tokens[row][0] for row in rows):
        return {}
    return {
        "tokens_per_s": [
            statistics.median(tokens[row]) / statistics.median(measured["seconds"][row])
            for row in rows
        ]
    }


def _summarise(measured: dict, config: dict) -> list[dict]:
    """Medians over repeats, tokens/s on real tokens, MFU, and ratios against our dpo and TRL."""
    summary = []
    for row, runs in measured.items():
        if not runs:
            continue
        seconds = statistics.median(m["seconds"] for m in runs)
        first = runs[0]  # tokens and tensor peaks are the same every repeat
        flops = required_flops(
            config["params"], config["model"], first["real_tokens"], first["response_tokens"]
        )
        summary.append(
            {
                "row": row,
                "step_s": seconds / len(first["times"]),
                "tokens_per_s": first["real_tokens"] / seconds,
                "peak_mib": statistics.median(m["peak_bytes"] for m in runs) / 2**20,
                "tensor_mib": None
                if first["tensor_peak_bytes"] is None
                else first["tensor_peak_bytes"] / 2**20,
                "mfu": flops / seconds / config["matmul_peak_flops"],
                "pad_fraction": None
                if first["padded_tokens"] is None
                else 1 - first["computed_tokens"] / first["padded_tokens"],
                "max_pad_fraction": first.get("max_pad_fraction"),
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
        r["speed_vs_trl"] = r["tokens_per_s"] / trl["tokens_per_s"] if trl else None
        r["memory_vs_trl"] = r["peak_mib"] / trl["peak_mib"] if trl else None


@contextlib.contextmanager
def heartbeat(what: str, say, every: float = 30.0):
    """A line every `every` seconds while `what` runs (a row at a large shape takes minutes), so
    `tokenratio perf` is never silent for longer."""
    started, stop = time.perf_counter(), threading.Event()

    def beat():
        while not stop.wait(every):
            say(f"  {what}: still running, {time.perf_counter() - started:.0f} s")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _default_rows(rows, ablation: bool, progress=print) -> list[str]:
    """The rows asked for (default: every loss, and TRL when installed), the ablation rows with
    `ablation`; a TRL row is dropped, with a note, where TRL is not installed."""
    import importlib.util

    has_trl = importlib.util.find_spec("trl") is not None
    chosen = list([*OUR_ROWS, "trl"] if rows is None else rows)  # a preset may time pairs only
    if ablation:
        chosen += [r for r in ABLATION if r not in chosen]
    if "trl" in chosen and not has_trl:
        progress("  trl is not installed: no TRL row (pip install 'tokenratio[trl]')")
        chosen.remove("trl")
    return chosen


def run_perf(
    model="tiny",
    rows=None,
    steps=8,
    warmup=2,
    batch=8,
    data="fixed",
    prompt_len=64,
    response_len=64,
    max_length=512,
    max_prompt_length=256,
    repeats=2,
    ab=(),
    device="cpu",
    dtype="fp32",
    ablation=False,
    threads=None,
    out=None,
    progress=print,
) -> dict:
    """All rows, alternating, `repeats` times; medians, ratios, MFU; then each `ab` pair ("A:B")
    alternating step by step in one process, 2 x `repeats` rounds over the timed batches. Writes
    out/perf.json (after every row and pair) and out/perf.txt."""
    rows = _default_rows(rows, ablation, progress)
    if "train" in rows and data == "fixed":
        raise RuntimeError("the train row runs `tokenratio train` on a data file: give --data")
    settings = dict(prompt_len=prompt_len, response_len=response_len, max_length=max_length)
    settings["max_prompt_length"] = max_prompt_length
    lengths, plans, sources = plan_batches(
        pair_lengths_for(data, model, settings), batch, warmup + steps
    )
    common = {
        "model": model,
        "warmup": warmup,
        "batch": batch,
        "lengths": lengths,
        "sources": sources,  # each pair's entry in perf.lengths.dataset_lengths (the train row)
        "plans": plans,
        "device": device,
        "dtype": dtype,
        "threads": threads or torch.get_num_threads(),
        "data": data,
        **settings,
    }
    config = _report_config(common, steps, repeats)
    measured: dict[str, list[dict]] = {r: [] for r in rows}
    report = {"config": config, "rows": [], "raw": measured}
    for rep in range(repeats):
        for row in rows:
            with heartbeat(f"repeat {rep + 1}/{repeats} {row}", progress):
                measured[row].append(_measure_row(common, row))
            progress(
                f"  repeat {rep + 1}/{repeats} {row}: {measured[row][-1]['step_s']:.3f} s/step"
            )
            report = {"config": config, "rows": _summarise(measured, config), "raw": measured}
            if out:
                _write(out, report, final=False)
    for pair in ab:
        with heartbeat(f"one process, step by step, {pair}", progress):
            report.setdefault("ab", []).append(_measure_ab(common, pair, 2 * repeats))
        progress(f"  one process, step by step, {pair}: {report['ab'][-1]['ratio']:.3f}x")
        if out:
            _write(out, report, final=False)
    if out:
        _write(out, report, final=True)
    return report


def _report_config(common: dict, steps: int, repeats: int) -> dict:
    """perf.json's "config": the run's shape, its machine, token counts and the command."""
    model, data, lengths, warmup = (
        common["model"],
        common["data"],
        common["lengths"],
        common["warmup"],
    )
    dtype, device = common["dtype"], common["device"]
    timed = [i for b in common["plans"]["shared"][warmup:] for i in b]
    lengths_settings = ("prompt_len", "response_len", "max_length", "max_prompt_length")
    shape = {k: common[k] for k in lengths_settings[: 2 if data == "fixed" else 4]}
    return {
        **{k: common[k] for k in ("model", "warmup", "batch", "device", "dtype", "threads")},
        "steps": steps,
        "data": data if data == "fixed" else str(data),
        **shape,
        "repeats": repeats,
        "params": count_params(model),
        "matmul_peak_flops": matmul_peak(
            device, torch.bfloat16 if dtype == "bf16" else torch.float32
        ),
        "response_tokens": sum(lengths[i][1] + lengths[i][2] for i in timed),
        "real_tokens_per_step": sum(
            2 * lengths[i][0] + lengths[i][1] + lengths[i][2] for i in timed
        )
        / steps,
        "machine": _machine(device),
        "command": " ".join(["tokenratio", "perf", *sys.argv[2:]])
        if sys.argv[1:2] == ["perf"]
        else None,
    }


def _write(out, report: dict, final: bool) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    write_text(Path(out) / "perf.json", json.dumps({**report, "complete": final}, indent=1))
    if final:
        write_text(Path(out) / "perf.txt", format_report(report) + "\n")


def required_flops(n_params: int, model: str, real_tokens: int, response_tokens: int) -> float:
    """FLOPs the timed steps need, whoever runs them: 8 per non-embedding parameter per real token
    (policy forward 2 + backward 4, reference forward 2), plus the LM head (8 * V * H) only at the
    response tokens whose log-probs the loss uses. Embedding lookups are not matmuls."""
    vocab, hidden = MODELS[model][0], MODELS[model][1]
    body = n_params - 2 * vocab * hidden  # untied input embedding and LM head excluded
    return 8 * body * real_tokens + 8 * vocab * hidden * response_tokens


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

    from tokenratio.precision import cpu_has_native_bf16

    capability = torch.backends.cpu.get_cpu_capability()  # AVX2-only CPUs time differently
    native = cpu_has_native_bf16()
    bf16 = f"native bf16 ({native})" if native else "no native bf16"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {capability}, "
        f"{bf16}, torch {torch.__version__}"
    )


def format_report(report: dict) -> str:
    cfg = report["config"]
    shape = (
        f"({cfg['prompt_len']} prompt + {cfg['response_len']} response) tokens"
        if cfg["data"] == "fixed"
        else f"lengths of {cfg['data']} (max_length {cfg['max_length']}, prompt {cfg['max_prompt_length']})"
    )
    lines = [
        f"model {cfg['model']} ({cfg['params'] / 1e6:.1f}M params), batch {cfg['batch']} pairs, {shape}, "
        f"{cfg['real_tokens_per_step']:.0f} real tokens per step, {cfg['device']} {cfg['dtype']}, "
        f"{cfg['threads']} threads; matmul peak {cfg['matmul_peak_flops'] / 1e9:.0f} GFLOP/s; medians of "
        f"{cfg['repeats']} alternating repeats x {cfg['steps']} steps",
        f"{'row':>46} {'s/step':>7} {'tok/s':>8} {'peak MiB':>8} {'MFU':>6} {'pad':>5} "
        f"{'step/dpo':>8} {'mem/dpo':>7} {'speed/TRL':>9} {'mem/TRL':>7} {'tensor MiB':>10}",
    ]

    def ratio(row, key):
        value = row.get(key)
        return f"{value:.2f}x" if value is not None else "-"

    for r in report["rows"]:
        tensor = "-" if r.get("tensor_mib") is None else f"{r['tensor_mib']:.0f}"
        pad = "-" if r.get("pad_fraction") is None else f"{100 * r['pad_fraction']:.0f}%"
        lines.append(
            f"{r['row']:>46} {r['step_s']:>7.3f} {r['tokens_per_s']:>8.0f} {r['peak_mib']:>8.0f} "
            f"{100 * r['mfu']:>5.1f}% {pad:>5} {ratio(r, 'step_vs_dpo'):>8} {ratio(r, 'memory_vs_dpo'):>7} "
            f"{ratio(r, 'speed_vs_trl'):>9} {ratio(r, 'memory_vs_trl'):>7} {tensor:>10}"
        )
    for pair in report.get("ab", []):
        a, b = pair["rows"]
        low, _, high = pair["quartiles"]
        lines.append(
            f"one process, step by step: {b} / {a} = {pair['ratio']:.3f}x (median of "
            f"{len(pair['ratios'])} paired steps, quartiles {low:.3f}-{high:.3f}; total time "
            f"{pair['total_ratio']:.3f}x; median steps {pair['step_s'][1]:.3f} / "
            f"{pair['step_s'][0]:.3f} s)"
        )
        if "tokens_per_s" in pair:
            lines.append(
                f"  generated tokens/s: {a} {pair['tokens_per_s'][0]:.0f}, {b} "
                f"{pair['tokens_per_s'][1]:.0f} ({pair['tokens_per_s'][1] / pair['tokens_per_s'][0]:.2f}x)"
            )
    lines.append(
        "tok/s: real tokens (prompt once per side, as TRL counts them; no padding), the same for every "
        "row; MFU: the FLOPs those tokens need; pad: padding share of the tokens our layout computes; "
        "peak MiB: the process's peak resident set up to the end of the timed steps (CPU) or "
        "max_memory_allocated (GPU); tensor MiB: the exact peak of tensor memory one more step "
        "allocates beyond what is resident (CPU, under the profiler, after the peak is read)"
    )
    return "\n".join(lines)
