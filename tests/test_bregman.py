"""The Bregman generators against the definition l(R) = h'(R) R - h(R) - h'(1/R) with h written out
by hand for each (docs/method.md §2), differentiated by autograd; and their documented limits."""

import math

import pytest
import torch
from torch.testing import assert_close

from tokenratio.bregman import bregman_generator

# Convex h for each generator (up to terms that cancel in l): the docs/method.md §2 table follows.
H = {
    "lr": lambda r: r * torch.log(r) - (1 + r) * torch.log(1 + r),
    "kliep": lambda r: r * torch.log(r) - r,
    "lsif": lambda r: (r - 1) ** 2 / 2,
}
# With these h the definition gives 2 log(1 + R) for LR (h'(r) = log(r / (1 + r)), so
# l = R log(R/(1+R)) - h(R) - log(1/(1+R)) = 2 log(1 + R)), R + log R for KLIEP and
# (R^2 - 2/R)/2 + const for LSIF: the table's entries are these times SCALE.
SCALE = {"lr": 0.5, "kliep": 1.0, "lsif": 2.0}


def from_definition(h, log_r: torch.Tensor) -> torch.Tensor:
    r = log_r.exp().requires_grad_()
    inv = (-log_r).exp().requires_grad_()
    (dh_r,) = torch.autograd.grad(h(r).sum(), r)
    (dh_inv,) = torch.autograd.grad(h(inv).sum(), inv)
    return dh_r * r - h(r) - dh_inv


@pytest.mark.parametrize("name", sorted(H))
def test_generators_match_the_bregman_definition(name):
    log_r = torch.linspace(-3, 3, 13, dtype=torch.float64)
    expected = SCALE[name] * from_definition(H[name], log_r)
    ours = bregman_generator(name, None, None)(log_r)
    # l is defined up to a constant (h's affine part): compare after removing the value at R = 1.
    assert_close(ours - ours[6], expected - expected[6])


def test_ba_at_lam_one_is_lsif_and_sba_tends_to_its_lam_zero_limit():
    log_r = torch.linspace(-2, 2, 9, dtype=torch.float64)
    assert_close(
        bregman_generator("ba", 1.0, None)(log_r), bregman_generator("lsif", None, None)(log_r)
    )
    near = bregman_generator("sba", 1e-7, 4.0)(log_r)
    limit = bregman_generator("sba", 0.0, 4.0)(log_r)  # (R + log R)/4
    shift = near[4] - limit[4]  # the lam -> 0 form drops a constant
    assert_close(near - shift, limit, atol=1e-5, rtol=0)
    assert_close(limit, (log_r.exp() + log_r) / 4)


def test_sba_gradient_equals_dpo_at_r_equal_one():
    """s = 4 makes SBA's gradient in log R equal DPO's (LR's) at R = 1: both 1/2."""
    log_r = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    (sba,) = torch.autograd.grad(bregman_generator("sba", 0.0, 4.0)(log_r).sum(), log_r)
    (lr,) = torch.autograd.grad(bregman_generator("lr", None, None)(log_r).sum(), log_r)
    assert_close(sba, lr)
    assert math.isclose(float(lr), 0.5)
