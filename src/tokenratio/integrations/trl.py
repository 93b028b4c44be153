"""TBPO (and every loss of the registry) for people who train with TRL's DPOTrainer.

    from tokenratio.integrations.trl import TBPOConfig, TBPOTrainer
    args = TBPOConfig(output_dir="out", tokenratio_loss="tbpo-a", beta=0.1)
    trainer = TBPOTrainer(model=model, ref_model=None, args=args, train_dataset=dataset,
                          processing_class=tokenizer)        # any DPOTrainer argument works
    trainer.train()

The extension point is the public `DPOTrainer.compute_loss` (TRL >= 1.0). TRL builds the batch
(2B rows, [chosen; rejected], right-padded, `completion_mask`); we run the (possibly DDP/FSDP-wrapped)
model on it, keep logits only from the first response position on (`logits_to_keep`), gather them
response-aligned, and hand per-token log-probs (and full-vocabulary KL or the TBPO-Q head's values)
to `LOSSES[tokenratio_loss]`. The reference is TRL's `ref_model`, or, for a PEFT model without one,
the same model with its adapter disabled. The TBPO-Q head is attached to the model as a submodule
before Accelerate prepares it, so DDP, FSDP and ZeRO see it; it gets its own optimizer parameter group
(AdamW-style lr `baseline_head_lr`) and is saved beside the model.
"""

import logging
import os
from dataclasses import dataclass, field

try:
    import trl
    from trl import DPOConfig, DPOTrainer
except ImportError as err:  # pragma: no cover - exercised by the missing-extra test
    raise ImportError(
        "tokenratio.integrations.trl needs TRL: pip install 'tokenratio[trl]' (trl>=1.0,<2)"
    ) from err

import torch

from tokenratio.baseline import StateBaselineHead
from tokenratio.batch import PreferenceBatch
from tokenratio.fused_head import TILE_ELEMENTS
from tokenratio.logprobs import IGNORE_INDEX
from tokenratio.losses import LOSSES, reduce
from tokenratio.modeling import has_accelerator, head_rows, unwrap_peft
from tokenratio.precision import warn_if_slow_bf16
from tokenratio.scoring import score_pairs

HEAD_ATTRIBUTE = "tbpo_baseline_head"
logger = logging.getLogger("tokenratio")

if not hasattr(DPOTrainer, "compute_loss"):  # feature detection, not a version check
    raise ImportError(f"TRL {trl.__version__} has no DPOTrainer.compute_loss to extend")


@dataclass
class TBPOConfig(DPOConfig):
    """DPOConfig plus the tokenratio loss. `beta` is DPOConfig's own."""

    tokenratio_loss: str = field(default="tbpo-a", metadata={"help": "a name in tokenratio LOSSES"})
    tokenratio_loss_options: dict | None = field(
        default=None, metadata={"help": "keyword options of the loss, e.g. {'kl_estimator': 'k3'}"}
    )
    baseline_head_width: int = field(default=1024, metadata={"help": "TBPO-Q head width"})
    baseline_head_lr: float = field(default=1e-3, metadata={"help": "TBPO-Q head lr (authors)"})
    logprob_chunk_elements: int = field(default=1 << 22, metadata={"help": "kernel chunk size"})
    fused_head: bool = field(
        default=True,
        metadata={"help": "per-token values from hidden states and the head in row tiles"},
    )
    head_tile_elements: int = field(
        default=TILE_ELEMENTS,
        metadata={
            "help": "rows x vocabulary per tile of the fused head (train.head_tile_elements)"
        },
    )

    pair_weight_field: str = field(
        default="weight",
        metadata={"help": "a dataset column of per-pair loss weights (>= 0; absent: 1)"},
    )

    def __post_init__(self):
        # No accelerator: run on the CPU in float32 unless the user chose otherwise. TRL's default
        # bf16=True would stop a CPU user with "Your setup doesn't support bf16/gpu".
        if self.bf16 is None and not self.fp16 and not has_accelerator():
            self.bf16, self.use_cpu = False, True
        if self.use_cpu or not has_accelerator():  # DeepSpeed, where installed, would warn
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        super().__post_init__()


