"""The judges: a reward model, and an OpenAI-compatible endpoint on a local stub server."""

import pytest

from judge_stub import StubJudge
from tokenratio.eval.judges import ChatJudge, JudgeError, RewardModelJudge


def test_chat_judge_counters_position_bias_and_retries(stub_server):
    judge = ChatJudge(stub_server, retries=2, timeout=5)
    # The stub prefers the longer text wherever it is placed: the order swap must not matter.
    assert all(judge.compare("p", "a much longer answer", "short") == 1.0 for _ in range(8))
    assert all(judge.compare("p", "short", "a much longer answer") == 0.0 for _ in range(8))
    StubJudge.failures_left = 2  # two 500s, then an answer: retried
    assert judge.compare("p", "longer one", "x") == 1.0


def test_chat_judge_timeouts_and_down_server_are_clear_errors(stub_server):
    StubJudge.delay = 1.0
    with pytest.raises(JudgeError, match=r"failed 2 times; last: no answer within 0.2 s"):
        ChatJudge(stub_server, retries=1, timeout=0.2).compare("p", "a", "b")
    StubJudge.delay = 0.0
    StubJudge.failures_left = 10
    with pytest.raises(JudgeError, match="last: HTTP 500"):
        ChatJudge(stub_server, retries=1).compare("p", "a", "b")
    with pytest.raises(JudgeError, match="unreachable"):
        ChatJudge("http://127.0.0.1:9/v1", retries=3).compare("p", "a", "b")


def test_reward_model_judge_compares_scores(reward_model_dir):
    judge = RewardModelJudge(str(reward_model_dir))
    a, b = judge.score("Hi", " hello there"), judge.score("Hi", " go away")
    assert a != b
    assert judge.compare("Hi", " hello there", " go away") == (1.0 if a > b else 0.0)
    assert judge.compare("Hi", " same", " same") == 0.5
