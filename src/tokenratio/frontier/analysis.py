"""Comparing reward-KL frontiers at matched KL, with intervals from a bootstrap over prompts.

A method's frontier is read off its evaluation points (one per beta, seed and checkpoint): the
gold reward of the policy's own samples against their KL(pi || pi_ref), both means over the same
held-out prompts. Its curve is the upper envelope of the points, interpolated linearly in KL: the
most reward the method reached at a KL no larger (`envelope`). Two methods are compared over the
KL range both reach:
- `reward_at_matched_kl`: the mean over that range of the difference between their curves, on an
  even grid of GRID KL values (the area between the frontiers divided by the range's width);
- `area_between`: that difference integrated over the range (reward x nats).

Each point's numbers are means over prompts, so resampling prompts (the same resample for every
point, so the comparison stays paired) and recomputing everything gives the sampling
distribution: `scipy.stats.bootstrap` over prompt indices, percentile intervals. A verdict is
"better" or "worse" when the 95% interval excludes 0, else "no difference this study can detect",
with the smallest difference it would detect at 80% power, (1.96 + 0.84) standard errors.
"""

from dataclasses import dataclass

import numpy as np

GRID = 64  # KL values over the matched range
POWER_Z = 1.96 + 0.8416  # two-sided 5% test at 80% power


@dataclass(frozen=True)
class Points:
    """A method's evaluation points: per point and prompt, the mean KL and gold reward of that
    prompt's samples, (points, prompts) each."""

    kl: np.ndarray
    reward: np.ndarray

    def means(self, prompts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        kl, reward = (self.kl, self.reward) if prompts is None else (
            self.kl[:, prompts], self.reward[:, prompts]
        )  # fmt: skip
        return kl.mean(1), reward.mean(1)


def envelope(kl: np.ndarray, reward: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The upper envelope of (kl, reward) points, linear between them, evaluated `at` KL values
    inside the points' range: at each KL, the most reward any point reached at a KL no larger,
    joined by segments between the envelope's corners."""
    order = np.argsort(kl, kind="stable")
    kl, reward = kl[order], reward[order]
    best = np.maximum.accumulate(reward)
    corners = np.r_[True, best[1:] > best[:-1]]  # where the running best rises
    return np.interp(at, kl[corners], best[corners])


def interpolated(kl: np.ndarray, value: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The points joined in KL order, evaluated `at` KL values (a diversity's curve: it has no
    "most reached", so no envelope)."""
    order = np.argsort(kl, kind="stable")
    return np.interp(at, kl[order], value[order])


CURVES = {"envelope": envelope, "interpolated": interpolated}


def matched_range(a: np.ndarray, b: np.ndarray) -> tuple[float, float] | None:
    """The KL range both sets of point KLs span, or None."""
    low, high = max(a.min(), b.min()), min(a.max(), b.max())
    return (float(low), float(high)) if high > low else None


def compare_at_matched_kl(
    method: Points, baseline: Points, prompts=None, curve: str = "envelope"
) -> dict:
    """reward_at_matched_kl and area_between (module docstring) on these prompts, with the
    matched KL range; nan where the ranges do not overlap. `curve`: how a method's points make
    its curve (CURVES: the reward's envelope, a diversity's interpolation)."""
    kl_m, reward_m = method.means(prompts)
    kl_b, reward_b = baseline.means(prompts)
    span = matched_range(kl_m, kl_b)
    if span is None:
        return {"reward_at_matched_kl": np.nan, "area_between": np.nan, "kl_range": None}
    grid = np.linspace(*span, GRID)
    line = CURVES[curve]
    gap = line(kl_m, reward_m, grid) - line(kl_b, reward_b, grid)
    area = float(((gap[1:] + gap[:-1]) / 2 * np.diff(grid)).sum())  # the trapezoid rule
    return {
        "reward_at_matched_kl": area / (span[1] - span[0]),
        "area_between": area,
        "kl_range": span,
    }


def bootstrap_comparison(
    method: Points,
    baseline: Points,
    resamples: int = 2000,
    seed: int = 0,
    curve: str = "envelope",
    metrics: tuple[str, ...] = ("reward_at_matched_kl", "area_between"),
) -> list[dict]:
    """One comparison per metric: the difference on all prompts, its 95% percentile interval over
    prompts resampled with replacement (paired across every point), a verdict in words and the
    smallest difference detectable."""
    from scipy.stats import bootstrap

    n = method.kl.shape[1]
    if baseline.kl.shape[1] != n:
        raise ValueError("both methods must be evaluated on the same prompts")
    whole = compare_at_matched_kl(method, baseline, curve=curve)
    found = []
    for metric in metrics:

        def statistic(indices, metric=metric):
            return compare_at_matched_kl(method, baseline, indices.astype(int), curve)[metric]

        if whole["kl_range"] is None:
            low = high = se = np.nan
        else:
            result = bootstrap(
                (np.arange(n),), statistic, n_resamples=resamples, vectorized=False,
                method="percentile", random_state=np.random.default_rng(seed),
            )  # fmt: skip
            low, high = result.confidence_interval
            se = float(result.standard_error)
        found.append(_entry(metric, whole[metric], low, high, se, whole["kl_range"]))
    return found


def _entry(metric, diff, low, high, se, kl_range) -> dict:
    if kl_range is None:
        verdict = "not comparable: the KL ranges do not overlap"
    elif low > 0:
        verdict = "better"
    elif high < 0:
        verdict = "worse"
    else:
        verdict = "no difference this study can detect"
    return {
        "metric": metric,
        "diff": float(diff),
        "low": float(low),
        "high": float(high),
        "verdict": verdict,
        "detectable": POWER_Z * se,
        "kl_range": kl_range,
    }
