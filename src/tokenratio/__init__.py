"""tokenratio: token-level preference optimization (TBPO-Q, TBPO-A) and its baselines.

Public API: the loss contract (`TokenLogps`, `LOSSES`, `GENERATORS`, `reduce`; `Loss` and `Needs`
to register a loss of your own, see docs/method.md), method strings (`parse_method`), the one
scoring path (`score_pairs`) and the chunked per-token log-probs (`token_logps`, `token_kl`), and
TBPO-Q's `StateBaselineHead`. Importing has no side effects
and imports torch only when one of these is first used, so the command line can reject a bad path
before torch loads.
"""

import importlib

_PUBLIC = {
    "GENERATORS": "tokenratio.losses",
    "LOSSES": "tokenratio.losses",
    "Loss": "tokenratio.losses",
    "Needs": "tokenratio.losses",
    "parse_method": "tokenratio.methods",
    "score_pairs": "tokenratio.scoring",
    "StateBaselineHead": "tokenratio.baseline",
    "TokenLogps": "tokenratio.losses",
    "reduce": "tokenratio.losses",
    "token_kl": "tokenratio.logprobs",
    "token_logps": "tokenratio.logprobs",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'tokenratio' has no attribute {name!r}")
