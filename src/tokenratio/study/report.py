"""The study's report: report.json, report.md (mean and 95% interval over seeds, n shown, the
reference row first, the exact command and config) and three plots.

Intervals are Student-t over seeds: mean ± t_{0.975, n-1} s / sqrt(n). With two seeds t is 12.7, so
an interval is honest about how little two seeds say. With one seed (n = 1) the interval is 1.96
standard errors over the test pairs or prompts instead, which leaves out seed noise.
"""

import json
import math
import statistics
from dataclasses import asdict
from pathlib import Path

from tokenratio import atomic

METRICS = [  # key, column header, digits
    ("pref_accuracy", "test acc.", 3),
    ("reward_margin", "margin", 3),
    ("kl_per_token", "KL/token", 4),
    ("response_tokens", "length", 1),
    ("entropy", "entropy", 3),
    ("self_bleu", "self-BLEU", 1),
    ("distinct_1", "distinct-1", 3),
    ("win_rate", "win %", 1),
    ("lc_win_rate", "LC win %", 1),
]
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(pairs: list[tuple[float, float]]) -> dict:
    """(mean, standard error) per seed -> mean, 95% half-width (Student t over seeds; for one seed,
    1.96 of its own standard error) and n."""
    pairs = [(m, se) for m, se in pairs if not math.isnan(m)]
    if not pairs:
        return {"mean": float("nan"), "half_width": None, "n": 0}
    values = [m for m, _ in pairs]
    n = len(values)
    if n > 1:
        half = T_975.get(n - 1, 1.96) * statistics.stdev(values) / math.sqrt(n)
    else:
        half = None if math.isnan(pairs[0][1]) else 1.96 * pairs[0][1]
    return {"mean": statistics.fmean(values), "half_width": half, "n": n}


def _cell_meaning(seeds: int) -> str:
    """What a summary cell's ± is: over seeds, or with one seed over the test pairs (module
    docstring)."""
    if seeds == 1:
        return (
            "Each cell: mean ± 95% interval over the test pairs (1.96 standard errors; one seed, "
            "so seed-to-seed noise is not in it), n = 1 seed."
        )
    return "Each cell: mean ± 95% interval over seeds (Student t), n seeds."


def summarise(tested: dict) -> list[dict]:
    """One row per method (the reference first): each metric's interval over that method's seeds."""
    rows = []
    for name, results in tested.items():
        row = {"method": name, "n": len(results)}
        for key, _, _ in METRICS:
            if any(key in r for r in results):
                row[key] = interval([tuple(r[key]) for r in results if key in r])
        rows.append(row)
    return rows


def _cell(stat: dict | None, digits: int) -> str:
    if stat is None or stat["n"] == 0:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    return text if stat["half_width"] is None else f"{text} ± {stat['half_width']:.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    present = [m for m in METRICS if any(m[0] in r for r in rows)]
    lines = [
        "| method | n | " + " | ".join(h for _, h, _ in present) + " |",
        "|---|---|" + "---|" * len(present),
    ]
    for r in rows:
        cells = [_cell(r.get(key), digits) for key, _, digits in present]
        lines.append(f"| {r['method']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(
    rows: list[dict], method: str, results: dict | None = None, compared: list | None = None
) -> str:
    """Whether `method` learned (test accuracy above 0.5 by more than its interval), said plainly,
    with each seed's own accuracy and 95% interval over the test pairs when `results` are given.
    With paired comparisons, the interval is its bootstrap one against the reference (which
    scores 0.5: its implicit rewards are all 0)."""
    row = next((r for r in rows if r["method"].split(" ")[0] == method), None)
    if row is None or "pref_accuracy" not in row:
        return f"{method} is not in this study, so nothing checks that the recipe trains."
    stat = row["pref_accuracy"]
    half = stat["half_width"] or 0.0
    seeds = _per_seed(results.get(row["method"], []) if results else [])
    against = [
        c for c in compared or () if c["method"] == row["method"] and c["baseline"] == "reference"
    ]
    if against:
        c = against[0]
        stat = {"mean": 0.5 + c["diff"], "half_width": (c["high"] - c["low"]) / 2, "n": c["seeds"]}
        if c["low"] > 0:
            return (
                f"The recipe trains: {method}'s test accuracy {0.5 + c['diff']:.3f} is above the "
                f"reference's 0.5 by more than its 95% interval ({0.5 + c['low']:.3f} to "
                f"{0.5 + c['high']:.3f}, seeds and pairs resampled).{seeds}"
            )
        return (
            f"The recipe did NOT measurably train: {method}'s test accuracy "
            f"{0.5 + c['diff']:.3f} (95% {0.5 + c['low']:.3f} to {0.5 + c['high']:.3f}, seeds "
            f"and pairs resampled) does not clear the reference's 0.5.{seeds} More steps, "
            "pairs or a larger lr are needed before the verdicts above mean anything."
        )
    if stat["mean"] - half > 0.5:
        return (
            f"The recipe trains: {method}'s test accuracy {_cell(stat, 3)} (n = {stat['n']}) is "
            f"above 0.5 by more than its 95% interval.{seeds}"
        )
    why = (
        " With 2 seeds the interval is 12.7 times the seeds' standard error, so it clears 0.5 "
        "only when both seeds agree closely."
        if stat["n"] == 2
        else ""
    )
    return (
        f"The recipe did NOT measurably train: {method}'s test accuracy {_cell(stat, 3)} "
        f"(n = {stat['n']}) is not above 0.5 by more than its 95% interval.{why}{seeds} "
        "Differences between methods here are within the noise of this run; more steps, pairs "
        "or seeds are needed."
    )


