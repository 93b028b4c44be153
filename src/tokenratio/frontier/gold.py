"""Gold rewards: scorers of (prompt, response) batches whose value is the experiment's objective.

Spec strings:
- `vader`: VADER's compound sentiment of the response (vaderSentiment, MIT, its lexicon inside the
  wheel: offline). A lexicon sum squashed by x / sqrt(x^2 + 15) into [-1, 1]: exactly 0 on text
  with no sentiment words (ties), and a sum over words, so token-level credit is what it rewards.
- `reward-model:PATH`: any sequence-classification checkpoint, read as the reward-model judge
  reads it (eval/judges.py: one output is the reward, two the log-odds of the second class).
- `python:MODULE:FUNCTION`: a user's function from (prompts, responses) lists to floats.

Every scorer has a `name` and a `version` (the package's, or the checkpoint's content hash), which
every record and report it produces carries. Bad output (an exception, a wrong length, a NaN or
an infinity) stops with one line naming the scorer and the record.
"""

import hashlib
import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


class GoldRewardError(ValueError):
    """A gold reward that cannot be loaded or gave bad output; the message names it and the
    record."""


@dataclass(frozen=True)
class GoldReward:
    name: str  # the spec it was loaded from
    version: str  # what else decides its values: a package version, a content hash
    function: Callable[[list[str], list[str]], Sequence[float]]

    def identity(self) -> dict:
        return {"name": self.name, "version": self.version}

    def score(self, prompts: list[str], responses: list[str], first: int = 0) -> list[float]:
        """The rewards of the pairs; `first`: the index of the first one, for messages."""
        try:
            values = list(self.function(list(prompts), list(responses)))
        except Exception as err:  # a user's function may raise anything: named, in one line
            raise GoldRewardError(
                f"gold reward {self.name}: failed on records {first}-{first + len(prompts) - 1}: "
                f"{type(err).__name__}: {err}"
            ) from None
        if len(values) != len(responses):
            raise GoldRewardError(
                f"gold reward {self.name}: returned {len(values)} values for {len(responses)} "
                f"responses (records {first}-{first + len(prompts) - 1})"
            )
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise GoldRewardError(
                    f"gold reward {self.name}: record {first + i}: {value!r} is not a number"
                )
            if not math.isfinite(value):
                raise GoldRewardError(f"gold reward {self.name}: record {first + i}: {value}")
        return [float(v) for v in values]


def load_gold_reward(spec: str) -> GoldReward:
    """The scorer a spec string names (module docstring); GoldRewardError for a bad one."""
    kind, _, rest = spec.partition(":")
    if spec == "vader":
        return _vader()
    if kind == "reward-model" and rest:
        return _reward_model(rest)
    if kind == "python" and rest.count(":") == 1:
        return _python(*rest.split(":"), spec)
    raise GoldRewardError(
        f"gold reward {spec!r}: use vader, reward-model:PATH or python:MODULE:FUNCTION"
    )


def _vader() -> GoldReward:
    try:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    except ImportError:
        raise GoldRewardError(
            "gold reward vader: pip install vaderSentiment (or 'tokenratio[frontier]')"
        ) from None
    analyzer = SentimentIntensityAnalyzer()

    def compound(prompts: list[str], responses: list[str]) -> list[float]:
        return [analyzer.polarity_scores(text)["compound"] for text in responses]

    return GoldReward("vader", f"vaderSentiment {metadata.version('vaderSentiment')}", compound)


def _reward_model(path: str) -> GoldReward:
    from tokenratio.eval.judges import RewardModelJudge

    if not Path(path).is_dir():
        raise GoldRewardError(f"gold reward reward-model:{path}: no such directory")
    judge = RewardModelJudge(path)

    def rewards(prompts: list[str], responses: list[str]) -> list[float]:
        return [judge.score(p, r) for p, r in zip(prompts, responses, strict=True)]

    return GoldReward(f"reward-model:{path}", _content_hash(Path(path)), rewards)


def _python(module: str, function: str, spec: str) -> GoldReward:
    try:
        found = getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as err:
        raise GoldRewardError(f"gold reward {spec}: cannot import it: {err}") from None
    if not callable(found):
        raise GoldRewardError(f"gold reward {spec}: {module}.{function} is not callable")
    source = getattr(importlib.import_module(module), "__file__", None)
    version = _file_hash(Path(source)) if source else module
    return GoldReward(spec, version, found)


def _file_hash(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _content_hash(directory: Path) -> str:
    """Every file of a checkpoint directory, hashed in name order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(path.read_bytes())
    return "sha256:" + digest.hexdigest()[:16]
