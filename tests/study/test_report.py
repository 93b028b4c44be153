"""The study report's statistics against hand-derived values, and its verdict's wording."""

import math

import pytest

from tokenratio.study.report import interval, summarise, verdict


def test_interval_is_student_t_over_seeds_and_the_pair_error_for_one_seed():
    two = interval([(0.60, 0.04), (0.62, 0.04)])
    # stdev of (0.60, 0.62) = 0.02 / sqrt(2); t(0.975, 1) = 12.706; / sqrt(2) again
    assert two["mean"] == pytest.approx(0.61)
    assert two["half_width"] == pytest.approx(12.706 * 0.01)
    assert two["n"] == 2
    one = interval([(0.55, 0.05)])
    assert (one["mean"], one["half_width"], one["n"]) == (0.55, pytest.approx(0.098), 1)
    assert interval([(math.nan, 0.1)])["n"] == 0


def results(*accuracies):
    return [{"pref_accuracy": [a, 0.04]} for a in accuracies]


def test_verdict_says_plainly_whether_the_check_method_trained_and_why_not():
    tested = {"reference": results(0.5), "dpo": results(0.70, 0.71), "tbpo-a": results(0.5, 0.6)}
    rows = summarise(tested)
    assert verdict(rows, "dpo", tested).startswith("The recipe trains: dpo's test accuracy 0.705")
    tested["dpo"] = results(0.58, 0.64)
    text = verdict(summarise(tested), "dpo", tested)
    assert text.startswith("The recipe did NOT measurably train")
    assert "12.7 times" in text and "0.580 ± 0.078, 0.640 ± 0.078" in text
    assert "not in this study" in verdict(rows, "ipo", tested)


def test_a_one_seed_summary_says_its_interval_is_over_the_pairs():
    from tokenratio.study.report import _cell_meaning

    assert "over the test pairs" in _cell_meaning(1) and "Student" not in _cell_meaning(1)
    assert "over seeds (Student t)" in _cell_meaning(3)
