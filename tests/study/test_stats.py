"""The study's paired statistics (study/stats.py) against hand-derived values."""

import numpy as np
import pytest

from tokenratio.study import stats


def run(name, correct, records=None):
    records = list(range(len(correct))) if records is None else records
    return {"name": name, "per_pair": {"record": records, "correct": correct, "margin": correct}}


def test_mcnemar_is_the_binomial_test_of_the_discordant_pairs():
    # 8 pairs only the method gets right, none only the baseline: p = 2 * 0.5^8
    assert stats.mcnemar_exact([1] * 8 + [0] * 4, [0] * 8 + [0] * 4) == pytest.approx(2 / 256)
    # 3 against 1 discordant: p = 2 * P(X >= 3 | n=4) = 2 * 5/16
    assert stats.mcnemar_exact([1, 1, 1, 0, 1], [0, 0, 0, 1, 1]) == pytest.approx(10 / 16)
    assert stats.mcnemar_exact([1, 0], [1, 0]) == 1.0
    # against the reference (every pair a tie at 0.5): the sign test of the margins
    assert stats.mcnemar_exact([1] * 6, [0.5] * 6) == pytest.approx(2 / 64)


def test_two_level_bootstrap_matches_a_naive_loop():
    d = np.array([[1.0, 0.0, -1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    fast = stats.two_level_bootstrap(d, seed=3)
    rng = np.random.default_rng(3)
    naive = []
    for start in range(0, stats.RESAMPLES, 500):
        n = min(500, stats.RESAMPLES - start)
        seeds = rng.integers(0, 2, size=(n, 2))
        pairs = rng.integers(0, 4, size=(n, 2, 4))
        for k in range(n):
            naive.append(
                np.mean([[d[seeds[k, s], pairs[k, s, j]] for j in range(4)] for s in range(2)])
            )
    np.testing.assert_allclose(fast, naive)
    assert abs(fast.mean() - d.mean()) < 0.02


def test_probability_of_improvement_counts_seed_pairs_and_half_ties():
    mine = [run("a", [1, 1]), run("b", [1, 0])]  # accuracies 1.0, 0.5
    theirs = [run("c", [1, 0]), run("d", [0, 0])]  # 0.5, 0.0
    # (1 > .5) (1 > 0) (.5 = .5 -> half) (.5 > 0): 3.5 / 4
    assert stats.probability_of_improvement(mine, theirs) == pytest.approx(0.875)


def test_a_clear_win_is_better_and_identical_runs_show_no_difference():
    good = [run(f"m{s}", [1.0] * 90 + [0.0] * 10) for s in range(3)]
    base = [run(f"b{s}", [1.0] * 50 + [0.0] * 50) for s in range(3)]
    entry = stats.compare("m", "dpo", good, base)
    assert entry["diff"] == pytest.approx(0.4) and entry["verdict"] == "better"
    assert entry["low"] > 0 and entry["p_value"] < 0.01 and entry["prob_improvement"] == 1.0
    assert len(entry["mcnemar_p"]) == 3 and entry["seeds"] == 3 and entry["pairs"] == 100
    assert entry["outcomes"][0]["run"] == "m0" and entry["outcomes"][0]["baseline_run"] == "b0"
    same = stats.compare("b", "dpo", base, base)
    assert same["diff"] == 0 and same["low"] == same["high"] == 0
    assert same["verdict"] == "no difference detectable"
    assert stats.compare("b", "m", base, good)["verdict"] == "worse"
    assert "no difference this study can detect" in stats.sentence(same)


def test_detectable_difference_is_power_times_the_standard_error():
    rng = np.random.default_rng(0)
    runs_a = [run(f"a{s}", rng.integers(0, 2, 200).astype(float).tolist()) for s in range(3)]
    runs_b = [run(f"b{s}", rng.integers(0, 2, 200).astype(float).tolist()) for s in range(3)]
    entry = stats.compare("a", "b", runs_a, runs_b)
    # two independent coin flips per pair: sd of d is 1/sqrt(2), so SE ~ 0.707 / sqrt(600)
    assert entry["detectable"] == pytest.approx(2.80 * 0.707 / np.sqrt(600), rel=0.35)


def test_the_reference_stands_against_every_seed_and_pairs_must_match():
    reference = [run("reference", [0.5] * 4)]
    method = [run("m0", [1, 1, 0, 1]), run("m1", [1, 1, 1, 1])]
    d, outcomes = stats.paired_matrix(method, reference)
    assert d.shape == (2, 4) and [o["baseline_run"] for o in outcomes] == ["reference"] * 2
    with pytest.raises(ValueError, match="different pairs"):
        stats.paired_matrix([run("m", [1, 0], [0, 1])], [run("b", [1, 0], [0, 2])])


def test_comparisons_pair_each_method_with_dpo_and_the_reference():
    tested = {
        "reference": [run("reference", [0.5] * 3)],
        "dpo": [run("dpo0", [1, 0, 1])],
        "tbpo-q": [run("q0", [1, 1, 1])],
        "old": [{"name": "old0"}],  # evaluated before per-pair outcomes: left out
    }
    pairs = [(c["method"], c["baseline"]) for c in stats.comparisons(tested)]
    assert pairs == [("dpo", "reference"), ("tbpo-q", "dpo"), ("tbpo-q", "reference")]


def test_a_verdict_reads_as_a_paper_would_print_it():
    entry = {
        "method": "tbpo-q", "baseline": "dpo", "diff": 0.05, "low": 0.02, "high": 0.08,
        "p_value": 0.0, "prob_improvement": 1.0, "seeds": 1, "pairs": 199, "verdict": "better",
    }  # fmt: skip
    text = stats.sentence(entry)
    assert "p < 0.001" in text and "p = 0.000" not in text
    assert "1 seed x 199 pairs" in text and "1 seeds" not in text
    assert "p = 0.042" in stats.sentence({**entry, "p_value": 0.0421, "seeds": 3})
