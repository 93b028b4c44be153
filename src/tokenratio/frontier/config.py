"""The frontier's own settings, read from the [frontier] table of a `tokenratio train` config.

Everything else in the file (model, data, loss, train) is the base training config every run
starts from; each run overrides loss.name/options/beta, train.lr/seed/output_dir/save_every and
data.path (the pairs file). data.path is where the prompts come from.
"""

from dataclasses import dataclass
from pathlib import Path

from tokenratio.config import ConfigError, build_config, build_section, read_table
from tokenratio.methods import parse_method


@dataclass(frozen=True)
class FrontierConfig:
    methods: tuple[str, ...] = ("dpo", "tdpo1", "tbpo-q", "tbpo-a[kl_estimator=k3]")
    betas: tuple[float, ...] = (0.05, 0.1, 0.2, 0.5)  # DPO's sentiment frontier: several betas
    lr: float = 1e-3
    lrs: tuple[float, ...] = ()  # one per method, in methods' order (empty: `lr` for every one)
    seeds: tuple[int, ...] = (0,)
    gold: str = "vader"  # vader | reward-model:PATH | python:MODULE:FUNCTION
    train_prompts: int = 160  # prompts the pairs are sampled for
    heldout_prompts: int = 48  # prompts the policies are evaluated on (no pair comes from them)
    samples: int = 4  # K per train prompt: K(K-1)/2 pairs each
    eval_samples: int = 4  # per held-out prompt, from each checkpoint and the reference
    max_new_tokens: int = 24
    tie_margin: float = 0.0
    checkpoints: int = 3  # evaluated along each run, evenly spaced, the last at its end
    batch_rows: int = 64  # sampled rows a forward pass
    split_seed: int = 0
    bootstrap_resamples: int = 2000
    baseline: str = "dpo"  # what every other method is compared with
    output_dir: str = "runs/frontier"

    def lr_of(self, method: str) -> float:
        return self.lrs[self.methods.index(method)] if self.lrs else self.lr


def load_frontier(path: str | Path, overrides: list[str] = ()):
    """(FrontierConfig, base Config) from a TOML file with [frontier] and --set overrides."""
    table = read_table(path, overrides)
    frontier = build_section(FrontierConfig, table.pop("frontier", {}), "frontier.")
    _check(frontier)
    return frontier, build_config(table)


def _check(frontier: FrontierConfig) -> None:
    if not frontier.methods or not frontier.betas or not frontier.seeds:
        raise ConfigError("frontier.methods, frontier.betas and frontier.seeds must be non-empty")
    if frontier.lrs and len(frontier.lrs) != len(frontier.methods):
        raise ConfigError(
            f"frontier.lrs has {len(frontier.lrs)} values for {len(frontier.methods)} methods: "
            "give one per method, in the same order, or none (frontier.lr for all)"
        )
    for name in ("train_prompts", "heldout_prompts", "eval_samples", "max_new_tokens",
                 "checkpoints", "batch_rows", "bootstrap_resamples"):  # fmt: skip
        if getattr(frontier, name) < 1:
            raise ConfigError(f"frontier.{name} = {getattr(frontier, name)}: at least 1")
    if frontier.samples < 2:
        raise ConfigError(f"frontier.samples = {frontier.samples}: at least 2 make a pair")
    if frontier.baseline not in frontier.methods:
        raise ConfigError(
            f"frontier.baseline = {frontier.baseline!r} is not one of frontier.methods"
        )
    for method in frontier.methods:
        try:
            parse_method(method)
        except ValueError as err:
            raise ConfigError(f"frontier.methods: {err}") from None
