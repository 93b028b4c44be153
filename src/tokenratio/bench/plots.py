"""PNG figures: the benchmark's reward-KL frontier and training curves. Imports matplotlib (Agg)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def method_colors(methods) -> dict[str, tuple]:
    """One fixed colour per method name, shared by every figure."""
    cmap = plt.get_cmap("tab10")
    return {m: cmap(i % 10) for i, m in enumerate(sorted(methods))}


OPTIMA = {"seq": "optimum, sequence level (pi*_seq)", "tok": "optimum, token level (pi*_tok)"}


def bench_frontier(results: dict, path: Path) -> None:
    """Expected return against KL(pi||pi_ref): both optima as curves, each method's runs as points."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for name, label in OPTIMA.items():
        kl, ret = zip(*results["frontier"][name], strict=True)
        ax.plot(kl, ret, "--" if name == "tok" else "-", color="black", alpha=0.6, label=label)
    methods = sorted({r["loss"] for r in results["runs"]})
    colors = method_colors(methods)
    markers = "osD^v<>P*X"
    for i, method in enumerate(methods):
        runs = [r for r in results["runs"] if r["loss"] == method]
        ax.scatter(
            [r["final"]["kl_ref"] for r in runs],
            [r["final"]["return"] for r in runs],
            marker=markers[i % len(markers)],
            s=36,
            alpha=0.8,
            color=colors[method],
            label=method,
        )
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("KL(pi || pi_ref), nats per sequence")
    ax.set_ylabel("expected true return")
    ax.set_title("Reward-KL frontier (all betas and seeds; exact metrics)")
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def bench_curves(results: dict, path: Path) -> None:
    """KL to each optimum and return over training steps, seed 0, at the middle beta of the sweep."""
    betas = sorted({r["beta"] for r in results["runs"]})
    beta = betas[len(betas) // 2]
    runs = [
        r
        for r in results["runs"]
        if r["beta"] == beta and r["seed"] == min(x["seed"] for x in results["runs"])
    ]
    panels = [
        ("kl_seq", "KL(pi || pi*_seq)"),
        ("kl_tok", "KL(pi || pi*_tok)"),
        ("return", "expected return"),
        ("heldout_acc", "held-out preference accuracy"),
    ]
    colors = method_colors({r["loss"] for r in runs})
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4))
    for ax, (metric, title) in zip(axes, panels, strict=True):
        for run in sorted(runs, key=lambda r: r["loss"]):
            steps = [p["step"] for p in run["curve"]]
            ax.plot(
                steps,
                [p[metric] for p in run["curve"]],
                label=run["loss"],
                color=colors[run["loss"]],
            )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"Training curves, beta = {beta:g}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
