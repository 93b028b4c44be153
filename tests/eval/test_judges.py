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


@pytest.mark.parametrize(
    "mode, delay, message",
    [
        ("", 30.0, r"failed 2 times; last: no answer within 0.5 s"),  # a server that hangs
        ("trickle", 0.0, r"failed 2 times; last: no answer within 0.5 s"),  # one byte per 0.2 s
        ("garbage", 0.0, r"not an OpenAI chat completion \(JSONDecodeError"),
    ],
)
def test_chat_judge_ends_within_its_limits_for_bad_servers(stub_server, mode, delay, message):
    import time

    StubJudge.mode, StubJudge.delay = mode, delay
    started = time.monotonic()
    with pytest.raises(JudgeError, match=message):
        ChatJudge(stub_server, retries=1, timeout=0.5).compare("p", "a", "b")
    assert time.monotonic() - started < 3  # 2 tries x 0.5 s + back-off, however the server behaves


def test_chat_judge_deadline_bounds_all_judging(stub_server):
    import time

    StubJudge.delay = 0.3
    judge = ChatJudge(stub_server, retries=5, timeout=10, deadline=1.0)
    started = time.monotonic()
    with pytest.raises(JudgeError, match=r"deadline \(1 s, --judge-deadline\) passed"):
        for _ in range(20):
            judge.compare("p", "a", "b")
    assert time.monotonic() - started < 2.5


def test_unparseable_verdicts_are_ties_that_are_counted(stub_server):
    for mode in ("zebra", "null"):
        StubJudge.mode = mode
        judge = ChatJudge(stub_server, retries=0, timeout=5)
        assert [judge.compare("p", "a", "bb") for _ in range(3)] == [0.5, 0.5, 0.5]
        assert (judge.unparsed, judge.compared) == (3, 3)