class PairWeightCollator:
    """TRL's collator, with each example's loss weight (`field`, 1 where absent) taken out first
    and returned as a (B,) "pair_weights" tensor; an invalid weight stops with its value named."""

    def __init__(self, inner, field: str):
        self.inner, self.field = inner, field

    def __call__(self, examples: list[dict]) -> dict:
        from tokenratio.formats import pair_weight

        found = [e.get(self.field) for e in examples]
        output = self.inner([{k: v for k, v in e.items() if k != self.field} for e in examples])
        if any(value is not None for value in found):
            weights = [pair_weight(value, self.field) for value in found]
            output["pair_weights"] = torch.tensor(weights, dtype=torch.float32)
        return output


def response_layout(input_ids, completion_mask):
    """Response-aligned positions and labels from TRL's right-padded rows.

    Returns:
        positions (N, T): index of the logits predicting completion token j; labels (N, T).
    """
    lengths = completion_mask.sum(1)  # (N,)
    starts = completion_mask.float().argmax(
        1
    )  # first completion token (completions are contiguous)
    T = max(1, int(lengths.max()))
    offsets = torch.arange(T, device=input_ids.device)[None]  # (1, T)
    valid = offsets < lengths[:, None]
    token_index = (starts[:, None] + offsets).clamp(max=input_ids.shape[1] - 1)
    labels = torch.where(valid, input_ids.gather(1, token_index), IGNORE_INDEX)
    positions = torch.where(valid, token_index - 1, torch.zeros_like(token_index))
    return positions, labels


