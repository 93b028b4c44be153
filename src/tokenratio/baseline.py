"""TBPO-Q's state-baseline head b_phi(s_t): the only learnable part beside the policy.

docs/method.md §3.2: log w_t ~ b_phi(s^l_t) - b_phi(s^w_t), an estimate of the soft value gap
log Z(s^l_t) - log Z(s^w_t). The head reads the policy's final hidden state at the position whose logits
predict y_t, detached from the backbone, so it trains only through the TBPO-Q loss and never moves the
policy. Authors' architecture: Linear(H, 1024) -> GELU -> Linear(1024, 1), its own AdamW at lr 1e-3.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

WEIGHTS_NAME = "baseline_head.safetensors"
CONFIG_NAME = "baseline_head.json"


class StateBaselineHead(nn.Module):
    """b_phi: (..., H) hidden states -> (...) scalar state values (float32)."""

    def __init__(self, hidden_size: int, width: int = 1024):
        super().__init__()
        self.hidden_size = hidden_size
        self.width = width
        self.net = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, 1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Args: hidden (..., H) any float dtype. Returns: (...) values in the head's dtype."""
        # Detached: the baseline is a state-only correction, it must not shape the policy's features.
        hidden = hidden.detach().to(self.net[0].weight.dtype)
        return self.net(hidden).squeeze(-1)

    def save_pretrained(self, directory: str | Path, state_dict: dict | None = None) -> None:
        """Write the weights (safetensors; `state_dict` where this module's own are shards) and
        the shape (JSON) into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict() if state_dict is None else state_dict
        state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(state, directory / WEIGHTS_NAME)
        config = {"hidden_size": self.hidden_size, "width": self.width}
        (directory / CONFIG_NAME).write_text(json.dumps(config))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "StateBaselineHead":
        """Load a head written by `save_pretrained`."""
        directory = Path(directory)
        config_path = directory / CONFIG_NAME
        if not config_path.exists():
            raise FileNotFoundError(
                f"no TBPO-Q baseline head in {directory} (missing {CONFIG_NAME})"
            )
        head = cls(**json.loads(config_path.read_text()))
        head.load_state_dict(load_file(directory / WEIGHTS_NAME))
        return head
