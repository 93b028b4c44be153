"""TBPO-Q's state-baseline head: shapes, a detached input, and a save/load round trip."""

import pytest
import torch

from tokenratio.baseline import StateBaselineHead


def test_head_maps_hidden_states_to_scalars_without_gradient_into_them():
    head = StateBaselineHead(hidden_size=8, width=16)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    values = head(hidden)  # (2, 5)
    assert values.shape == (2, 5)
    values.sum().backward()
    assert hidden.grad is None  # the baseline must not shape the policy's features
    assert all(p.grad is not None for p in head.parameters())


def test_save_and_load_round_trip(tmp_path):
    head = StateBaselineHead(hidden_size=8, width=16)
    head.save_pretrained(tmp_path)
    loaded = StateBaselineHead.from_pretrained(tmp_path)
    x = torch.randn(3, 8)
    torch.testing.assert_close(loaded(x), head(x))
    with pytest.raises(FileNotFoundError, match="no TBPO-Q baseline head"):
        StateBaselineHead.from_pretrained(tmp_path / "elsewhere")
