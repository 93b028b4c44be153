"""Frontiers at matched KL (frontier/analysis.py) on constructed frontiers whose answer is known."""

import numpy as np
import pytest

from tokenratio.frontier.analysis import (
    Points,
    bootstrap_comparison,
    compare_at_matched_kl,
    envelope,
)


def test_the_envelope_keeps_the_best_reward_reached_at_a_kl_no_larger():
    kl, reward = np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 1.0, 0.5, 2.0])
    assert envelope(kl, reward, np.array([0.5, 1.5, 2.0, 2.5])) == pytest.approx(
        [0.5, 1.25, 1.5, 1.75]  # the dip at 2 is under the envelope: (1, 1) to (3, 2)
    )


def _points(offset: float, kls=(0.5, 1.0, 2.0, 4.0), prompts=200, seed=0, scale=1.0):
    """Per prompt, reward = log(1 + KL) + offset + that prompt's own noise."""
    rng = np.random.default_rng(seed)
    noise = rng.normal(0, 0.3, size=(len(kls), prompts))
    kl = np.array(kls)[:, None] * scale * (1 + 0.1 * rng.normal(size=(len(kls), prompts)))
    kl = np.abs(kl)
    reward = np.log1p(np.array(kls))[:, None] + offset + noise
    return Points(kl, reward)


def test_a_constant_gap_is_the_reward_at_matched_kl_and_the_area_is_gap_times_width():
    base = Points(np.array([[0.0], [1.0], [2.0]]), np.array([[0.0], [1.0], [1.5]]))
    better = Points(np.array([[0.5], [2.5]]), np.array([[0.6], [1.85]]))
    found = compare_at_matched_kl(better, base)
    assert found["kl_range"] == (0.5, 2.0)
    # base on [0.5, 2]: 0.5 .. 1 .. 1.5; better: 0.6 + 0.625 (kl - 0.5): the gap is 0.1 at 0.5,
    # 0.0125 at 1 (1.1125 - 1), ... integrate exactly with the trapezoid rule on 64 points
    grid = np.linspace(0.5, 2.0, 64)
    gap = (0.6 + 0.625 * (grid - 0.5)) - np.interp(grid, [0, 1, 2], [0, 1, 1.5])
    assert found["area_between"] == pytest.approx(np.trapezoid(gap, grid))
    assert found["reward_at_matched_kl"] == pytest.approx(np.trapezoid(gap, grid) / 1.5)


def test_a_method_above_by_a_known_margin_is_better_with_an_interval_around_it():
    base, better = _points(0.0, seed=1), _points(0.15, seed=2)
    entry = bootstrap_comparison(better, base, resamples=400)[0]
    assert entry["metric"] == "reward_at_matched_kl" and entry["verdict"] == "better"
    assert entry["low"] < 0.15 < entry["high"] and entry["low"] > 0
    assert 0 < entry["detectable"] < 0.15


def test_the_same_method_shows_no_difference_and_disjoint_ranges_are_not_comparable():
    base = _points(0.0, seed=1)
    same = bootstrap_comparison(base, base, resamples=200)[0]
    assert same["diff"] == 0 and same["verdict"] == "no difference this study can detect"
    far = _points(0.0, kls=(10.0, 20.0), seed=3)
    entry = bootstrap_comparison(far, base, resamples=50)[0]
    assert entry["verdict"].startswith("not comparable") and entry["kl_range"] is None


def test_a_diversitys_curve_joins_the_points_instead_of_taking_the_best():
    from tokenratio.frontier.analysis import interpolated

    kl, value = np.array([2.0, 0.0, 1.0]), np.array([0.2, 1.0, 0.6])
    assert np.allclose(interpolated(kl, value, np.array([0.5, 1.5])), [0.8, 0.4])
    assert np.allclose(envelope(kl, value, np.array([0.5, 1.5])), [1.0, 1.0])
