"""tests/closeness.py: the derived bounds pass rounding and catch a real difference, by name."""

import pytest
import torch

from closeness import U, assert_moved_alike, assert_sums_close, gamma


def test_gamma_is_highams_bound():
    assert gamma(1) == pytest.approx(U) and gamma(1000) == pytest.approx(1000 * U, rel=1e-4)


def _weights():
    generator = torch.Generator().manual_seed(0)
    start = {"w": torch.randn(64, 32, generator=generator) * 0.02}
    step = torch.randn(64, 32, generator=generator).sign() * 1e-3
    return start, {"w": start["w"] + step}


def test_the_same_sums_in_another_order_pass():
    start, moved = _weights()
    # the displacement summed as 4 quarters instead of at once: float32 rounding only
    quarter = (moved["w"] - start["w"]) / 4
    other = start["w"] + quarter + quarter + quarter + quarter
    assert_moved_alike({"w": other}, moved, start, terms=4)


def test_a_step_in_another_direction_fails_naming_the_tensor_and_where():
    start, moved = _weights()
    wrong = moved["w"].clone()
    wrong[3, 5] += 1e-3  # one micro-batch's step taken twice, on one element
    with pytest.raises(AssertionError, match=r"w: .*largest difference 1\.000e-03 at \(3, 5\)"):
        assert_moved_alike({"w": wrong}, moved, start, terms=3072)


def test_values_within_the_bound_pass_and_beyond_it_fail():
    expected = torch.tensor([0.5, -2.0, 7.0])
    assert_sums_close(expected + 7.0 * 2 * gamma(10) * 0.9, expected, terms=10)
    with pytest.raises(AssertionError, match=r"losses: bound .* at \(2,\)"):
        assert_sums_close(expected + torch.tensor([0, 0, 1e-3]), expected, 10, "losses")
