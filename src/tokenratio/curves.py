"""`curves.png` of a training run: loss, implicit-reward accuracy and margin per step (raw, and a
moving average), with the held-out evaluations as points. Written by the trainer at every
evaluation and at the end, from metrics.jsonl alone (so it can be redrawn for any run)."""

from pathlib import Path

from tokenratio import atomic, runlog

PANELS = [("loss", "loss"), ("reward_accuracy", "reward accuracy"), ("reward_margin", "margin")]


def read_metrics(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return runlog.read(path)


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of the last `window` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_run(metrics_path: Path, png: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, label) in zip(axes, PANELS, strict=True):
        train = [(r["step"], r[key]) for r in records if key in r]
        held = [(r["step"], r[f"eval_{key}"]) for r in records if f"eval_{key}" in r]
        if train:
            steps, values = zip(*train, strict=True)
            window = max(1, len(values) // 10)
            ax.plot(steps, values, color="tab:blue", alpha=0.25, lw=0.8, label="train (per step)")
            smooth = moving_average(list(values), window)
            ax.plot(steps, smooth, color="tab:blue", lw=1.6, label=f"train ({window}-step mean)")
        if held:
            steps, values = zip(*held, strict=True)
            ax.plot(steps, values, "o-", color="tab:orange", ms=4, label="held-out")
        if key == "reward_accuracy":
            ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("optimizer step")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    atomic.publish_file(tmp, png)
    return png
