"""Gold rewards (frontier/gold.py): vader, a reward model, a user's function; bad output is one
line naming the scorer and the record."""

import pytest

from tokenratio.frontier.gold import GoldRewardError, load_gold_reward


def test_vader_scores_the_response_by_its_compound_sentiment():
    gold = load_gold_reward("vader")
    scores = gold.score(["How was it?"] * 3, ["I love it, wonderful!", "It was awful.", "A chair."])
    assert scores[0] > 0.5 and scores[1] < -0.3 and scores[2] == 0.0
    assert gold.identity() == {"name": "vader", "version": "vaderSentiment 3.3.2"}


def test_a_users_function_is_a_gold_reward_with_its_source_hash():
    gold = load_gold_reward("python:gold_stub:length")
    assert gold.score(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]
    assert gold.version.startswith("sha256:")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("python:gold_stub:nan_on_second", r"python:gold_stub:nan_on_second: record 11: nan"),
        ("python:gold_stub:one_short", r"returned 2 values for 3 responses \(records 10-12\)"),
        ("python:gold_stub:raises", r"failed on records 10-12: RuntimeError: the scorer's server"),
    ],
)
def test_bad_output_stops_in_one_line_naming_the_scorer_and_the_record(spec, message):
    with pytest.raises(GoldRewardError, match=message) as err:
        load_gold_reward(spec).score(["p"] * 3, ["a", "b", "c"], first=10)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("sentiment", r"use vader, reward-model:PATH or python:MODULE:FUNCTION"),
        ("python:no_such_module:f", r"cannot import it"),
        ("python:gold_stub:not_callable", r"is not callable"),
        ("reward-model:/no/such/dir", r"no such directory"),
    ],
)
def test_a_gold_reward_that_cannot_load_is_one_line(spec, message):
    with pytest.raises(GoldRewardError, match=message):
        load_gold_reward(spec)


def test_a_reward_model_checkpoint_is_a_gold_reward(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    torch.manual_seed(1)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path)
    gold = load_gold_reward(f"reward-model:{tmp_path}")
    scores = gold.score(["Human: hi"] * 2, [" hello there", " go away"])
    assert len(scores) == 2 and scores[0] != scores[1]
    assert gold.version.startswith("sha256:") and gold.name == f"reward-model:{tmp_path}"
