"""Tolerances for comparing two runs that do the same float32 arithmetic in another order (two
processes' all-reduce against one process's sum, another matmul blocking for another batch shape,
another CPU's kernels), derived from the arithmetic instead of picked.

A float32 sum of n terms is off by at most gamma(n) * sum(|terms|), gamma(n) = n u / (1 - n u),
u = 2^-24 (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., eq. 4.4). Two orders
of the same sum therefore differ by at most 2 gamma(n) of the magnitudes involved. Where a value is
the end of a chain of such sums, n counts the terms along the longest chain.

Weights after T optimizer steps are compared by their displacement from the start: AdamW's step
m/(sqrt(v) + eps) does not depend on the gradient's scale, so rounding enters it relative to the
gradient, and the displacements of the two runs agree to 2 gamma(n) relative to the displacement
itself, norm-wise per tensor (an element whose gradient terms cancel can differ more on its own:
the norm bounds the tensor, as Higham's normwise bounds for products do). A bug in the engine (a
micro-batch stepped alone, a missed all-reduce, a process that trains on other pairs) moves whole
tensors by O(lr) in another direction: relative differences of O(1), far above these bounds.

A failure names the tensor, the largest elementwise difference and where it is.
"""

import math

import torch

U = 2.0**-24  # float32 unit roundoff


def gamma(n: int) -> float:
    """Higham's gamma_n: the relative bound on a float32 sum of n terms."""
    return n * U / (1 - n * U)


def _where(diff: torch.Tensor) -> str:
    index = int(diff.abs().argmax())
    position = tuple(int(i) for i in torch.unravel_index(torch.tensor(index), diff.shape))
    return f"largest difference {float(diff.abs().max()):.3e} at {position}"


def assert_moved_alike(actual: dict, expected: dict, start: dict, terms: int) -> None:
    """Every tensor's displacement from `start` in `actual` equals `expected`'s to 2 gamma(terms)
    of that displacement's norm (module docstring), plus half an ulp of the weights per element for
    the final rounding of w - lr * step."""
    assert sorted(actual) == sorted(expected)
    failures = []
    for key in sorted(expected):
        begin = start[key].double()
        moved = expected[key].double() - begin
        diff = actual[key].double() - expected[key].double()
        ulp = U * float(begin.abs().max()) * math.sqrt(diff.numel())
        bound = 2 * gamma(terms) * float(moved.norm()) + ulp
        if float(diff.norm()) > bound:
            failures.append(
                f"{key}: |difference| {float(diff.norm()):.3e} > bound {bound:.3e} "
                f"(|displacement| {float(moved.norm()):.3e}); {_where(diff)}"
            )
    assert not failures, f"{len(failures)} tensors moved apart:\n" + "\n".join(failures)


def assert_sums_close(actual, expected, terms: int, what: str = "values") -> None:
    """Values that are chains of float32 sums of at most `terms` terms each, computed in two
    orders: elementwise within 2 gamma(terms) of the largest magnitude involved."""
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    bound = 2 * gamma(terms) * float(expected.abs().max().clamp(min=1.0))
    diff = actual - expected
    assert float(diff.abs().max()) <= bound, f"{what}: bound {bound:.3e}; {_where(diff)}"
