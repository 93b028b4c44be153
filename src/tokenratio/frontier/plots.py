"""The frontier plot: gold reward and distinct-2 against KL(pi || pi_ref), a colour per method,
a point per (beta, seed, checkpoint), the reward's envelope drawn, the reference at KL 0."""

from pathlib import Path

import numpy as np

from tokenratio.frontier.analysis import envelope


def plot_frontier(points: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tokenratio import atomic

    reference = next(p for p in points if p["method"] == "reference")
    methods = list(dict.fromkeys(p["method"] for p in points if p["method"] != "reference"))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for colour, method in zip(plt.cm.tab10.colors, methods, strict=False):
        mine = [p for p in points if p["method"] == method]
        kl = np.array([reference["kl"], *(p["kl"] for p in mine)])
        reward = np.array([reference["reward"], *(p["reward"] for p in mine)])
        left.scatter(kl[1:], reward[1:], color=colour, s=18, label=method)
        grid = np.linspace(kl.min(), kl.max(), 100)
        left.plot(grid, envelope(kl, reward, grid), color=colour, lw=1.2)
        right.scatter([p["kl"] for p in mine], [p["distinct_2"] for p in mine], color=colour, s=18)
    for axis, key, name in ((left, "reward", "gold reward"), (right, "distinct_2", "distinct-2")):
        axis.scatter([reference["kl"]], [reference[key]], marker="*", s=120, color="black",
                     label="reference" if axis is left else None)  # fmt: skip
        axis.set_xlabel("KL(pi || pi_ref), nats per sample")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    left.set_title("gold reward of the policy's own samples")
    right.set_title("diversity of a prompt's samples")
    figure.tight_layout()
    tmp = atomic.temporary_name(path)
    figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return atomic.publish_file(tmp, path)
