"""The interval every command reports for a held-out accuracy."""


def accuracy_interval(accuracy: float, n: int) -> tuple[float, float]:
    """Wilson's 95% interval of a proportion (scipy.stats.binomtest's), ties counted as half:
    what `tokenratio train`, `tokenratio eval` and a run's model card all report."""
    from scipy.stats import binomtest

    result = binomtest(round(accuracy * n), n).proportion_ci(0.95, method="wilson")
    return result.low, result.high
