"""[frontier] settings: defaults, per-method lrs, and mistakes said before anything runs."""

import pytest

from tokenratio.config import ConfigError
from tokenratio.frontier.config import FrontierConfig, load_frontier


def _write(tmp_path, frontier: str):
    path = tmp_path / "f.toml"
    path.write_text(
        f'[model]\nname_or_path = "m"\n[data]\npath = "d.jsonl"\n[frontier]\n{frontier}\n'
    )
    return path


def test_the_shipped_preset_loads_and_every_method_gets_its_lr():
    frontier, base = load_frontier("configs/study_smollm2_sentiment_cpu.toml")
    assert frontier.gold == "vader" and len(frontier.betas) >= 4 and frontier.checkpoints >= 3
    assert {"dpo", "tdpo1", "tbpo-q"} <= set(frontier.methods) and base.train.trunk_cache
    custom = FrontierConfig(methods=("dpo", "tbpo-a"), lrs=(1e-3, 3e-3))
    assert custom.lr_of("tbpo-a") == 3e-3 and FrontierConfig().lr_of("dpo") == 1e-3


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ('methods = ["dpo", "tbpo-a"]\nlrs = [1e-3]', "one per method"),
        ('methods = ["tbpo-a"]', "frontier.baseline = 'dpo' is not one of"),
        ("samples = 1", "at least 2 make a pair"),
        ("heldout_prompts = 0", "frontier.heldout_prompts = 0"),
        ('methods = ["dpo", "tbpo-z"]', "frontier.methods"),
        ("betas = []", "must be non-empty"),
        ("sample = 4", "unknown key 'frontier.sample'"),
    ],
)
def test_mistakes_are_said_in_one_line(tmp_path, line, said):
    with pytest.raises(ConfigError, match=said.replace("[", r"\[")):
        load_frontier(_write(tmp_path, line))
