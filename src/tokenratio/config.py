"""Frozen dataclass configs for `tokenratio train`, loaded from TOML with dotted command-line overrides.

    [model]  name_or_path, dtype, attn_implementation, gguf_file, lora_*, gradient_checkpointing
    [data]   path, format, split, max_length, max_prompt_length, on_invalid, heldout_fraction
    [loss]   name, beta, options (a table passed to LOSSES[name])
    [train]  optimizer, lr, schedule, epochs/max_steps, batch sizes, clipping, checkpoints, logging
    [tisdpo] contrastive models and weight bounds (`tokenratio tisdpo` only)

Overrides look like `--set train.lr=1e-6` or `loss.options.kl_estimator=k3`; a value must parse as
the default's type (TOML syntax: strings may be bare), and unknown keys are errors with a suggestion.
Defaults cite docs/method.md §4 (the paper's training recipe) where the paper sets them.
"""

import difflib
import math
import tomllib
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message says where and why."""


@dataclass(frozen=True)
class ModelConfig:
    name_or_path: str = ""  # required: hub id or local directory
    dtype: str = "float32"  # float32 | bfloat16 | float16: weights as loaded
    attn_implementation: str | None = None  # e.g. sdpa, eager, flash_attention_2
    gguf_file: str | None = None  # load a GGUF checkpoint inside name_or_path (dequantised)
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora_r: int = 0  # 0: full fine-tuning with a separate frozen reference copy
    lora_alpha: int = 64  # paper: r=32, alpha=64, dropout 0.05 on attention and MLP projections
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )  # fmt: skip
    # Adapt only the last N transformer layers (0: all). Nothing below them needs a gradient, so the
    # backward pass stops there: the cheapest lever for LoRA on a CPU.
    lora_last_layers: int = 0
    head_width: int = 1024  # TBPO-Q baseline head: Linear(H, 1024) -> GELU -> Linear(1024, 1)


@dataclass(frozen=True)
class DataConfig:
    path: str = ""  # required: hub name, local directory, or .json/.jsonl(.gz)/.parquet file(s)
    format: str = "auto"  # auto | hh | trl | ultrafeedback | tldr
    split: str = "train"
    heldout_path: str | None = None  # a separate held-out set; else heldout_fraction of path
    heldout_fraction: float = 0.05
    max_length: int = 512  # prompt + response tokens (paper: 2048)
    max_prompt_length: int = 256  # prompts longer than this keep their last tokens
    on_invalid: str = "error"  # error | skip: bad records stop the run, or are counted and skipped
    # HH dialogues through the tokenizer's chat template (what an Instruct model was tuned on);
    # unset: yes when the tokenizer has one. The data report says which was used.
    chat_template: bool | None = None
    limit: int | None = None  # use only the first N records (smoke runs)
    swap_preferences: bool = False  # train on flipped labels (TIS-DPO's negative contrast model)
    # A per-pair loss weight read from this field of each record where the data has it (absent:
    # 1): weight 0 drops the pair, 2 counts it twice; a negative or non-finite one is invalid.
    pair_weight_field: str = "weight"


@dataclass(frozen=True)
class LossConfig:
    name: str = "tbpo-a"
    beta: float = 0.1  # paper: 0.1
    options: dict = field(default_factory=dict)  # keyword options of LOSSES[name]


@dataclass(frozen=True)
class TrainConfig:
    output_dir: str = "runs/tokenratio"
    seed: int = 0
    optimizer: str = "rmsprop"  # rmsprop (paper) | adamw
    lr: float = 5e-7  # paper: RMSprop 5e-7
    head_lr: float = 1e-3  # TBPO-Q head, its own AdamW (authors' code)
    weight_decay: float = 0.0
    schedule: str = "cosine"  # cosine | constant (both with linear warm-up)
    warmup_ratio: float = 0.05  # paper: 5%
    epochs: int = 1  # paper: 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 4  # pairs per process per micro-batch
    grad_accumulation: int = 1
    max_grad_norm: float = 10.0  # paper: 10
    # Micro-batches of pairs of similar length (shuffled in windows of 50 batches, sorted inside
    # each): far less padding where lengths vary (HH), the same pairs per epoch.
    group_by_length: bool = True
    # One row per pair, prompt + chosen + rejected (batch.collate_shared): the prompt is computed
    # once for both responses, with the same logits (docs/method.md, "Prefix sharing").
    prefix_sharing: bool = True
    # Losses that read the reference through its log-probs of the response tokens (dpo, ipo,
    # bpo, tbpo-q, tisdpo) or through k3 samples (tbpo-a with kl_estimator = "k3"): score them
    # once, keep them beside the data (reference/cache.py) and never run the reference while
    # training. Exact-KL losses (tbpo-a's default, tdpo1/2) run it every step.
    ref_cache: bool = True
    # TBPO-A's cached k3: tokens a ~ pi_ref drawn per response position (epoch e uses sample
    # e mod k3_samples).
    k3_samples: int = 1
    # LoRA on the last layers (model.lora_last_layers): the frozen layers below them computed
    # once per pair and kept (trunk.py), so a step runs only the adapted layers and the head.
    trunk_cache: bool = False
    # final/ with LoRA merged into a full copy (and the adapter in final/adapter/); false: the
    # adapter alone (a few MB), which from_pretrained loads onto the base model it names.
    save_merged: bool = True
    # Per-token values from the final hidden states and the LM head in row tiles (fused_head.py):
    # no (tokens x vocabulary) logits tensor, for the policy or the reference. false: the head's
    # full logits, then chunked log-probs (the measured alternative, docs/perf.md).
    fused_head: bool = True
    # Rows x vocabulary per tile of the fused head (float32: 1 << 23 is 32 MiB; 65 rows at
    # Llama-3's 128,256 tokens, 1,024 at 8k): its largest temporary, at most three alive.
    head_tile_elements: int = 1 << 23
    compile: bool = False  # torch.compile the policy's forward (measured: `tokenratio perf`)
    # auto | no | bf16 | fp16 (Accelerate autocast). auto: bf16 where the hardware multiplies it
    # natively (a recent GPU, a CPU with AVX512-BF16 or AMX), else fp32 (precision.py).
    mixed_precision: str = "auto"
    eval_every: int = 0  # optimizer steps between held-out evaluations (0: only at the end)
    eval_batch_size: int = 8
    save_every: int = 0  # optimizer steps between checkpoints (0: only the final model)
    keep_checkpoints: int = 2
    log_every: int = 1
    report_to: tuple[str, ...] = ()  # tensorboard and/or wandb
    logprob_chunk_elements: int = 1 << 22  # rows x vocab per chunk in log-prob / KL kernels
    cpu: bool = False  # force CPU even where a GPU is present (CPU is chosen when there is none)


@dataclass(frozen=True)
class TisdpoConfig:
    """`tokenratio tisdpo` only: TIS-DPO's contrastive models and weight transform (tisdpo.py)."""

    positive_model: str | None = None  # trained with DPO on the data; None: trained first
    negative_model: str | None = (
        None  # trained with DPO on flipped preferences; None: trained first
    )
    # w = scale * exp(mu * clamp(log pi+ - log pi-, lower, upper)), mu = +1 chosen, -1 rejected
    # (TIS-DPO's weight estimate; these defaults are ours, not the paper's).
    lower: float = -1.0
    upper: float = 1.0
    scale: float = 1.0
    score_batch_size: int = 8


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tisdpo: TisdpoConfig = field(default_factory=TisdpoConfig)


