"""Paired comparisons of a study's methods (docs/training.md, "Reading a study").

Every method is compared with a baseline (DPO, and the reference) on the same test pairs: for seed
s, pair i, d_si = correct_method(s, i) - correct_baseline(s, i), where correct is 1 when the
implicit reward ranks the chosen response above the rejected one (0.5 on a tie). The reference,
having no seeds, is the same model for every seed. From the (seeds x pairs) matrix d:

- diff: the mean of d, the accuracy difference pooled over seeds;
- low, high: a 95% percentile interval from a two-level bootstrap that resamples seeds and, within
  them, test pairs (both sources of noise), `RESAMPLES` draws from a seeded generator;
- p_value: the bootstrap's two-sided p for "no difference" (twice the smaller tail at 0);
- mcnemar_p: per seed, the exact McNemar test on the discordant pairs (scipy.stats.binomtest;
  against the reference, whose pairs are all ties, the sign test of the margins);
- prob_improvement: over every (method seed, baseline seed), the chance that the method's test
  accuracy beats the baseline's (ties count half);
- detectable: the smallest difference this study detects with 80% power at the 5% level,
  (z_0.975 + z_0.8) x the bootstrap standard error;
- verdict: "better" / "worse" when the interval excludes 0, else "no difference detectable".
"""

import numpy as np
from scipy import stats

RESAMPLES = 10_000
LEVEL = 0.95
POWER = 0.8


def paired_matrix(method_runs: list[dict], baseline_runs: list[dict]) -> tuple[np.ndarray, list]:
    """(seeds x pairs) correctness differences, pairs matched by record; with one baseline run
    (the reference) it stands against every seed. Raises ValueError when the test pairs differ."""
    if len(baseline_runs) == 1:
        baseline_runs = baseline_runs * len(method_runs)
    if len(baseline_runs) != len(method_runs):
        raise ValueError(
            f"{len(method_runs)} seeds against {len(baseline_runs)}: a paired comparison needs "
            "the same seeds on both sides"
        )
    rows, outcomes = [], []
    for mine, theirs in zip(method_runs, baseline_runs, strict=True):
        a, b = mine["per_pair"], theirs["per_pair"]
        if a["record"] != b["record"]:
            raise ValueError(f"{mine['name']} and {theirs['name']} were tested on different pairs")
        ca, cb = np.asarray(a["correct"], float), np.asarray(b["correct"], float)
        rows.append(ca - cb)
        outcomes.append({"run": mine["name"], "baseline_run": theirs["name"], "correct": a["correct"],
                         "baseline_correct": b["correct"]})  # fmt: skip
    return np.stack(rows), outcomes


def two_level_bootstrap(d: np.ndarray, seed: int = 0) -> np.ndarray:
    """RESAMPLES means of d, each over seeds drawn with replacement and, independently for each
    drawn seed, pairs drawn with replacement."""
    rng = np.random.default_rng(seed)
    seeds, pairs = d.shape
    means = np.empty(RESAMPLES)
    for start in range(0, RESAMPLES, 500):  # blocks of 500 keep memory at 500 x seeds x pairs
        n = min(500, RESAMPLES - start)
        drawn_seeds = rng.integers(0, seeds, size=(n, seeds))
        drawn_pairs = rng.integers(0, pairs, size=(n, seeds, pairs))
        means[start : start + n] = d[drawn_seeds[..., None], drawn_pairs].mean(axis=(1, 2))
    return means


def mcnemar_exact(method_correct, baseline_correct) -> float:
    """Exact McNemar p: a two-sided binomial test on the pairs the two sides score differently
    (against the reference, whose every pair is a tie at 0.5, the sign test of the margins)."""
    d = np.asarray(method_correct, float) - np.asarray(baseline_correct, float)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    if wins + losses == 0:
        return 1.0
    return float(stats.binomtest(wins, wins + losses, 0.5).pvalue)


def probability_of_improvement(method_runs: list[dict], baseline_runs: list[dict]) -> float:
    mine = [float(np.mean(r["per_pair"]["correct"])) for r in method_runs]
    theirs = [float(np.mean(r["per_pair"]["correct"])) for r in baseline_runs]
    wins = [(x > y) + 0.5 * (x == y) for x in mine for y in theirs]
    return float(np.mean(wins))


def compare(method: str, baseline: str, method_runs: list[dict], baseline_runs: list[dict]) -> dict:
    """One `comparisons` entry of report.json (module docstring)."""
    d, outcomes = paired_matrix(method_runs, baseline_runs)
    means = two_level_bootstrap(d)
    low, high = np.quantile(means, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    p_value = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    z = stats.norm.ppf(1 - (1 - LEVEL) / 2) + stats.norm.ppf(POWER)
    entry = {
        "method": method,
        "baseline": baseline,
        "metric": "accuracy",
        "diff": float(d.mean()),
        "low": float(low),
        "high": float(high),
        "p_value": p_value,
        "mcnemar_p": [mcnemar_exact(o["correct"], o["baseline_correct"]) for o in outcomes],
        "prob_improvement": probability_of_improvement(method_runs, baseline_runs),
        "detectable": float(z * means.std(ddof=1)),
        "seeds": d.shape[0],
        "pairs": d.shape[1],
        "outcomes": outcomes,
    }
    entry["verdict"] = verdict_of(entry)
    return entry


def comparisons(tested: dict, baseline: str = "dpo") -> list[dict]:
    """Every method against `baseline` (when the study has it) and against the reference; runs
    without per-pair outcomes (evaluated by an older tokenratio) are left out."""

    def usable(name):
        return name in tested and all("per_pair" in r for r in tested[name])

    found = []
    for name in tested:
        if name == "reference" or not usable(name):
            continue
        for other in (baseline, "reference"):
            if other != name and usable(other):
                found.append(compare(name, other, tested[name], tested[other]))
    return found


def verdict_of(entry: dict) -> str:
    if entry["low"] > 0:
        return "better"
    if entry["high"] < 0:
        return "worse"
    return "no difference detectable"


def p_text(p: float) -> str:
    """A p-value as a paper prints it: never "p = 0.000"."""
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"


def counted(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def sentence(entry: dict) -> str:
    """The verdict in words, with the numbers behind it."""
    numbers = (
        f"{entry['diff']:+.3f} accuracy (95% {entry['low']:+.3f} to {entry['high']:+.3f}, "
        f"{p_text(entry['p_value'])}, P(improvement) = {entry['prob_improvement']:.2f}, "
        f"{counted(entry['seeds'], 'seed')} x {counted(entry['pairs'], 'pair')})"
    )
    if entry["verdict"] == "no difference detectable":
        return (
            f"**{entry['method']}** vs {entry['baseline']}: no difference this study can detect, "
            f"{numbers}; it detects {entry['detectable']:.3f} or more at 80% power."
        )
    return f"**{entry['method']}** is {entry['verdict']} than {entry['baseline']}: {numbers}."
