"""Bregman generators of BPO and TBPO: per-sample (or per-token) losses as pure functions of log R.

For a strictly convex h, ratio matching minimises l(R) = h'(R) R - h(R) - h'(1/R)
(docs/method.md §2, BPO table; BPO, arXiv 2505.19601). Each generator here is that l, written as a
function of log R for numerical range. `bregman_generator` resolves a name and its
hyperparameters. Imports only torch.
"""

import functools
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor


def lr_generator(log_r: Tensor) -> Tensor:
    """Logistic regression: log(1 + R). With R = exp(-beta u) this is DPO's -log sigma(beta u)."""
    return F.softplus(log_r)


def kliep_generator(log_r: Tensor) -> Tensor:
    """KLIEP: R + log R (unbounded below as R -> 0: clamp log R)."""
    return log_r.exp() + log_r


def lsif_generator(log_r: Tensor) -> Tensor:
    """LSIF: R^2 - 2/R."""
    return (2 * log_r).exp() - 2 * (-log_r).exp()


def ba_generator(log_r: Tensor, *, lam: float) -> Tensor:
    """Basu's power family: R^(lam+1) - ((lam+1)/lam) R^(-lam), lam > -1.

    At lam = 0 the formula diverges by the constant -1/lam; we return its finite limit R + log R
    (KLIEP), which has the same gradient.
    """
    if lam == 0:
        return kliep_generator(log_r)
    return ((lam + 1) * log_r).exp() - (lam + 1) / lam * (-lam * log_r).exp()


def sba_generator(log_r: Tensor, *, lam: float, s: float) -> Tensor:
    """Scaled BA: R^(lam+1)/(s(lam+1)) - R^(-lam)/(s lam); lam = 0 gives (R + log R)/s.

    s = 4 makes the gradient in log R equal DPO's (1/2) at R = 1; the paper's TBPO uses lam=0, s=4.
    """
    if lam == 0:
        return (log_r.exp() + log_r) / s
    return ((lam + 1) * log_r).exp() / (s * (lam + 1)) - (-lam * log_r).exp() / (s * lam)


GENERATORS: dict[str, Callable[..., Tensor]] = {
    "lr": lr_generator,
    "kliep": kliep_generator,
    "lsif": lsif_generator,
    "ba": ba_generator,
    "sba": sba_generator,
}
# Hyperparameters each generator takes, with their defaults (paper: SBA lam=0, s=4).
GENERATOR_DEFAULTS: dict[str, dict[str, float]] = {
    "lr": {},
    "kliep": {},
    "lsif": {},
    "ba": {"lam": 0.0},
    "sba": {"lam": 0.0, "s": 4.0},
}


def bregman_generator(
    generator: str, lam: float | None = None, s: float | None = None
) -> Callable[[Tensor], Tensor]:
    """Resolve a generator name and its hyperparameters to a function log R -> loss.

    Raises ValueError for an unknown name, a hyperparameter the generator does not take, lam <= -1 or
    s <= 0.
    """
    if generator not in GENERATORS:
        raise ValueError(f"unknown generator '{generator}'; valid: {sorted(GENERATORS)}")
    params = dict(GENERATOR_DEFAULTS[generator])
    for name, value in (("lam", lam), ("s", s)):
        if value is None:
            continue
        if name not in params:
            raise ValueError(
                f"generator '{generator}' takes no '{name}' (it takes {sorted(params) or 'none'})"
            )
        params[name] = float(value)
    if params.get("lam", 0.0) <= -1:
        raise ValueError(f"lam must be > -1 for a convex generator, got {params['lam']}")
    if params.get("s", 1.0) <= 0:
        raise ValueError(f"s must be > 0, got {params['s']}")
    return functools.partial(GENERATORS[generator], **params)