CHOICES = {
    ("model", "dtype"): ("float32", "bfloat16", "float16"),
    ("data", "format"): ("auto", "hh", "trl", "ultrafeedback", "tldr"),
    ("data", "on_invalid"): ("error", "skip"),
    ("train", "optimizer"): ("rmsprop", "adamw"),
    ("train", "schedule"): ("cosine", "constant"),
    ("train", "mixed_precision"): ("auto", "no", "bf16", "fp16"),
}

# What each number may be: (lowest, highest, whether the lowest itself is allowed); floats must
# also be finite. A beta <= 0 trains backwards, a count of 0 trains nothing or divides by it.
AT_LEAST_1 = (1, None, True)
RANGES = {
    ("loss", "beta"): (0, None, False),
    ("train", "lr"): (0, None, False),
    ("train", "head_lr"): (0, None, False),
    ("train", "weight_decay"): (0, None, True),
    ("train", "warmup_ratio"): (0, 1, True),
    ("train", "max_grad_norm"): (0, None, True),  # 0: no clipping
    ("train", "epochs"): AT_LEAST_1,
    ("train", "max_steps"): AT_LEAST_1,
    ("train", "batch_size"): AT_LEAST_1,
    ("train", "grad_accumulation"): AT_LEAST_1,
    ("train", "eval_batch_size"): AT_LEAST_1,
    ("train", "eval_every"): (0, None, True),
    ("train", "save_every"): (0, None, True),
    ("train", "keep_checkpoints"): AT_LEAST_1,
    ("train", "log_every"): AT_LEAST_1,
    ("train", "k3_samples"): AT_LEAST_1,
    ("train", "head_tile_elements"): AT_LEAST_1,
    ("train", "logprob_chunk_elements"): AT_LEAST_1,
    ("data", "max_length"): (2, None, True),
    ("data", "max_prompt_length"): AT_LEAST_1,
    ("data", "heldout_fraction"): (0, 1, False),
    ("data", "limit"): AT_LEAST_1,
    ("model", "lora_r"): (0, None, True),
    ("model", "lora_alpha"): (0, None, False),
    ("model", "lora_dropout"): (0, 1, True),
    ("model", "lora_last_layers"): (0, None, True),
    ("model", "head_width"): AT_LEAST_1,
    ("tisdpo", "score_batch_size"): AT_LEAST_1,
}
# Limits checked before a config is parsed: Python's TOML parser is quadratic in a dotted key's
# parts and recursive in nesting, so a hostile file could take minutes and gigabytes.
MAX_CONFIG_BYTES = 1 << 20
MAX_KEY_PARTS = 64
MAX_NESTING = 32


