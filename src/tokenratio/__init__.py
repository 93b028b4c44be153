"""tokenratio: token-level preference optimization (TBPO-Q, TBPO-A) and its baselines.

Public API: the loss contract (`TokenLogps`, `LOSSES`, `GENERATORS`, `reduce`), the chunked per-token
log-probs (`token_logps`, `token_kl`) and TBPO-Q's `StateBaselineHead`. Importing has no side effects.
"""

from tokenratio.baseline import StateBaselineHead
from tokenratio.logprobs import token_kl, token_logps
from tokenratio.losses import GENERATORS, LOSSES, TokenLogps, reduce

__all__ = [
    "GENERATORS",
    "LOSSES",
    "StateBaselineHead",
    "TokenLogps",
    "reduce",
    "token_kl",
    "token_logps",
]
__version__ = "0.1.0"