def _per_seed(results: list[dict]) -> str:
    """' Seed by seed (95% over the test pairs): 0.583 ± 0.088, ...' or ''."""
    cells = [
        f"{m:.3f} ± {1.96 * se:.3f}"
        for m, se in (r["pref_accuracy"] for r in results if "pref_accuracy" in r)
    ]
    return f" Seed by seed (95% over the test pairs): {', '.join(cells)}." if cells else ""


def runs_table(chosen: dict, tested: dict) -> str:
    """Every tested run on its own: seed, lr, validation accuracy, and its test metrics with 95%
    intervals over the test pairs (what two seeds cannot show in the summary)."""
    lines = [
        "| run | seed | lr | valid acc. | test acc. | margin | KL/token |",
        "|---|---|---|---|---|---|---|",
    ]
    records = {r["name"]: r for s in chosen.values() for r in s["tried"] + s["runs"]}
    for results in tested.values():
        for result in results:
            run = records.get(result["name"], {})
            cells = [
                f"{result[k][0]:.{d}f} ± {1.96 * result[k][1]:.{d}f}" if k in result else "-"
                for k, d in (("pref_accuracy", 3), ("reward_margin", 3), ("kl_per_token", 4))
            ]
            valid = run.get("valid_accuracy")
            lines.append(
                f"| {result['name']} | {run.get('seed', '-')} | {run.get('lr', '-')} | "
                f"{'-' if valid is None else f'{valid:.3f}'} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines)


def selection_table(chosen: dict) -> str:
    lines = ["| method | beta | lr tried: validation accuracy | chosen lr |", "|---|---|---|---|"]
    for (method, beta), selection in chosen.items():
        tried = ", ".join(f"{r['lr']:g}: {r['valid_accuracy']:.3f}" for r in selection["tried"])
        lines.append(f"| {method} | {beta:g} | {tried} | {selection['lr']:g} |")
    return "\n".join(lines)


def write_report(study, base, chosen: dict, tested: dict, out: Path, command: str) -> dict:
    from tokenratio.study import plots
    from tokenratio.study.stats import comparisons

    rows = summarise(tested)
    compared = comparisons(tested, study.check_method)
    report = {
        "command": command,
        "study": asdict(study),
        "base_config": asdict(base),
        "selection": [
            {"method": m, "beta": b, "lr": s["lr"], "tried": s["tried"]}
            for (m, b), s in chosen.items()
        ],
        "rows": rows,
        "comparisons": compared,
        # the verdicts in words, computed once: report.md and the terminal print these strings
        "verdicts": verdicts(compared, study.check_method),
        "check": verdict(rows, study.check_method, tested, compared),
        "results": tested,
    }
    atomic.write_json(out / "report.json", report)
    plots.accuracy_vs_kl(rows, out / "accuracy_vs_kl.png")
    plots.entropy_vs_self_bleu(rows, out / "entropy_vs_self_bleu.png")
    plots.training_curves(chosen, out / "runs", out / "training_curves.png")
    atomic.write_text(out / "report.md", _markdown(report, study, chosen, rows))
    return report


def verdicts(compared: list[dict], baseline: str) -> str:
    """The report's lead: each method against `baseline`, then against the reference."""
    from tokenratio.study.stats import sentence

    ordered = [c for c in compared if c["baseline"] == baseline]
    ordered += [c for c in compared if c["baseline"] != baseline]
    return "\n".join(f"- {sentence(c)}" for c in ordered) or "- (no paired outcomes recorded)"


def _markdown(report: dict, study, chosen: dict, rows: list[dict]) -> str:
    config = json.dumps(report["study"], indent=1)
    return f"""# tokenratio study

Command: `{report["command"]}`

## Verdicts

Paired on the same {study.test_pairs} test pairs and seeds: accuracy differences with a 95%
interval from a bootstrap over seeds and pairs (`study/stats.py`; every per-pair outcome is in
report.json under `comparisons`).

{report["verdicts"]}

{report["check"]}

## Summary over seeds

Test split: {study.test_pairs} pairs that training and lr selection never saw (`data/splits.json`).
{_cell_meaning(len(study.seeds))} The reference row is the starting model. KL/token: KL(pi ||
pi_ref) per response token, teacher-forced on the test pairs.

{markdown_table(rows)}

## Every run

{runs_table(chosen, report["results"])}

![accuracy vs KL](accuracy_vs_kl.png)
![entropy vs self-BLEU](entropy_vs_self_bleu.png)
![training curves](training_curves.png)

## Learning-rate selection (seed 0, validation split, implicit-reward accuracy)

{selection_table(chosen)}

## Study settings

```json
{config}
```
The base training config is in `report.json` (`base_config`).
"""