def shown(value, limit: int = 80) -> str:
    """A value as an error message shows it: its repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _check_range(where: str, value, allowed: tuple) -> None:
    """`value` (of the key `where`) within `allowed`, a RANGES entry, or ConfigError."""
    lowest, highest, inclusive = allowed
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} = {shown(value)}: must be a finite number")
    low_ok = value >= lowest if inclusive else value > lowest
    if not low_ok or (highest is not None and value > highest):
        low = f">= {lowest}" if inclusive else f"> {lowest}"
        allowed = f"{low} and <= {highest}" if highest is not None else low
        raise ConfigError(f"{where} = {shown(value)}: must be {allowed}")


# Names users bring from transformers/TRL, for suggestions (typos of them too: learnig_rate -> lr).
ALIASES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accumulation",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "schedule",
    "optim": "optimizer",
    "model_name_or_path": "name_or_path",
    "model_name": "name_or_path",
    "loss_type": "name",
    "per_device_eval_batch_size": "eval_batch_size",
    "logging_steps": "log_every",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "torch_dtype": "dtype",
    "max_len": "max_length",
}


def _suggest(key: str, valid) -> str:
    names = {name: name for name in valid}
    names.update({alias: real for alias, real in ALIASES.items() if real in valid})
    close = difflib.get_close_matches(key, list(names), n=1)
    return f" (did you mean '{names[close[0]]}'?)" if close else ""


def _check_type(where: str, value, annotation):
    """Coerce value to the annotation (int -> float, list -> tuple) or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(where, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is tuple or annotation is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {shown(value)}")
        return tuple(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is dict and isinstance(value, dict):
        return dict(value)
    if annotation in (str, int, float, bool) and type(value) is annotation:
        return value
    expected = "bool (true or false)" if annotation is bool else annotation.__name__
    raise ConfigError(f"{where}: expected {expected}, got {shown(value)}")


def build_section(cls, table: dict, where: str):
    hints = typing.get_type_hints(cls)
    valid = {f.name for f in fields(cls)}
    values = {}
    for key, value in table.items():
        if key not in valid:
            raise ConfigError(f"unknown key '{where}{key}'{_suggest(key, valid)}")
        hint = hints[key]
        if is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"[{where}{key}] must be a table")
            values[key] = build_section(hint, value, f"{where}{key}.")
        else:
            values[key] = _check_type(f"{where}{key}", value, hint)
            section = (where.rstrip("."), key)
            choices = CHOICES.get(section)
            if choices and values[key] not in choices:
                raise ConfigError(f"{where}{key} = {shown(value)}: choose one of {list(choices)}")
            if section in RANGES:
                _check_range(f"{where}{key}", values[key], RANGES[section])
    return cls(**values)


def parse_override(text: str) -> tuple[list[str], object]:
    """ "section.key=value" -> (["section", "key"], value), the value on methods.py's rules."""
    from tokenratio.methods import parse_assignment

    try:
        key, value = parse_assignment(text, "override", "section.key=value")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    return key.split("."), value


def set_dotted(table: dict, path: list[str], value) -> None:
    for part in path[:-1]:
        table = table.setdefault(part, {})
    table[path[-1]] = value


def shipped_configs() -> list[Path]:
    """The configs inside the installed package (the repository's configs/ links to them)."""
    return sorted((Path(__file__).parent / "configs").glob("*.toml"))


def resolve_config_path(path: str | Path) -> Path:
    """`path` if it exists, else the shipped config of that file name (`configs/X.toml` and
    `X.toml` work from any directory once tokenratio is installed)."""
    path = Path(path)
    if path.exists():
        return path
    shipped = {p.name: p for p in shipped_configs()}
    return shipped.get(path.name, shipped.get(path.name + ".toml", path))


def read_table(path: str | Path | None, overrides: list[str] = ()) -> dict:
    """A TOML file as a table (empty without a file), with `section.key=value` overrides applied."""
    table: dict = {}
    if path is not None:
        path = resolve_config_path(path)
        try:
            table = tomllib.loads(_checked_text(path))
        except FileNotFoundError:
            shipped = ", ".join(p.name for p in shipped_configs())
            raise ConfigError(
                f"config file {path} does not exist (shipped with tokenratio: {shipped})"
            ) from None
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{path}: invalid TOML: {err}") from None
    for text in overrides:
        if len(text) > MAX_CONFIG_BYTES or text.split("=", 1)[0].count(".") >= MAX_KEY_PARTS:
            raise ConfigError(f"override {shown(text)}: too long, or a key of over 64 parts")
        set_dotted(table, *parse_override(text))
    return table


def _checked_text(path: Path) -> str:
    """The file's text, refused before parsing when it is over 1 MB, not UTF-8, has a key of
    over 64 parts or nests tables or arrays over 32 deep (MAX_* above: why)."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size:,} bytes; a config is at most 1 MB")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}, line {line}: not UTF-8 (byte {err.start}); save it as UTF-8"
        ) from None
    depth = deepest = 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("#"):
            continue
        key = line.split("=", 1)[0] if "=" in line else line
        if key.count(".") >= MAX_KEY_PARTS:
            raise ConfigError(f"{path}, line {number}: a key of over {MAX_KEY_PARTS} parts")
        for char in line:  # brackets inside strings count too: a config never needs 32
            depth += (char in "[{") - (char in "]}")
            deepest = max(deepest, depth)
        if deepest > MAX_NESTING:
            raise ConfigError(f"{path}, line {number}: tables or arrays nested over 32 deep")
    return text


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a TOML file (or start from defaults), apply `section.key=value` overrides, validate."""
    return build_config(read_table(path, overrides))


def build_config(table: dict) -> Config:
    """A Config from a TOML-shaped table, validated, with its required keys checked."""
    config = build_section(Config, table, "")
    for section, key in (("model", "name_or_path"), ("data", "path")):
        if not getattr(getattr(config, section), key):
            raise ConfigError(
                f"{section}.{key} is required (set it in the file or with "
                f"--set {section}.{key}=...)"
            )
    return config


def with_overrides(config: Config, **sections) -> Config:
    """Programmatic replace: with_overrides(cfg, train={"lr": 1e-3})."""
    return replace(config, **{k: replace(getattr(config, k), **v) for k, v in sections.items()})
