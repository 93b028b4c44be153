"""The study's own settings, read from the [study] table of a `tokenratio train` config.

Everything else in the file (model, data, loss, train) is the base training config every run
starts from; each run overrides loss.name/options/beta, train.lr/seed/output_dir and the data paths.
"""

from dataclasses import dataclass, field
from pathlib import Path

from tokenratio.config import ConfigError, build_config, build_section, read_table
from tokenratio.methods import parse_method


@dataclass(frozen=True)
class StudyEvalConfig:
    num_prompts: int = (
        20  # test prompts to generate for (paper: 100 for diversity, 200 for win rate)
    )
    samples: int = 5  # per prompt (paper: 5)
    max_new_tokens: int = 128  # paper: 128
    batch_size: int = 8
    judge: str = ""  # "" (none), reward-model:PATH or openai:URL
    judge_model: str = ""  # model name sent to an OpenAI-compatible judge


@dataclass(frozen=True)
class StudyConfig:
    methods: tuple[str, ...] = ("dpo", "tdpo1", "tdpo1[generator=sba]", "tbpo-q", "tbpo-a")
    betas: tuple[float, ...] = (0.1,)
    lrs: tuple[float, ...] = (
        5e-6,
    )  # seed 0 of every (method, beta) tries each; best on validation
    seeds: tuple[int, ...] = (0, 1)
    train_pairs: int = 2000
    valid_pairs: int = 100
    test_pairs: int = 200
    split_seed: int = 0
    output_dir: str = "runs/study"
    # The method whose test accuracy must clear 0.5 by more than its interval for the report to
    # say the recipe trains (DPO: the baseline every other method is read against).
    check_method: str = "dpo"
    eval: StudyEvalConfig = field(default_factory=StudyEvalConfig)


def load_study(path: str | Path, overrides: list[str] = ()):
    """(StudyConfig, base Config) from a TOML file with [study] and --set overrides (study.* too)."""
    table = read_table(path, overrides)
    study = build_section(StudyConfig, table.pop("study", {}), "study.")
    if not study.methods or not study.seeds or not study.lrs or not study.betas:
        raise ConfigError("study.methods, study.betas, study.lrs and study.seeds must be non-empty")
    for method in (*study.methods, study.check_method):
        try:
            parse_method(method)  # a typo fails here, before the first run trains
        except ValueError as err:
            raise ConfigError(f"study.methods: {err}") from None
    return study, build_config(table)
