"""tokenratio: token-level preference optimization (TBPO-Q, TBPO-A) and its baselines.

Public API: the loss contract (`TokenLogps`, `LOSSES`, `GENERATORS`, `reduce`), the chunked per-token
log-probs (`token_logps`, `token_kl`) and TBPO-Q's `StateBaselineHead`. Importing has no side effects
and imports torch only when one of these is first used, so the command line can reject a bad path
before torch loads.
"""

import importlib

_PUBLIC = {
    "GENERATORS": "tokenratio.losses",
    "LOSSES": "tokenratio.losses",
    "StateBaselineHead": "tokenratio.baseline",
    "TokenLogps": "tokenratio.losses",
    "reduce": "tokenratio.losses",
    "token_kl": "tokenratio.logprobs",
    "token_logps": "tokenratio.logprobs",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'tokenratio' has no attribute {name!r}")
