"""One row of `tokenratio perf` in its own process: `python -m tokenratio.perf.worker JSON`.

Our rows time `step.train_step`, the function `tokenratio train` runs every optimizer step, built
by `step.prepare_step_parts` from a Config (with the row's train switches); the TRL row times
`DPOTrainer`'s steps with a callback. Every row gets the same pairs in the same batches (the
harness's `plan`), so the real tokens per timed step are the same for every row.
"""

import functools
import json
import sys
import time
from dataclasses import replace

import torch

from tokenratio.memory import peak_tensor_bytes
from tokenratio.methods import parse_row
from tokenratio.perf.models import build_model, pairs_of_lengths, token_rows, word_tokenizer


def sync_device(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def perf_config(method: str, args: dict, switches: dict | None = None):
    """The Config a row's trainer step runs with: the harness's model shape, AdamW, lr 1e-6, the
    trainer's defaults and the row's switches (model.* ones by name, e.g. lora_last_layers; the
    rest train.*); bf16 autocast over fp32 weights on a GPU (as `tokenratio train` with
    train.mixed_precision = "bf16", and as TRL's bf16)."""
    from dataclasses import fields

    from tokenratio.config import Config, DataConfig, LossConfig, ModelConfig, TrainConfig
    from tokenratio.methods import parse_method

    switches = dict(switches or {})
    model_names = {f.name for f in fields(ModelConfig)}
    model_switches = {k: switches.pop(k) for k in list(switches) if k in model_names}

    loss, options = parse_method(method)
    train = TrainConfig(
        optimizer="adamw",
        lr=1e-6,
        cpu=not args["device"].startswith("cuda"),
        mixed_precision="bf16" if args.get("dtype") == "bf16" else "no",
        logprob_chunk_elements=1 << 22,
    )
    return Config(
        model=ModelConfig(name_or_path=f"random:{args['model']}", **model_switches),
        data=DataConfig(path="synthetic"),
        loss=LossConfig(name=loss, beta=0.1, options=options),
        train=replace(train, **switches),
    )


def _batches(cfg, step, model, args) -> tuple:
    """(the step with the row's frozen trunk (train.trunk_cache) and cached reference values
    (train.ref_cache), the plan's batches as this row's layout collates them): one pass each,
    untimed, as TRL's precompute, in memory; on the row's device."""
    from tokenratio.reference import score_rows
    from tokenratio.step import batch_collator

    tokenizer = word_tokenizer(model.config.vocab_size)
    rows = token_rows(
        tokenizer, pairs_of_lengths(args["lengths"], model.config.vocab_size), step.needs.weights
    )
    if cfg.train.trunk_cache:
        step = replace(step, trunk=_trunk_in_memory(cfg, step, rows))
    if step.reference_plan.cached:
        samples = step.reference_plan.samples
        values = score_rows(model.eval(), rows, 0, 8, samples, step.trunk)
        step = replace(step, cached_values=values)
        model.train()
    collate = batch_collator(cfg, step, 0)
    layout = "shared" if cfg.train.prefix_sharing else "plain"
    plan = args["plans"][layout if cfg.train.group_by_length else "ungrouped"]
    return step, [collate([rows[i] for i in batch]).to(step.accelerator.device) for batch in plan]


def _trunk_in_memory(cfg, step, rows):
    import contextlib

    from tokenratio import trunk
    from tokenratio.modeling import unwrap_peft

    policy = step.accelerator.unwrap_model(step.policy)
    layers = trunk.trunk_layers(cfg.model, policy.model)
    cache = trunk.TrunkCache(layers, "perf")
    inner = unwrap_peft(policy.model)
    with torch.no_grad():
        cache.compute_missing(inner.eval(), rows, 0, 8, contextlib.nullcontext)
    inner.train()
    return cache


def prepare_row(row: str, args) -> tuple:
    """(the row's `step.StepParts`, the plan's batches as its layout collates them)."""
    from tokenratio import reference
    from tokenratio.losses import LOSSES
    from tokenratio.step import make_accelerator, prepare_step_parts

    method, switches = parse_row(row)
    cfg = perf_config(method, args, switches)
    model = build_model(args["model"])
    accelerator = make_accelerator(cfg)
    needs = LOSSES[cfg.loss.name].needs(cfg.loss.options)
    plan = reference.plan(cfg, needs, accelerator, identity=f"random:{args['model']}")
    steps = len(args["plans"]["shared"]) + 2
    step = prepare_step_parts(cfg, accelerator, steps, model=model, plan=plan)
    return _batches(cfg, step, model, args)


def _timed_steps(step, batches, device: str) -> list[float]:
    from tokenratio.step import train_step

    times = []
    for batch in batches:
        start = time.perf_counter()
        train_step(step, [batch])
        sync_device(device)
        times.append(time.perf_counter() - start)
    return times


def run_ours(row: str, args) -> dict:
    """Step times of `step.train_step`, the function `tokenratio train` runs every step."""
    from tokenratio.step import train_step

    step, batches = prepare_row(row, args)
    times = _timed_steps(step, batches, args["device"])
    # The peak resident set of the timed steps, read before the profiled one: the profiler's own
    # record of every allocation is no training memory (TRL's row runs no profiler).
    peak = _peak_memory(args["device"])
    # One more step under the profiler: the exact peak of tensor memory it allocates on top of what
    # is resident (weights, optimizer state); the resident set is the metric, but noisy here.
    tensor_peak = None
    if not args["device"].startswith("cuda"):
        tensor_peak = peak_tensor_bytes(lambda: train_step(step, [batches[-1]]))
    timed = batches[args["warmup"] :]
    return {
        "times": times[args["warmup"] :],
        "tensor_peak_bytes": tensor_peak,
        "peak_bytes": peak,
        "real_tokens": sum(b.real_tokens for b in timed),
        "response_tokens": sum(int((b.labels >= 0).sum()) for b in timed),
        "padded_tokens": sum(b.input_ids.numel() for b in timed),
        "computed_tokens": sum(int(b.attention_mask.sum()) for b in timed),
        "max_pad_fraction": max(
            1 - int(b.attention_mask.sum()) / b.input_ids.numel() for b in timed
        ),
    }


def run_ab(args) -> dict:
    """Two rows' steps in ONE process, alternating step by step on the same batch (A then B,
    then B then A on the next, so neither always goes first), after a warm-up of each: step
    ratios that drift, noisy neighbours and process layout cannot bend, as they do between the
    rows' own processes on a shared machine. Returns each row's step times, paired by index."""
    rows = args["ab"]
    prepared = {row: _timed_calls(row, args) for row in rows}
    warmup = args["warmup"]
    for calls in prepared.values():
        _time_calls(calls[:warmup], args["device"])
    times = {row: [] for row in rows}
    for round_ in range(args["ab_repeats"]):
        for i in range(warmup, len(prepared[rows[0]])):
            order = rows if (round_ + i) % 2 == 0 else rows[::-1]
            for row in order:
                times[row] += _time_calls(prepared[row][i : i + 1], args["device"])
    tokens = {row: [getattr(c, "tokens", None) for c in calls] for row, calls in prepared.items()}
    return {"rows": rows, "seconds": times, "tokens": tokens}


def _time_calls(calls, device: str) -> list[float]:
    times = []
    for call in calls:
        start = time.perf_counter()
        call()
        sync_device(device)
        times.append(time.perf_counter() - start)
    return times


def _timed_calls(row: str, args) -> list:
    """One call per plan batch: a training step (`step.train_step`), or for an "eval" row the
    study's test scoring of that batch (`eval.evaluate.preference_metrics`)."""
    from tokenratio.step import train_step

    if row.split("+")[0] == "eval":
        return _eval_calls(row, args)
    if row in SAMPLING_ROWS:
        return _sampling_calls(row, args)
    step, batches = prepare_row(row, args)
    return [lambda b=b: train_step(step, [b]) for b in batches]


def _eval_calls(row: str, args) -> list:
    """The study's test evaluation of a LoRA-trained model against its base, one plan batch a
    call: both models over the pairs, log-probs and the full-vocabulary KL. With
    +trunk_cache the pairs' frozen trunk is read from the cache (computed once per study for
    every evaluation, so here once, untimed)."""
    import contextlib
    import copy

    from datasets import Dataset

    from tokenratio import trunk
    from tokenratio.eval.evaluate import preference_metrics
    from tokenratio.losses import Needs
    from tokenratio.modeling import build_policy

    _, switches = parse_row(row)
    cfg = perf_config("dpo", args, switches)
    reference = build_model(args["model"]).eval()
    policy = build_policy(cfg.model, Needs(), copy.deepcopy(reference)).model
    torch.manual_seed(0)
    for name, parameter in policy.named_parameters():
        if "lora_B" in name:  # a trained adapter, not the zero one LoRA starts from
            torch.nn.init.normal_(parameter, std=0.02)
    model = policy.merge_and_unload().eval()  # as evaluated: final/ loaded and merged
    tokenizer = word_tokenizer(model.config.vocab_size)
    rows = token_rows(tokenizer, pairs_of_lengths(args["lengths"], model.config.vocab_size), False)
    cache = None
    if cfg.train.trunk_cache:
        cache = trunk.TrunkCache(trunk.shared_layers(model, reference), "perf")
        cache.compute_missing(reference, rows, 0, 8, contextlib.nullcontext)
    plan = args["plans"]["plain"]
    sets = [Dataset.from_list([rows[i] for i in batch]) for batch in plan]
    return [
        lambda d=d: preference_metrics(model, reference, d, 0, 0.1, len(d), trunk=cache)
        for d in sets
    ]


SAMPLING_ROWS = ("generate", "sample")
SAMPLES, NEW_TOKENS = 4, 24  # the frontier preset's K and max_new_tokens


class _Call:
    """A timed call that knows how many tokens it generates (tokens/s for sampling rows)."""

    def __init__(self, function, tokens: int):
        self.function, self.tokens = function, tokens

    def __call__(self):
        return self.function()


def _sampling_calls(row: str, args) -> list:
    """K samples of NEW_TOKENS tokens for each prompt of a plan batch, at temperature 1 with no
    top-k/top-p: "sample" is the frontier's sampler (frontier/sampling.py: each prompt's forward
    once, its cache expanded to K rows), "generate" is `model.generate(...,
    num_return_sequences=K)` on the same left-padded prompts. No end-of-sequence stop in either
    (generate's min_new_tokens), so both draw exactly the same number of tokens."""
    from tokenratio.frontier.sampling import sample

    model = build_model(args["model"]).eval()
    tokenizer = word_tokenizer(model.config.vocab_size)
    rows = token_rows(tokenizer, pairs_of_lengths(args["lengths"], model.config.vocab_size), False)
    calls = []
    for batch in args["plans"]["plain"]:
        prompts = [rows[i]["prompt_ids"] for i in batch]
        tokens = len(prompts) * SAMPLES * NEW_TOKENS
        if row == "sample":
            function = functools.partial(
                sample, model, prompts, SAMPLES, NEW_TOKENS, None, 0, len(prompts) * SAMPLES
            )
        else:
            function = functools.partial(_generate, model, prompts)
        calls.append(_Call(function, tokens))
    return calls


@torch.no_grad()
def _generate(model, prompts: list[list[int]]):
    from tokenratio.frontier.sampling import left_padded

    ids, mask = left_padded(prompts, next(model.parameters()).device)
    return model.generate(
        input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        num_return_sequences=SAMPLES, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
        pad_token_id=0,
    )  # fmt: skip


def run_trl(args) -> dict:
    """Step times of TRL's DPOTrainer (sigmoid) on the same model, pairs and batches, with TRL's
    fastest settings that apply: precomputed reference log-probs, bf16 on a GPU."""
    import copy

    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    model = build_model(args["model"])
    tokenizer = word_tokenizer(model.config.vocab_size)
    pairs = pairs_of_lengths(args["lengths"], model.config.vocab_size)
    plan = args["plans"]["plain"]  # grouped by TRL's own row length
    ordered = [pairs[i] for batch in plan for i in batch]
    times, last = [], [None]

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            sync_device(args["device"])
            last[0] = time.perf_counter()

        def on_step_end(self, *a, **k):
            sync_device(args["device"])
            times.append(time.perf_counter() - last[0])

    class InOrder(DPOTrainer):  # the plan's batches, in the plan's order (TRL shuffles)
        def _get_train_sampler(self, *args, **kwargs):
            return SequentialSampler(self.train_dataset)

    longest = max(p + max(c, r) for p, c, r in args["lengths"])
    config = DPOConfig(
        output_dir=args["tmp"],
        use_cpu=not args["device"].startswith("cuda"),
        bf16=args["dtype"] == "bf16",
        gradient_checkpointing=False,
        report_to=[],
        loss_type=["sigmoid"],
        precompute_ref_log_probs=True,
        per_device_train_batch_size=args["batch"],
        learning_rate=1e-6,
        max_steps=len(plan),
        save_strategy="no",
        logging_steps=10**6,
        max_length=longest + 8,
        dataloader_num_workers=0,
        disable_tqdm=True,
        optim="adamw_torch_fused",
    )
    trainer = InOrder(
        model=model,
        ref_model=copy.deepcopy(model),
        args=config,
        train_dataset=Dataset.from_list(ordered),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    trainer.train()
    timed = plan[args["warmup"] :]
    lengths = args["lengths"]
    return {
        "times": times[args["warmup"] :],
        "tensor_peak_bytes": None,
        "real_tokens": sum(
            2 * lengths[i][0] + lengths[i][1] + lengths[i][2] for b in timed for i in b
        ),
        "response_tokens": sum(lengths[i][1] + lengths[i][2] for b in timed for i in b),
        "padded_tokens": None,  # TRL pads inside its collator
        "settings": "sigmoid, precompute_ref_log_probs, fused AdamW"
        + (", bf16" if args["dtype"] == "bf16" else ", fp32")
        + " (padding_free is disabled in TRL 1.16)",
    }


def worker(args: dict) -> dict:
    """One row in this process; returns its timings, real tokens and peak memory."""
    torch.set_num_threads(args["threads"])
    if args["row"] == "ab":
        return run_ab(args)
    if args["row"] == "trl":
        measured = run_trl(args)
    elif args["row"] == "train":
        from tokenratio.perf.train_row import run_train

        measured = run_train(args)
    else:
        measured = run_ours(args["row"], args)
    measured.setdefault("peak_bytes", _peak_memory(args["device"]))  # ours read it themselves
    seconds = sum(measured["times"])
    return {
        "row": args["row"],
        **measured,
        "seconds": seconds,
        "step_s": seconds / len(measured["times"]),
        "tokens_per_s": measured["real_tokens"] / seconds,
    }


if __name__ == "__main__":  # one row, JSON in argv, JSON on stdout
    print(json.dumps(worker(json.loads(sys.argv[1]))))