class TBPOTrainer(DPOTrainer):
    """DPOTrainer whose loss is any tokenratio registry loss (default TBPO-A)."""

    def __init__(self, *args, **kwargs):
        config = kwargs["args"] if "args" in kwargs else (args[2] if len(args) > 2 else None)
        needs = None
        if config is not None:
            loss = LOSSES[config.tokenratio_loss]  # unknown names fail here, listing valid ones
            needs = loss.needs(config.tokenratio_loss_options)
        if needs is not None and needs.weights:
            raise ValueError(
                f"'{config.tokenratio_loss}' needs per-token weights, which TRL's batches do not "
                "carry; train it with `tokenratio tisdpo` instead"
            )
        if needs is not None and needs.baseline:
            # The head runs after the model's (DDP-wrapped) forward; DDP's unused-parameter search
            # would mark its parameters ready at the end of forward and again in backward. It gets
            # a gradient every step, so the search is not needed.
            if config.ddp_find_unused_parameters:
                raise ValueError(
                    "tbpo-q needs ddp_find_unused_parameters=False (the head is "
                    "applied outside the model's forward and always used)"
                )
            config.ddp_find_unused_parameters = False
        super().__init__(*args, **kwargs)
        config = self.args
        on_cpu = self.accelerator.device.type == "cpu"
        warn_if_slow_bf16(next(self.model.parameters()).dtype, on_cpu, logger.warning)
        self.data_collator = PairWeightCollator(self.data_collator, config.pair_weight_field)
        self._loss = LOSSES[config.tokenratio_loss]
        self._loss_options = dict(config.tokenratio_loss_options or {})
        self._needs = self._loss.needs(self._loss_options)
        if self._needs.baseline and not hasattr(self.model, HEAD_ATTRIBUTE):
            hidden = unwrap_peft(self.model).config.hidden_size
            head = StateBaselineHead(hidden, config.baseline_head_width)
            setattr(self.model, HEAD_ATTRIBUTE, head.to(next(self.model.parameters()).device))

    def _set_signature_columns_if_needed(self):
        """TRL keeps only the columns its collator reads; the pair weights ride along."""
        super()._set_signature_columns_if_needed()
        if self.args.pair_weight_field not in self._signature_columns:
            self._signature_columns.append(self.args.pair_weight_field)

    def _head(self, model):
        return getattr(self.accelerator.unwrap_model(model), HEAD_ATTRIBUTE, None)

    def create_optimizer(self, *args, **kwargs):
        """The Trainer's optimizer, with the TBPO-Q head moved into its own group (lr, no decay)."""
        head = getattr(self.model, HEAD_ATTRIBUTE, None)
        optimizer = super().create_optimizer(*args, **kwargs)
        if head is not None:
            head_ids = {id(p) for p in head.parameters()}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in head_ids]
            optimizer.add_param_group(
                {
                    "params": list(head.parameters()),
                    "lr": self.args.baseline_head_lr,
                    "weight_decay": 0.0,
                }
            )
        return optimizer

    def _response_logits(self, model, batch: PreferenceBatch, hidden: bool = False):
        """Response-aligned logits (and final hidden states) through the model's own forward
        (so DDP/FSDP wrappers see the call), keeping logits only from the first response on.
        With `fused_head`: `HeadRows` of the final hidden states instead of logits, the model
        asked for one position's logits only (fused_head.py)."""
        if self.args.fused_head:
            return self._response_rows(model, batch)
        positions = batch.positions
        first = int(positions[positions > 0].min()) if (positions > 0).any() else 0
        keep = batch.input_ids.shape[1] - first
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
            logits_to_keep=keep,
            output_hidden_states=hidden,
        )
        index = (positions - first).clamp(min=0)
        logits = out.logits.gather(1, index[..., None].expand(-1, -1, out.logits.shape[-1]))
        states = None
        if hidden:
            last = out.hidden_states[-1]
            states = last.gather(1, positions[..., None].expand(-1, -1, last.shape[-1]))
        return logits, states

    def _response_rows(self, model, batch: PreferenceBatch):
        """(HeadRows, final hidden states (N, T, H)) from the decoder's output, captured by a
        hook during the model's own forward (which then builds the logits of one position)."""
        inner = unwrap_peft(self.accelerator.unwrap_model(model))
        captured = []

        def keep(_module, _args, output):
            captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state)

        handle = inner.base_model.register_forward_hook(keep)
        try:
            model(
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                use_cache=False,
                logits_to_keep=1,
            )
        finally:
            handle.remove()
        last = captured[-1]
        positions = batch.positions
        states = last.gather(1, positions[..., None].expand(-1, -1, last.shape[-1]))
        return head_rows(inner, states, batch, self.args.head_tile_elements), states

    def _policy_forward(self, model):
        def forward(batch, with_baseline):
            logits, hidden = self._response_logits(model, batch, with_baseline)
            return logits, self._head(model)(hidden) if with_baseline else None

        return forward

    def _reference_forward(self, model):
        def forward(batch):
            if self.ref_model is not None:
                return self._response_logits(self.ref_model, batch)[0]
            unwrapped = self.accelerator.unwrap_model(model)
            if not hasattr(unwrapped, "disable_adapter"):
                raise ValueError("TBPOTrainer needs a ref_model unless the model is a PEFT model")
            with unwrapped.disable_adapter():  # the reference: same weights, adapter off
                return self._response_logits(model, batch)[0]

        return forward

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        positions, labels = response_layout(inputs["input_ids"], inputs["completion_mask"])
        batch = PreferenceBatch(inputs["input_ids"], inputs["attention_mask"], positions, labels)
        token_logps = score_pairs(
            self._policy_forward(model),
            self._reference_forward(model),
            batch,
            self._needs,
            chunk_elements=self.args.logprob_chunk_elements,
        )
        losses, metrics = self._loss(token_logps, beta=self.beta, **self._loss_options)
        loss = reduce(losses, weights=inputs.get("pair_weights"))
        self._record(metrics)
        return (loss, {"losses": losses}) if return_outputs else loss

    def _record(self, metrics: dict) -> None:
        store = getattr(self, "_metrics", None)
        if store is None:
            return
        mode = "train" if self.model.training else "eval"
        for key, value in metrics.items():
            gathered = self.accelerator.gather_for_metrics(value.detach().float())
            store[mode][key.replace("reward_", "rewards/")].append(gathered.mean().item())

    def save_model(self, output_dir=None, _internal_call=False):
        super().save_model(output_dir, _internal_call)
        head = getattr(self.model, HEAD_ATTRIBUTE, None)
        if head is not None and self.accelerator.is_main_process:
            head.save_pretrained(output_dir or self.args.output_dir)
