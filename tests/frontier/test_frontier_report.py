"""The report leads with TBPO's verdicts at matched KL, a loss said first."""

from tokenratio.frontier.config import FrontierConfig
from tokenratio.frontier.report import _finite, lead


def _comparison(method, verdict, diff):
    return {"method": method, "baseline": "dpo", "metric": "reward_at_matched_kl", "diff": diff,
            "low": diff - 0.05, "high": diff + 0.05, "verdict": verdict, "detectable": 0.07,
            "kl_range": (0.0, 2.0)}  # fmt: skip


def test_no_tbpo_win_is_said_first_and_each_verdict_has_its_interval():
    frontier = FrontierConfig(methods=("dpo", "tbpo-q", "tbpo-a", "tdpo1"))
    found = [
        _comparison("tbpo-q", "no difference this study can detect", 0.01),
        _comparison("tbpo-a", "worse", -0.08),
        _comparison("tdpo1", "better", 0.09),
    ]
    lines = lead(frontier, found, gain=0.2)
    assert lines[0].startswith("**TBPO does not beat dpo here**")
    assert "tbpo-a vs dpo" in lines[2] and "**worse**" in lines[2] and "-0.080" in lines[2]
    assert "half-width 25% of the baseline's gain" in lines[2]
    found[0] = _comparison("tbpo-q", "better", 0.09)
    assert not lead(frontier, found, gain=0.2)[0].startswith("**TBPO does not")


def test_report_json_is_strict_json():
    assert _finite({"a": [float("nan"), 1.0], "b": float("inf")}) == {"a": [None, 1.0], "b": None}
