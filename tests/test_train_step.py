"""`step.train_step` never waits for the device: no tensor value is read back to Python inside
a step (every metric and the non-finite flag stay on the device until log time), checked with a
patched tensor class and the profiler's event list, for both batch layouts and the losses whose
needs differ (reference, exact KL, baseline head)."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from tokenratio.batch import collate, collate_shared
from tokenratio.perf.models import build_model, synthetic_pairs, token_rows, word_tokenizer
from tokenratio.perf.worker import perf_config
from tokenratio.step import (
    NonFiniteStepError,
    check_finite,
    make_accelerator,
    prepare_step_parts,
    train_step,
)

# Python-level reads of a tensor's value: each one waits for the device on a GPU.
READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
# Operators whose output shape depends on the data: the host must wait for them too.
DATA_DEPENDENT = ("aten::nonzero", "aten::masked_select", "aten::unique", "aten::_unique2")


def step_and_batch(loss: str, layout):
    # AdamW, as the harness; the reference run in the step (the cache's path does less)
    cfg = perf_config(loss, {"model": "tiny", "device": "cpu"}, {"ref_cache": False})
    model = build_model("tiny")
    step = prepare_step_parts(cfg, make_accelerator(cfg), 10, model=model)
    tokenizer = word_tokenizer(model.config.vocab_size)
    pairs = synthetic_pairs(3, model.config.vocab_size, 9, 7)
    pairs[1]["rejected"] = pairs[1]["rejected"][:12]  # ragged: padding in the batch
    return step, layout(token_rows(tokenizer, pairs, False), 0)


@pytest.mark.parametrize("layout", [collate, collate_shared], ids=["plain", "shared"])
@pytest.mark.parametrize("loss", ["dpo", "tbpo-a", "tbpo-q"])
def test_train_step_reads_nothing_back_from_the_device(loss, layout, monkeypatch):
    step, batch = step_and_batch(loss, layout)
    train_step(step, [batch])  # warm: lazy optimizer state
    reads = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            reads.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = train_step(step, [batch, batch])  # with gradient accumulation
    monkeypatch.undo()
    assert reads == []
    assert not [e.name for e in prof.events() if e.name in DATA_DEPENDENT]
    assert isinstance(result.real_tokens, int) and result.pairs == 6
    assert result.real_tokens == 2 * batch.real_tokens
    assert result.finite.dtype == torch.bool and bool(result.finite)
    assert set(result.sums) >= {"loss"} and not set(result.sums) & {"pairs", "finite"}


def test_check_finite_names_the_first_bad_step():
    check_finite([])
    flags = [(7, torch.tensor(True)), (8, torch.tensor(False)), (9, torch.tensor(False))]
    with pytest.raises(NonFiniteStepError, match="first at step 8"):
        check_finite(flags)
