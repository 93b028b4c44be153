"""The study's pictures: accuracy against KL, entropy against self-BLEU, and every run's training curve."""

from pathlib import Path

from tokenratio import runlog


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scatter(rows, x_key, y_key, xlabel, ylabel, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for row in rows:
        x, y = row.get(x_key), row.get(y_key)
        if not x or not y or x["n"] == 0 or y["n"] == 0:
            continue
        ax.errorbar(
            x["mean"],
            y["mean"],
            xerr=x["half_width"] or 0,
            yerr=y["half_width"] or 0,
            fmt="o",
            capsize=3,
            label=f"{row['method']} (n={row['n']})",
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def accuracy_vs_kl(rows, path: Path) -> None:
    _scatter(
        rows,
        "kl_per_token",
        "pref_accuracy",
        "KL(pi || pi_ref) per token (test)",
        "implicit-reward accuracy (test), 95% interval over seeds",
        path,
    )


def entropy_vs_self_bleu(rows, path: Path) -> None:
    _scatter(
        rows,
        "self_bleu",
        "entropy",
        "self-BLEU (lower: more diverse)",
        "predictive entropy (higher: more diverse)",
        path,
    )


def training_curves(chosen: dict, runs_dir: Path, path: Path) -> None:
    """Training loss of every run (every lr tried and every seed), one panel per method."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(chosen), figsize=(3.2 * len(chosen), 3), squeeze=False)
    for ax, ((method, beta), selection) in zip(axes[0], chosen.items(), strict=True):
        for run in {r["name"]: r for r in selection["tried"] + selection["runs"]}.values():
            log = runs_dir / run["name"] / "metrics.jsonl"
            records = runlog.read(log)
            steps = [r["step"] for r in records if "loss" in r]
            ax.plot(
                steps,
                [r["loss"] for r in records if "loss" in r],
                lw=1,
                label=f"lr {run['lr']:g} seed {run['seed']}",
            )
        ax.set_title(f"{method} (beta {beta:g})", fontsize=8)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
