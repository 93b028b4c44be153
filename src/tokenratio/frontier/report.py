"""The frontier's report: verdicts at matched KL first, then the table and the plot.

report.json: `gold_reward` (name, version); `points`, one per (method, beta, seed, checkpoint
step) and the reference, each with method, beta, seed, step, kl, reward, n_samples, the
diversity means and its per-prompt values; `comparisons`, one per (method, baseline, metric):
reward_at_matched_kl and area_between on the reward's envelope, distinct_2_at_matched_kl and
entropy_at_matched_kl on the points' interpolation, each with diff, low, high (95%, bootstrap over
prompts), verdict, detectable and kl_range; `samples`, where every point's samples are.
"""

import math
from pathlib import Path

import numpy as np

from tokenratio import atomic
from tokenratio.frontier.analysis import Points, bootstrap_comparison

DIVERSITY = ("distinct_2", "entropy")  # compared at matched KL on the points' interpolation
TBPO = ("tbpo-q", "tbpo-a")


def method_points(points: list[dict], method: str, value: str = "reward") -> Points:
    """A method's points with the reference's (KL 0: where every frontier starts), per prompt."""
    chosen = [p for p in points if p["method"] in (method, "reference")]
    return Points(
        np.array([p["per_prompt"]["kl"] for p in chosen]),
        np.array([p["per_prompt"][value] for p in chosen]),
    )


def comparisons(frontier, points: list[dict]) -> list[dict]:
    """Every method against the baseline: reward (envelope) and diversity (interpolation)."""
    found = []
    base = frontier.baseline
    for method in (m for m in frontier.methods if m != base):
        runs = {"method": method, "baseline": base}
        found += [
            {**runs, **c}
            for c in bootstrap_comparison(
                method_points(points, method), method_points(points, base),
                frontier.bootstrap_resamples, frontier.split_seed,
            )
        ]  # fmt: skip
        for value in DIVERSITY:
            (c,) = bootstrap_comparison(
                method_points(points, method, value), method_points(points, base, value),
                frontier.bootstrap_resamples, frontier.split_seed, "interpolated",
                ("reward_at_matched_kl",),
            )  # fmt: skip
            found.append({**runs, **c, "metric": f"{value}_at_matched_kl"})
    return found


def baseline_gain(frontier, points: list[dict]) -> float:
    """The baseline's best gold reward over the reference's."""
    reference = next(p["reward"] for p in points if p["method"] == "reference")
    return max(p["reward"] for p in points if p["method"] == frontier.baseline) - reference


def lead(frontier, found: list[dict], gain: float) -> list[str]:
    """The report's first lines: TBPO's verdicts on reward at matched KL, a loss said first."""
    reward = [c for c in found if c["metric"] == "reward_at_matched_kl"]
    tbpo = [c for c in reward if c["method"].startswith(TBPO)]
    wins = [c for c in tbpo if c["verdict"] == "better"]
    lines = []
    if tbpo and not wins:
        lines.append(
            f"**TBPO does not beat {frontier.baseline} here**: no TBPO variant reaches more gold "
            "reward at matched KL than it by more than this study can resolve."
        )
    for c in reward:
        lines.append(f"- {_verdict_line(c, gain)}")
    return lines


def _verdict_line(c: dict, gain: float) -> str:
    half = (c["high"] - c["low"]) / 2
    share = f"{half / gain:.0%} of the baseline's gain" if gain > 0 else "no baseline gain"
    if c["kl_range"] is None:
        return f"{c['method']} vs {c['baseline']}: {c['verdict']}"
    low, high = c["kl_range"]
    return (
        f"{c['method']} vs {c['baseline']}, gold reward at matched KL ({low:.2f}-{high:.2f} "
        f"nats): **{c['verdict']}**, {c['diff']:+.3f} (95% {c['low']:+.3f} to {c['high']:+.3f}; "
        f"half-width {share}; smallest detectable {c['detectable']:.3f})"
    )


def write_report(frontier, base, gold, pairs: dict, points: list[dict], out: Path, command: str):
    from tokenratio.frontier.plots import plot_frontier

    points = [{**p, "samples": _relative(p["samples"], out)} for p in points]
    found = comparisons(frontier, points)
    gain = baseline_gain(frontier, points)
    report = {
        "command": command,
        "gold_reward": gold.identity(),
        "model": base.model.name_or_path,
        "pairs": pairs,
        "settings": _settings(frontier),
        "baseline_gain": gain,
        "lead": lead(frontier, found, gain),
        "points": points,
        "comparisons": found,
        "samples": sorted({p["samples"] for p in points}),
    }
    atomic.write_json(out / "report.json", _finite(report))
    plot_frontier(points, out / "frontier.png")
    atomic.write_text(out / "report.md", markdown(report))
    return report


def _relative(path: str, out: Path) -> str:
    """A samples file's path relative to the report (the directory can be moved whole)."""
    import os

    return os.path.relpath(path, out) if Path(path).is_relative_to(Path(out)) else path


def _settings(frontier) -> dict:
    from dataclasses import asdict

    return asdict(frontier)


def _finite(value):
    """NaN and infinities as null: report.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def markdown(report: dict) -> str:
    s = report["settings"]
    lines = [
        "# Reward-KL frontier",
        "",
        *report["lead"],
        "",
        f"Gold reward: `{report['gold_reward']['name']}` {report['gold_reward']['version']}; "
        f"model `{report['model']}`; {report['pairs']['pairs']} pairs from "
        f"{report['pairs']['prompts']} prompts x {s['samples']} samples "
        f"({report['pairs']['ties_dropped']} ties dropped); evaluated on {s['heldout_prompts']} "
        f"held-out prompts x {s['eval_samples']} samples of at most {s['max_new_tokens']} tokens.",
        "KL is each sample's exact per-position KL(pi || pi_ref) summed along its own positions "
        "(the sampled log-ratio sum is kept beside it in the samples); intervals are 95% "
        f"percentile bootstraps over prompts ({s['bootstrap_resamples']} resamples). Every sample, "
        "with its gold reward and KL, is in `samples/` (JSON lines, gzip), to rescore.",
        "",
        "![frontier](frontier.png)",
        "",
        "## Comparisons",
        "",
        "| method | baseline | metric | diff | 95% interval | verdict | KL range |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in report["comparisons"]:
        span = "-" if c["kl_range"] is None else "{:.2f}-{:.2f}".format(*c["kl_range"])
        lines.append(
            f"| {c['method']} | {c['baseline']} | {c['metric']} | {_num(c['diff'])} | "
            f"{_num(c['low'])} to {_num(c['high'])} | {c['verdict']} | {span} |"
        )
    lines += [
        "",
        "## Points",
        "",
        "| method | beta | seed | step | KL | gold reward | distinct-2 | entropy/token | "
        "self-BLEU | tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["points"]:
        lines.append(
            f"| {p['method']} | {_num(p['beta'], 'g')} | {p['seed'] if p['seed'] is not None else '-'}"
            f" | {p['step']} | {p['kl']:.3f} | {p['reward']:.3f} | {_num(p['distinct_2'])} | "
            f"{_num(p['entropy'])} | {_num(p['self_bleu'], '.1f')} | {p['length']:.1f} |"
        )
    lines += ["", f"Command: `{report['command']}`", ""]
    return "\n".join(lines)


def _num(value, spec: str = ".3f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)
